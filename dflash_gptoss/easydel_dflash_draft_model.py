"""The DFlash draft as a flax.nnx / EasyDeL module, for training in JAX (docs/design.md, "Training").

Same math and parameter layout as the PyTorch draft in
:mod:`dflash_gptoss.modeling_gptoss_dflash` (the reference; see its docstring), in a batched
training form: one window of context features and MANY blocks at once, each block seeing only
the context before its own anchor and the B slots of its own block (never another block).

Why an ``EasyDeLBaseModule``: the easydel Trainer calls ``to_state``, ``mesh``, the partition
rules, ``flops_per_token`` and ``save_pretrained`` on the model, so the draft is a small subclass
with its own config class. That config is always built FROM the shared draft config
(:func:`dflash_gptoss.draft_config.make_draft_config`, a ``DFlashDraftConfig``: a transformers
``Qwen3Config`` subclass), so there is one source of truth for sizes, RoPE, ``block_size`` and
``dflash_config``. The JAX draft has no attention biases (``attention_bias`` stays false here).

easydel 0.3.0 pitfall: ``EasyDeLBaseConfig.__init_subclass__`` replaces every subclass's
``get_partition_rules`` with a function returning ``None`` (then easydel falls back to the
``craft_sharding`` hooks of its own layers, which plain ``nnx.Linear`` does not have, so every
weight would be silently replicated). The rules are therefore attached AFTER the class is
created (:func:`_attach_partition_rules`), and the tests check the resulting shardings.

Kernel layout is flax's ``[in, out]``; the exporter transposes to torch's ``[out, in]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from easydel.infra.base_config import EasyDeLBaseConfig
from easydel.infra.base_module import EasyDeLBaseModule
from easydel.infra.factory import TaskType, register_config, register_module
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dflash_gptoss.configuration_gptoss_dflash import draft_block_size, draft_mask_token_id, draft_target_layer_ids
from dflash_gptoss.mesh import TP

MODEL_TYPE = "dflash_draft"

# Fields copied from the shared DFlashDraftConfig into the easydel config (and back, see to_draft_config).
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "attention_bias", "rms_norm_eps",
    "max_position_embeddings", "rope_parameters", "tie_word_embeddings", "use_sliding_window",
    "layer_types", "block_size", "num_target_layers", "dflash_config", "architectures",
)

COLUMN = PartitionSpec(None, TP)
"""``[in, out]`` kernel split on its output features (q/k/v/gate/up/fc): no communication in."""
ROW = PartitionSpec(TP, None)
"""``[in, out]`` kernel split on its input features (o/down): one reduction out."""


def draft_partition_rules() -> tuple[tuple[str, PartitionSpec], ...]:
    """Megatron-style tensor parallelism over ``tp``; norms replicated; batch goes over ``dp``."""
    return (
        (r"self_attn/(q_proj|k_proj|v_proj)/kernel", COLUMN),
        (r"self_attn/o_proj/kernel", ROW),
        (r"mlp/(gate_proj|up_proj)/kernel", COLUMN),
        (r"mlp/down_proj/kernel", ROW),
        (r"(^|/)fc/kernel", COLUMN),
        (r".*", PartitionSpec()),
    )


@register_config(MODEL_TYPE)
class DFlashDraftEdConfig(EasyDeLBaseConfig):
    """easydel config of the draft; carries exactly the shared draft config's fields."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)

    @classmethod
    def from_draft_config(cls, draft_config: Any, *, dp: int = 1, tp: int = 1, **basics: Any) -> DFlashDraftEdConfig:
        """From the shared ``DFlashDraftConfig``; mesh ``dp`` x ``tp`` (easydel axes dp, fsdp, ep, tp, sp)."""
        if getattr(draft_config, "attention_bias", False):
            raise ValueError("the JAX draft has no attention biases, but this draft config sets attention_bias=true "
                             "(a published-layout draft?); train from a make_draft_config config, or evaluate this "
                             "draft with the torch DFlashDraftModel.")
        values = draft_config.to_dict()
        cfg = cls(**{k: values[k] for k in _SHARED_FIELDS if k in values})
        cfg.add_basic_configurations(sharding_axis_dims=(dp, 1, 1, tp, 1), **basics)
        return cfg

    def to_draft_config(self) -> Any:
        """The shared ``DFlashDraftConfig`` again (what the torch draft and serving engines read)."""
        from dflash_gptoss.configuration_gptoss_dflash import DFlashDraftConfig

        return DFlashDraftConfig(**{k: getattr(self, k) for k in _SHARED_FIELDS if hasattr(self, k)})


def _attach_partition_rules(cls: type) -> None:
    """Re-install ``get_partition_rules`` that ``EasyDeLBaseConfig.__init_subclass__`` nulled out."""

    def get_partition_rules(self, *args: Any, **kwargs: Any) -> tuple[tuple[str, PartitionSpec], ...]:
        return draft_partition_rules()

    cls.get_partition_rules = get_partition_rules


_attach_partition_rules(DFlashDraftEdConfig)


# ----------------------------------------------------------------------------------- math pieces
def rope_tables(draft_config: Any) -> tuple[np.ndarray, float]:
    """(inv_freq float32 ``[head_dim/2]``, attention_scaling) exactly as the torch draft gets them.

    Built by transformers' own ``Qwen3RotaryEmbedding`` (YaRN incl. ``truncate``, default, ...),
    so the two implementations cannot disagree on RoPE.
    """
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    rotary = Qwen3RotaryEmbedding(draft_config)
    return rotary.inv_freq.detach().float().numpy().copy(), float(rotary.attention_scaling)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, scaling: float) -> jax.Array:
    """RoPE (rotate-half layout) of ``x`` [..., T, heads, d] at int ``positions`` [..., T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[..., None, :]  # [..., T, 1, d]
    cos, sin = (jnp.cos(emb) * scaling).astype(x.dtype), (jnp.sin(emb) * scaling).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    """Qwen3RMSNorm: normalise in float32, cast back, then scale (torch order, for parity)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any) -> None:
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype=param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


def _linear(din: int, dout: int, *, dtype: Any, param_dtype: Any, precision: Any, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, dtype=dtype, param_dtype=param_dtype, precision=precision,
                      rngs=rngs)


class DFlashAttention(nnx.Module):
    """Block queries attend to ``[context before own anchor || own block]`` keys/values."""

    def __init__(self, config: DFlashDraftEdConfig, *, dtype: Any, param_dtype: Any, precision: Any,
                 rngs: nnx.Rngs) -> None:
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.q_proj = _linear(h, self.num_heads * d, **kw)
        self.k_proj = _linear(h, self.num_kv_heads * d, **kw)
        self.v_proj = _linear(h, self.num_kv_heads * d, **kw)
        self.o_proj = _linear(self.num_heads * d, h, **kw)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype)

    def _kv(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, float]) -> tuple[jax.Array, jax.Array]:
        """Normed, rotated keys and values of ``x`` [..., T, H]: each [..., T, kv_heads, d]."""
        shape = (*x.shape[:-1], self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(shape)), positions, *rope)
        return k, self.v_proj(x).reshape(shape)

    def __call__(self, block: jax.Array, context: jax.Array, block_positions: jax.Array,
                 context_positions: jax.Array, anchor_positions: jax.Array,
                 rope: tuple[jax.Array, float]) -> jax.Array:
        """``block`` [b, nb, B, H], ``context`` [b, C, H] -> [b, nb, B, H].

        Computed head-major (``[b, kv_heads, ...]``, each kv head's query group folded into the
        rows), so every product is one batched matmul over ``(b, kv_heads)`` and the backward pass
        needs few layout copies; the softmax over ``[context || own block]`` is written out with a
        stop-gradient max (exact: softmax does not depend on the shift), which spares the backward
        pass a concatenation of both score tensors. On the demo's shapes on a 2-core CPU the attention's
        forward+backward is ~3x faster than the same math as 6-d einsums over concatenated scores; the
        whole training step, ~9% (artifacts/dflash_bench/tiny_acceptance/README.md, "2026-11-26: a faster
        attention, the loss decay, a fourth layer").
        """
        b, nb, bs, _ = block.shape
        kv, d, groups = self.num_kv_heads, self.head_dim, self.num_heads // self.num_kv_heads
        c = context.shape[1]
        f32 = jnp.float32
        q = self.q_norm(self.q_proj(block).reshape(b, nb, bs, self.num_heads, d))
        q = apply_rope(q, block_positions, *rope).astype(f32) * (1.0 / np.sqrt(d))
        q = q.reshape(b, nb, bs, kv, groups, d).transpose(0, 3, 1, 2, 4, 5).reshape(b, kv, nb, bs * groups, d)
        k_ctx, v_ctx = (t.astype(f32).transpose(0, 2, 1, 3) for t in self._kv(context, context_positions, rope))
        k_blk, v_blk = (t.astype(f32).transpose(0, 3, 1, 2, 4) for t in self._kv(block, block_positions, rope))
        # k_ctx/v_ctx [b, kv, C, d]; k_blk/v_blk [b, kv, nb, B, d]; q [b, kv, nb, B*groups, d]
        # additive mask [b, nb, C]: 0 where block j may see the context position (< its anchor), else -inf
        ctx_bias = jnp.where(context_positions[:, None, :] < anchor_positions[:, :, None], 0.0, -jnp.inf).astype(f32)
        s_ctx = jnp.einsum("bkqd,bkcd->bkqc", q.reshape(b, kv, nb * bs * groups, d), k_ctx)
        s_ctx = s_ctx.reshape(b, kv, nb, bs * groups, c) + ctx_bias[:, None, :, None, :]
        s_blk = jnp.einsum("bknqd,bknpd->bknqp", q, k_blk)  # own block: never empty, so the max is finite
        top = jax.lax.stop_gradient(jnp.maximum(s_ctx.max(-1, keepdims=True), s_blk.max(-1, keepdims=True)))
        e_ctx, e_blk = jnp.exp(s_ctx - top), jnp.exp(s_blk - top)
        total = e_ctx.sum(-1, keepdims=True) + e_blk.sum(-1, keepdims=True)
        out = (jnp.einsum("bkqc,bkcd->bkqd", e_ctx.reshape(b, kv, nb * bs * groups, c), v_ctx)
               .reshape(b, kv, nb, bs * groups, d) + jnp.einsum("bknqp,bknpd->bknqd", e_blk, v_blk)) / total
        out = out.reshape(b, kv, nb, bs, groups, d).transpose(0, 2, 3, 1, 4, 5)
        return self.o_proj(out.reshape(b, nb, bs, self.num_heads * d).astype(block.dtype))


class DFlashMLP(nnx.Module):
    """SiLU-gated MLP without bias (what serving engines expect of a DFlash draft)."""

    def __init__(self, config: DFlashDraftEdConfig, *, dtype: Any, param_dtype: Any, precision: Any,
                 rngs: nnx.Rngs) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj, self.down_proj = _linear(h, i, **kw), _linear(h, i, **kw), _linear(i, h, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDecoderLayer(nnx.Module):
    """Pre-norm residual layer: attention over [context || block], then the MLP."""

    def __init__(self, config: DFlashDraftEdConfig, *, dtype: Any, param_dtype: Any, precision: Any,
                 rngs: nnx.Rngs) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        self.self_attn = DFlashAttention(config, **kw)
        self.mlp = DFlashMLP(config, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, context: jax.Array, block_positions: jax.Array, context_positions: jax.Array,
                 anchor_positions: jax.Array, rope: tuple[jax.Array, float]) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), context, block_positions, context_positions,
                               anchor_positions, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


@register_module(TaskType.BASE_MODULE, config=DFlashDraftEdConfig, model_type=MODEL_TYPE)
class DFlashDraftNNX(EasyDeLBaseModule):
    """The draft's own parameters (``fc``, ``hidden_norm``, ``layers``, ``norm``), as in torch.

    The target's embedding and lm_head are never parameters here: they stay frozen, the caller
    embeds the blocks and applies the lm_head to the returned hidden states.
    """

    def __init__(self, config: DFlashDraftEdConfig, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 precision: Any = None, *, rngs: nnx.Rngs) -> None:
        super().__init__(config=config, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        kw = {"dtype": dtype, "param_dtype": param_dtype, "precision": precision, "rngs": rngs}
        hidden = config.hidden_size
        self.block_size = draft_block_size(config)
        self.mask_token_id = draft_mask_token_id(config)
        self.target_layer_ids = tuple(draft_target_layer_ids(config))
        self.fc = _linear(len(self.target_layer_ids) * hidden, hidden, **kw)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps, param_dtype=param_dtype)
        self.layers = nnx.List([DFlashDecoderLayer(config, **kw) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(hidden, config.rms_norm_eps, param_dtype=param_dtype)
        inv_freq, scaling = rope_tables(config.to_draft_config())
        self.rope_inv_freq = tuple(float(f) for f in inv_freq)  # static: a constant, not a parameter
        self.rope_scaling = scaling

    def __call__(self, context_features: jax.Array, context_positions: jax.Array, block_embeddings: jax.Array,
                 block_positions: jax.Array, anchor_positions: jax.Array) -> jax.Array:
        """Final-normed hidden states of every block slot, ``[b, nb, B, H]``.

        ``context_features`` [b, C, K*H] with absolute ``context_positions`` [b, C]; ``block_embeddings``
        [b, nb, B, H] (anchor + MASK rows of the target's embedding) at ``block_positions``
        [b, nb, B]; block j sees context positions ``< anchor_positions[:, j]`` and its own B
        slots only. Padded context rows must carry a position no anchor exceeds (e.g. int32 max).
        """
        rope = (jnp.asarray(np.asarray(self.rope_inv_freq, dtype=np.float32)), self.rope_scaling)
        context = self.hidden_norm(self.fc(context_features.astype(self.dtype)))
        x = block_embeddings.astype(self.dtype)
        for layer in self.layers:
            x = layer(x, context, block_positions, context_positions, anchor_positions, rope)
        return self.norm(x)


def create_draft_model(draft_config: Any, *, dp: int = 1, tp: int = 1, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, precision: Any = None, seed: int = 0) -> DFlashDraftNNX:
    """A freshly initialised draft, parameters sharded over a ``dp`` x ``tp`` mesh by the rules."""
    cfg = DFlashDraftEdConfig.from_draft_config(draft_config, dp=dp, tp=tp)
    model = DFlashDraftNNX(cfg, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=nnx.Rngs(seed))
    return place_on_mesh(model.shard_model())


def lazy_draft_model(draft_config: Any, *, dp: int, tp: int, mesh: Any, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32, precision: Any = None, seed: int = 0) -> DFlashDraftNNX:
    """The draft :func:`create_draft_model` builds, with abstract parameters on ``mesh`` (no array made).

    For the TPU planner: ``mesh`` (easydel's axes, e.g. over a TPU topology's devices) is set
    before ``lazy_init`` so the partition rules resolve against it; the defaults are
    :func:`create_draft_model`'s, so the plan's parameters are the run's.
    """
    cfg = DFlashDraftEdConfig.from_draft_config(draft_config, dp=dp, tp=tp)
    cfg.set_model_mesh(mesh)
    return DFlashDraftNNX.lazy_init(config=cfg, dtype=dtype, param_dtype=param_dtype, precision=precision,
                                    rngs=nnx.Rngs(seed))


def place_on_mesh(model: DFlashDraftNNX) -> DFlashDraftNNX:
    """Replicate over the mesh every parameter ``shard_model`` left on one device.

    easydel 0.3.0's ``shard_model`` leaves ``PartitionSpec()`` parameters (the norms) as
    single-device arrays; mixed with mesh-sharded arrays they break eager calls and make jit
    copy them every step, so they are put on the mesh explicitly (replicated).
    """
    replicated = NamedSharding(model.mesh, PartitionSpec())
    for _, var in param_variables(model):
        if not isinstance(getattr(var[...], "sharding", None), NamedSharding):
            var[...] = jax.device_put(var[...], replicated)
    return model


def load_draft_state(checkpoint_dir: str | Path, *, dp: int = 1, tp: int = 1, dtype: Any = jnp.float32,
                     param_dtype: Any = jnp.float32) -> Any:
    """``EasyDeLState.load_state`` of a draft checkpoint (e.g. the Trainer's ``run-<step>``), sharded.

    Two easydel 0.3.0 defaults are wrong for the draft and are set here: the model task is
    inferred from ``architectures`` (``DFlashDraftModel`` names no task, so it fails with
    "task type None"), and the load dtype defaults to bf16 (silently rounding float32 weights).
    """
    from easydel.infra.base_state import EasyDeLState

    state = EasyDeLState.load_state(str(checkpoint_dir), model_task=TaskType.BASE_MODULE, dtype=dtype,
                                    param_dtype=param_dtype, sharding_axis_dims=(dp, 1, 1, tp, 1), verbose=False)
    place_on_mesh(state.model)
    return state


def param_variables(model: nnx.Module | nnx.State) -> list[tuple[tuple[str, ...], nnx.Variable]]:
    """(path, variable) of every ``nnx.Param`` of a module (or every variable of a state, e.g. a
    trainer's graphstate); assigning ``var[...]`` updates the model in place. The one flattening
    of draft parameters: export, the export check and the tests all read paths from here."""
    state = model if isinstance(model, nnx.State) else nnx.state(model, nnx.Param)
    return [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)]


def param_arrays(model: nnx.Module | nnx.State) -> dict[tuple[str, ...], jax.Array]:
    """``{path: array}`` of every ``nnx.Param`` (paths as tuples of strings)."""
    return {path: var[...] for path, var in param_variables(model)}


__all__ = ["DFlashDraftEdConfig", "DFlashDraftNNX", "create_draft_model", "draft_partition_rules", "lazy_draft_model",
           "load_draft_state",
           "param_arrays",
           "param_variables", "place_on_mesh", "rope_tables"]
