"""Where easydel 0.3.0's GPT-OSS differs from transformers 5.5, and the corrections (one place).

The JAX teacher must compute exactly what transformers' ``GptOssForCausalLM`` computes (see
docs/design.md, "The JAX teacher must equal the torch target"). Each difference found in easydel
0.3.0 is corrected here, by configuration where easydel offers an option and otherwise by a
narrow runtime patch of one method of one GPT-OSS class, installed when this module is
imported. Every correction has a name in :data:`ALL_FIXES`; a model built with a subset
(``load_easydel_gptoss(..., fixes=...)``) behaves like stock easydel for the others, which is
how the tests show that each difference is real and that its correction removes it.

| name               | easydel 0.3.0 (stock)                                   | correction                     |
|--------------------|---------------------------------------------------------|--------------------------------|
| (load dtype)       | torch-weight loading builds the torch model in float16  | safetensors are read directly   |
| ``attn_dtype``     | attention activations in bf16 (``attn_dtype`` default)  | config: ``attn_dtype=dtype``    |
| ``moe_dtype``      | ``GptOssMLP`` never sets ``self.dtype``; the MoE base   | patch ``GptOssMLP.__init__``    |
|                    | class falls back to bf16 compute                        |                                |
| ``sliding_window`` | window mask keeps ``q-k <= w`` (w+1 keys)               | config: ``sliding_window=w-1``  |
| ``rope``           | RoPE table cast to bf16; YaRN correction range always   | patch ``GptOssConfig.          |
|                    | rounded (ignores ``truncate: false``); ``rope_theta``   | get_basic_frequencies``; config:|
|                    | taken from easydel's default, not ``rope_parameters``   | ``rope_theta``                 |
| ``routing``        | fused MoE softmaxes the already-softmaxed top-k probs   | patch ``GptOssMLP.__init__``    |
|                    | again (weights flattened toward uniform)                | (routing hooks)                |

The patches only take effect for configs whose ``dflash_fixes`` attribute names them; configs
that never went through :func:`load_easydel_gptoss` get all corrections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

EASYDEL_VERSION = "0.3.0"
ALL_FIXES: frozenset[str] = frozenset({"attn_dtype", "moe_dtype", "sliding_window", "rope", "routing"})
_FIXES_ATTR = "dflash_fixes"


def _enabled(config: Any, name: str) -> bool:
    """Whether correction ``name`` applies to modules built from ``config``."""
    return name in getattr(config, _FIXES_ATTR, ALL_FIXES)


def config_kwargs(dtype: str, fixes: frozenset[str] = ALL_FIXES) -> dict[str, Any]:
    """easydel config options: attention in the model dtype (stock: bf16), vanilla attention.

    ``vanilla`` is the attention kernel whose sliding-window convention was verified
    (``ejkernel`` XLA attention: ``k >= q - w``); other kernels are not assumed to agree.
    """
    import jax.numpy as jnp

    jdt = jnp.float32 if dtype == "float32" else jnp.bfloat16
    kwargs: dict[str, Any] = {"attn_mechanism": "vanilla", "moe_method": "fused_moe", "moe_force_xla_gmm": True}
    if "attn_dtype" in fixes:
        kwargs.update(attn_dtype=jdt, kvdtype=jdt, attn_softmax_dtype=jnp.float32)
    return kwargs


def configure(ed_cfg: Any, hf_cfg: dict[str, Any], fixes: frozenset[str]) -> None:
    """Configuration-level corrections on an easydel ``GptOssConfig`` read from ``hf_cfg``."""
    setattr(ed_cfg, _FIXES_ATTR, frozenset(fixes))
    if "sliding_window" in fixes and hf_cfg.get("sliding_window"):
        # transformers keeps keys with q-k < w; easydel's mask keeps q-k <= w.
        ed_cfg.sliding_window = int(hf_cfg["sliding_window"]) - 1
    rope = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf_cfg.get("rope_theta"))
    if "rope" in fixes and theta is not None:
        # transformers 5 stores rope_theta inside rope_parameters; easydel 0.3.0 keeps its default.
        ed_cfg.rope_theta = float(theta)


# ---------------------------------------------------------------- runtime patches
def _transformers_rope_table(ed_cfg: Any, rows: int) -> np.ndarray:
    """float32 ``[rows, head_dim]`` table ``[cos | sin]`` exactly as transformers builds it."""
    import torch
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(getattr(ed_cfg, "rope_scaling", None) or {})
    rope.setdefault("rope_type", "default")
    rope["rope_theta"] = float(ed_cfg.rope_theta)
    rope.pop("type", None)
    hf = GptOssConfig(head_dim=ed_cfg.head_dim, hidden_size=ed_cfg.hidden_size,
                      num_attention_heads=ed_cfg.num_attention_heads,
                      max_position_embeddings=ed_cfg.max_position_embeddings, rope_parameters=rope)
    rope_type = hf.rope_parameters["rope_type"]
    if rope_type == "default":
        base, dim = hf.rope_parameters["rope_theta"], hf.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scale = 1.0
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu")
    pos = torch.arange(rows, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    return torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1).numpy().astype(np.float32)


def _patched_get_basic_frequencies(self, head_size=None, rotary_dim=None, base=None):
    """GptOssConfig.get_basic_frequencies (easydel 0.3.0) without the bf16 cast, YaRN per transformers.

    Stock easydel casts the cos/sin table to bf16 and always rounds YaRN's correction range
    (floor/ceil) although gpt-oss sets ``truncate: false``; both shift RoPE angles. The table
    here is transformers' own (``ROPE_INIT_FUNCTIONS``) in float32, same shape and layout.
    """
    if not _enabled(self, "rope"):
        return _ORIGINALS["get_basic_frequencies"](self, head_size, rotary_dim, base)
    import jax
    from easydel.infra.utils import ModuleCaches
    from jax.sharding import NamedSharding, PartitionSpec

    stock = _ORIGINALS["get_basic_frequencies"](self, head_size, rotary_dim, base)
    rows, width = stock[...].shape
    if width != self.head_dim or (head_size or self.head_dim) != self.head_dim or base is not None:
        return stock  # not the shape this fix reproduces; never the case for GPT-OSS
    table = _transformers_rope_table(self, rows)
    return ModuleCaches(jax.device_put(table, NamedSharding(self.mesh, PartitionSpec())))


def _routing_hooks(hooks: Any) -> Any:
    """MoE hooks that route like transformers: top-k of the router logits, softmax over those k.

    Stock GptOssMLP scatters softmax(top-k logits) into a dense vector (``after_gate``), the
    fused path then softmaxes that vector again and ``refine_weights_hook`` softmaxes the k
    selected values a third time: weights end up near uniform. Here the gate logits pass
    through untouched (``normalize_gate_logits`` = identity), ``top_k`` picks the same experts
    as ``torch.topk`` and one softmax over the selected logits gives transformers' weights.
    """
    import jax

    return hooks.replace(after_gate=None, normalize_gate_logits=lambda x: x,
                         refine_weights_hook=lambda w: jax.nn.softmax(w.astype("f4"), axis=-1).astype(w.dtype))


def _patched_mlp_init(self, config, dtype=None, param_dtype=None, precision=None, *, rngs):
    """GptOssMLP.__init__ (easydel 0.3.0), then the MoE compute dtype and the routing hooks.

    Stock: ``BaseMoeModule`` sets ``self.dtype = getattr(self, "dtype", bfloat16)`` and
    GptOssMLP never sets it, so the fused MoE (router softmax, grouped matmuls) runs in bf16
    even for a float32 model. Routing: see :func:`_routing_hooks`.
    """
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if dtype is None else dtype
    param_dtype = jnp.bfloat16 if param_dtype is None else param_dtype
    _ORIGINALS["mlp_init"](self, config, dtype, param_dtype, precision, rngs=rngs)
    if _enabled(config, "moe_dtype"):
        self.dtype = dtype
    if _enabled(config, "routing"):
        self.moe_hooks = _routing_hooks(self.moe_hooks)


_ORIGINALS: dict[str, Any] = {}


def install_patches() -> None:
    """Install the runtime patches once (idempotent); refuses an easydel other than 0.3.0."""
    import easydel
    from easydel.modules.gpt_oss import modeling_gpt_oss
    from easydel.modules.gpt_oss.gpt_oss_configuration import GptOssConfig

    if _ORIGINALS:
        return
    if easydel.__version__ != EASYDEL_VERSION:
        raise RuntimeError(f"dflash_gptoss.teacher_easydel_fixes targets easydel {EASYDEL_VERSION}, found "
                           f"{easydel.__version__}; re-check every correction (tests/test_teacher_parity.py)")
    _ORIGINALS["get_basic_frequencies"] = GptOssConfig.get_basic_frequencies
    _ORIGINALS["mlp_init"] = modeling_gpt_oss.GptOssMLP.__init__
    GptOssConfig.get_basic_frequencies = _patched_get_basic_frequencies
    modeling_gpt_oss.GptOssMLP.__init__ = _patched_mlp_init


def _iter_state_dict(snapshot_dir: Path):
    """(name, torch tensor) for every weight in the snapshot; MXFP4 expert pairs dequantized."""
    import torch
    from safetensors import safe_open

    from dflash_gptoss.teacher_mxfp4 import dequantize_mxfp4

    for file in sorted(snapshot_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if key.endswith("_scales"):
                    continue
                if key.endswith("_blocks"):
                    base = key[: -len("_blocks")]
                    blocks = f.get_tensor(key).numpy()
                    scales = f.get_tensor(base + "_scales").numpy()
                    yield base, torch.from_numpy(dequantize_mxfp4(blocks, scales))
                    continue
                yield key, f.get_tensor(key)


from dflash_gptoss.mesh import EASYDEL_MESH_AXES  # noqa: E402  (re-exported: the planner and the loaders use it)

"""easydel's mesh axis names; ``dp`` x ``tp`` fill ``(dp, 1, 1, tp, 1)`` (fsdp, ep, sp unused)."""


def lazy_easydel_gptoss(config_dir: str | Path, *, dp: int, tp: int, dtype: str,
                        fixes: frozenset[str] | set[str] = ALL_FIXES, mesh: Any = None):
    """easydel ``GptOssForCausalLM`` with every correction configured, parameters still abstract.

    Only ``config.json`` is read (``lazy_init`` is an ``nnx.eval_shape``: no array is made), so
    both the real load (:func:`load_easydel_gptoss`) and the TPU planner build the model here.
    ``mesh`` (axes :data:`EASYDEL_MESH_AXES`) replaces the mesh easydel would build from
    ``jax.devices()``; it must be set before ``lazy_init``, or easydel silently makes every axis 1.
    """
    import jax
    import jax.numpy as jnp
    from easydel.modules.gpt_oss import GptOssConfig as EdConfig
    from easydel.modules.gpt_oss import GptOssForCausalLM as EdModel
    from flax import nnx

    config_dir = Path(config_dir)
    jdt = jnp.float32 if dtype == "float32" else jnp.bfloat16
    fixes = frozenset(fixes)
    unknown = fixes - ALL_FIXES
    if unknown:
        raise ValueError(f"unknown fixes {sorted(unknown)}; choose from {sorted(ALL_FIXES)}")
    install_patches()
    hf_cfg = json.loads((config_dir / "config.json").read_text())
    ed_cfg = EdConfig.from_pretrained(str(config_dir))
    ed_cfg.add_basic_configurations(sharding_axis_dims=(dp, 1, 1, tp, 1), **config_kwargs(dtype, fixes))
    configure(ed_cfg, hf_cfg, fixes)
    if mesh is not None:
        ed_cfg.set_model_mesh(mesh)
    precision = jax.lax.Precision.HIGHEST if dtype == "float32" else None
    return EdModel.lazy_init(config=ed_cfg, dtype=jdt, param_dtype=jdt, precision=precision, rngs=nnx.Rngs(0))


def load_easydel_gptoss(snapshot_dir: str | Path, *, dp: int, tp: int, dtype: str,
                        fixes: frozenset[str] | set[str] = ALL_FIXES):
    """easydel ``GptOssForCausalLM`` built from a snapshot, weights read from safetensors and sharded.

    ``fixes`` (default: all) selects the corrections; the others keep stock easydel behaviour.
    Weights never go through easydel's torch loader (``torch_load_mode="full"`` builds the torch
    model in float16 unless told otherwise, and cannot read MXFP4 without a GPU kernel): they are
    read tensor by tensor from the safetensors files, MXFP4 experts dequantized exactly, and
    converted with easydel's own name/layout transform and shard functions.
    """
    from easydel.utils.traversals import flatten_dict, merge_model_and_tree, unflatten_dict

    snapshot_dir = Path(snapshot_dir)
    model = lazy_easydel_gptoss(snapshot_dir, dp=dp, tp=tp, dtype=dtype, fixes=fixes)
    # easydel's converter looks shard functions up by FLAT key tuples; ``_shard_fns`` is nested, so
    # passed as is nothing matches and every weight lands unsharded on one device (a TPU chip would
    # have to hold the whole teacher). Flattened, each weight is placed by its partition rule as it
    # is converted (tests/test_tpu_plan.py checks the placement against the TPU planner's).
    transform = model._build_transform_fn(shard_fns=flatten_dict(model._shard_fns))
    params: dict = {}
    for group in _layer_groups(_iter_state_dict(snapshot_dir)):
        params.update(flatten_dict(transform(group, device=None, verbose=False, remove_state_dict=True)))
    return merge_model_and_tree(model, unflatten_dict(params))


def _layer_groups(items):
    """Group (name, tensor) pairs by decoder layer so at most one layer is held as torch tensors."""
    group: dict = {}
    current = None
    for name, tensor in items:
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if group and layer != current:
            yield group
            group = {}
        current = layer
        group[name] = tensor
    if group:
        yield group


def decoder_forward(model, input_ids, layer_ids: tuple[int, ...]):
    """Run easydel's GPT-OSS layer by layer; returns (outputs of ``layer_ids``, logits).

    Mirrors ``easydel.modules.gpt_oss.GptOssModel.__call__`` (easydel 0.3.0) for a plain
    full-sequence forward without cache, but records each chosen layer's OUTPUT (easydel's
    own ``hidden_states`` are layer inputs, and the last layer's raw output is never exposed).
    """
    from easydel.caching import TransformerCache
    from eformer import common_types
    from eformer.escale import apply_logical_sharding
    from ejkernel.types import MaskInfo

    base = model.model
    hidden = base.embed_tokens(input_ids.astype("i4"))
    mask_info = MaskInfo.dynamic_init(input_ids=input_ids, inputs_embeds=hidden)
    position_ids = mask_info.q_position_ids
    cache = TransformerCache.init_empty(len(base.layers))
    hidden = apply_logical_sharding(hidden, dynamic_axes=common_types.HiddenStateSharding,
                                    partition_manager=base.config.partition_manager)
    wanted = set(layer_ids)
    outs: dict[int, Any] = {}
    for idx, block in enumerate(base.layers):
        hidden = block(hidden_states=hidden, mask_info=mask_info, position_ids=position_ids,
                       mode=common_types.MODE_TRAIN, cache_view=cache.views[idx], cache_metadata=None,
                       frequencies=base.frequencies).hidden_states
        if idx in wanted:
            outs[idx] = hidden
    logits = model.apply_lm_head(base.norm(hidden))
    return [outs[i] for i in layer_ids], logits


__all__ = ["ALL_FIXES", "EASYDEL_MESH_AXES", "config_kwargs", "configure", "decoder_forward", "install_patches",
           "lazy_easydel_gptoss", "load_easydel_gptoss"]
