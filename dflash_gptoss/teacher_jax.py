"""The JAX teacher: easydel's GPT-OSS, loaded from a Hugging Face snapshot, equal to transformers.

The teacher cache's features are computed here and consumed by a draft that, at inference,
is fed by transformers' ``GptOssForCausalLM``. Any difference between the two silently
trains the draft on features it never sees, so this module only ever builds the model
through :mod:`dflash_gptoss.teacher_easydel_fixes` (which corrects easydel 0.3.0 where it
differs from transformers) and loads weights itself, straight from the safetensors files
(float or MXFP4), never through a torch model (easydel's torch path loads in float16).

Feature convention: index ``l`` in ``layer_ids`` is the OUTPUT of decoder layer ``l``
(transformers' ``hidden_states[l+1]``). easydel's ``hidden_states`` are the INPUTS of each
layer, so the forward runs the decoder layers itself and records the outputs it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.mesh import DP

_DTYPES = ("float32", "bfloat16")


def read_snapshot_config(snapshot_dir: str | Path) -> dict[str, Any]:
    """Validated ``config.json`` of a GPT-OSS snapshot folder (ValueError otherwise)."""
    from dflash_gptoss.teacher_snapshot import read_config

    path = Path(snapshot_dir)
    cfg = read_config(path)  # SnapshotError (a ValueError) names the folder or config.json:line:col
    if not sorted(path.glob("*.safetensors")):
        raise ValueError(f"snapshot {str(path)!r} holds no *.safetensors weights")
    return cfg


def validate_layout(cfg: dict[str, Any], layer_ids: list[int], dp: int, tp: int, dtype: str) -> None:
    """Check layer ids, mesh sizes and dtype up front, with the value and the fix in the message."""
    n_layers = int(cfg["num_hidden_layers"])
    bad = [i for i in layer_ids if not 0 <= int(i) < n_layers]
    if not layer_ids or bad:
        raise ValueError(f"layer_ids {list(layer_ids)} invalid for a {n_layers}-layer teacher: give a non-empty "
                         f"list of decoder-layer indices in [0, {n_layers - 1}]")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} not supported; use one of {_DTYPES}")
    if dp < 1 or tp < 1:
        raise ValueError(f"dp={dp}, tp={tp}: both must be >= 1")
    for name in ("num_attention_heads", "vocab_size"):  # kv heads may be fewer than tp (easydel replicates)
        if int(cfg[name]) % tp:
            raise ValueError(f"{name}={cfg[name]} is not divisible by tp={tp}; easydel shards it over tp, "
                             "choose a tp that divides it")
    import jax

    if dp * tp != jax.device_count():
        raise ValueError(f"dp*tp = {dp}*{tp} = {dp * tp} but {jax.device_count()} devices are visible; easydel's "
                         "mesh uses every device: choose dp*tp equal to the device count (on CPU, "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N)")


def teacher_forward_fn(graphdef: Any, layer_ids: list[int], dtype: str, mesh: Any) -> tuple[Any, Any]:
    """The cache builder's jitted teacher forward and the sharding of its ``input_ids`` (dp rows).

    ``fn(state, input_ids int32 [b, T]) -> (features [b, T, K*H] in dtype, labels int32 [b, T],
    stats float32 [b, K, 3])``: the outputs of ``layer_ids`` concatenated, the argmax of the logits,
    and per row and layer the number of non-finite values, their sum and their sum of squares (the
    build's finiteness check and ``meta.json``'s feature statistics, reduced on device for free).
    One definition for the real build (:class:`JaxTeacher`) and the TPU planner
    (:mod:`dflash_gptoss.planning.tpu_plan`), so a plan compiles exactly what a build runs.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from dflash_gptoss.teacher_easydel_fixes import decoder_forward

    layer_ids = tuple(int(i) for i in layer_ids)
    out_dtype = jnp.float32 if dtype == "float32" else jnp.bfloat16
    ids_sharding = NamedSharding(mesh, PartitionSpec(DP, None))
    feat_sharding = NamedSharding(mesh, PartitionSpec(DP, None, None))

    def _fwd(state, input_ids):
        model = nnx.merge(graphdef, state)
        feats, logits = decoder_forward(model, input_ids, layer_ids)
        features = jnp.concatenate([f.astype(out_dtype) for f in feats], axis=-1)
        labels = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
        return features, labels, jnp.stack([_layer_stats(f.astype(out_dtype)) for f in feats], axis=1)

    stats_sharding = NamedSharding(mesh, PartitionSpec(DP, None, None))
    return jax.jit(_fwd, out_shardings=(feat_sharding, ids_sharding, stats_sharding)), ids_sharding


def _layer_stats(feature: Any) -> Any:
    """[b, T, H] -> [b, 3]: non-finite count, sum and sum of squares of the finite values (float32)."""
    import jax.numpy as jnp

    x = feature.astype(jnp.float32)
    finite = jnp.isfinite(x)
    x = jnp.where(finite, x, 0.0)
    return jnp.stack([jnp.sum(~finite, axis=(1, 2)).astype(jnp.float32), jnp.sum(x, axis=(1, 2)),
                      jnp.sum(x * x, axis=(1, 2))], axis=-1)


def _to_host(x: Any) -> np.ndarray:
    """A global array as numpy on every process (a collective past one host)."""
    from dflash_gptoss.distributed import gather_to_host

    return np.asarray(gather_to_host(x))


class JaxTeacher:
    """easydel GPT-OSS teacher, jitted and sharded over a ``dp`` x ``tp`` mesh.

    ``forward`` returns the concatenated outputs of ``layer_ids`` (the context features)
    and the greedy labels (argmax of the logits), both computed on device in one jitted
    function per input shape; ``embed`` returns frozen input-embedding rows.
    """

    def __init__(self, snapshot_dir: str | Path, layer_ids: list[int], *, dp: int = 1, tp: int = 1,
                 dtype: str = "float32") -> None:
        cfg = read_snapshot_config(snapshot_dir)
        self.layer_ids = [int(i) for i in layer_ids]
        validate_layout(cfg, self.layer_ids, dp, tp, dtype)
        from transformers import GptOssConfig

        from dflash_gptoss.teacher_easydel_fixes import load_easydel_gptoss

        self.snapshot_dir = Path(snapshot_dir)
        self.config = GptOssConfig.from_pretrained(str(self.snapshot_dir))
        self.dp, self.tp, self.dtype = dp, tp, dtype
        self.model = load_easydel_gptoss(self.snapshot_dir, dp=dp, tp=tp, dtype=dtype)
        self.mesh = self.model.mesh
        self._embedding = None
        self._build()

    def _build(self) -> None:
        """Split the nnx model once and jit the forward (retraced only per new input shape)."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from dflash_gptoss.teacher_easydel_fixes import decoder_forward

        graphdef, state = nnx.split(self.model)
        self._state = state
        self._fwd, self._in_sharding = teacher_forward_fn(graphdef, self.layer_ids, self.dtype, self.mesh)

        def _logits(state, input_ids):
            model = nnx.merge(graphdef, state)
            return decoder_forward(model, input_ids, ())[1].astype(jnp.float32)

        self._logits = jax.jit(_logits)

        def _top_probs(state, input_ids, temperature, k):
            probs = jax.nn.softmax(_logits(state, input_ids) / temperature, axis=-1)
            values, ids = jax.lax.top_k(probs, k)
            return ids.astype(jnp.int32), values

        self._top_probs = jax.jit(_top_probs, static_argnums=(3,))

    def forward(self, input_ids: np.ndarray, *, with_stats: bool = False) -> tuple[np.ndarray, ...]:
        """int32 ``[b, T]`` -> (features ``[b, T, K*H]`` in ``dtype``, labels int32 ``[b, T]``), and with
        ``with_stats`` the per-row, per-layer statistics ``[b, K, 3]`` of :func:`teacher_forward_fn`."""
        ids_dev = self._device_ids(input_ids)
        with self.mesh:
            features, labels, stats = self._fwd(self._state, ids_dev)
        out = (np.asarray(features), np.asarray(labels))
        return (*out, np.asarray(stats)) if with_stats else out

    def forward_owned(self, input_ids: np.ndarray, *, with_stats: bool = False) -> tuple[Any, ...]:
        """Multi-host form of :meth:`forward`: ``(lo, features, labels[, stats])`` for rows ``lo..`` of the batch.

        Every process passes the same global ``input_ids`` ``[b, T]`` but only the rows its own
        devices hold go to the devices; the rows returned are those whose primary copy this process
        holds (each row is returned by exactly one process; on one host: all rows, ``lo == 0``).
        """
        import jax

        from dflash_gptoss.distributed import local_rows, process_row_range

        ids = self._check_ids(input_ids)
        lo, hi = process_row_range(self._in_sharding, ids.shape)
        ids_dev = jax.make_array_from_process_local_data(self._in_sharding, ids[lo:hi], ids.shape)
        with self.mesh:
            features, labels, stats = self._fwd(self._state, ids_dev)
        f_lo, f_rows = local_rows(features)
        l_lo, l_rows = local_rows(labels)
        s_lo, s_rows = local_rows(stats)
        if not (f_lo, len(f_rows)) == (l_lo, len(l_rows)) == (s_lo, len(s_rows)):
            raise RuntimeError(f"features rows {f_lo}+{len(f_rows)} and labels rows {l_lo}+{len(l_rows)} differ.")
        return (f_lo, f_rows, l_rows, s_rows) if with_stats else (f_lo, f_rows, l_rows)

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """float32 logits ``[b, T, V]`` (for parity checks; the cache never needs them)."""
        ids_dev = self._device_ids(input_ids)
        with self.mesh:
            return np.asarray(self._logits(self._state, ids_dev))

    def top_probs(self, input_ids: np.ndarray, temperature: float, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most likely next tokens at every position and their probabilities under
        ``softmax(logits / temperature)``: (ids int32 ``[b, T, k]``, probs float32 ``[b, T, k]``), computed on
        device so that no ``[b, T, V]`` array reaches the host."""
        ids_dev = self._device_ids(input_ids)
        with self.mesh:
            ids, probs = self._top_probs(self._state, ids_dev, float(temperature), int(k))
        return _to_host(ids), _to_host(probs)

    def _device_ids(self, input_ids: np.ndarray):
        """Validate ``input_ids`` and place them on the mesh, batch sharded over dp."""
        import jax

        return jax.device_put(self._check_ids(input_ids), self._in_sharding)

    def _check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """``input_ids`` as int32 ``[b, T]`` with ``b % dp == 0`` and every id in the vocabulary."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be 2-D [batch, T], got shape {ids.shape}")
        if ids.shape[0] % self.dp:
            raise ValueError(f"batch size {ids.shape[0]} is not divisible by dp={self.dp}; pad or regroup the "
                             f"batch to a multiple of {self.dp}")
        vocab = int(self.config.vocab_size)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"input_ids outside [0, {vocab}): min {ids.min()}, max {ids.max()}")
        return ids.astype(np.int32)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """Rows of the frozen input embedding table (float32), e.g. for anchor embeddings."""
        if self._embedding is None:
            table = self.model.model.embed_tokens.embedding[...]  # past one host: fetched once, by all
            self._embedding = np.asarray(_to_host(table), dtype=np.float32)
        return self._embedding[np.asarray(token_ids, dtype=np.int64)]
