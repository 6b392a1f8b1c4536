"""Export the JAX (nnx) draft to a PyTorch draft folder, and load such a folder back into JAX.

The folder is what :meth:`DFlashDraftModel.from_pretrained` (benchmark) and serving engines
read: ``config.json`` written by the SHARED draft config (a transformers ``Qwen3Config`` from
:func:`dflash_gptoss.config.make_draft_config`, never a second config writer) and
``model.safetensors`` with exactly the torch draft's state-dict names and shapes. The expected
names and shapes come from a torch draft built on the ``meta`` device, so a drift between the
two implementations is an error at export time, not at load time on another machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.modeling_gptoss_dflash import WEIGHTS_NAME

_EXPORT_DTYPES = ("float32", "bfloat16")


def torch_name(path: tuple[str, ...]) -> str:
    """nnx parameter path -> torch state-dict name (``kernel`` and ``weight`` both become ``weight``)."""
    return ".".join(path[:-1]) + ".weight"


def _host_array(value: Any) -> np.ndarray:
    """A full float32 host copy of a (possibly sharded, possibly multi-host) array."""
    import jax

    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value, dtype=np.float32)


def _flat_params(model_or_params: Any) -> dict[tuple[str, ...], Any]:
    """``{path: array}`` from an nnx module, an ``nnx.State`` or an already flat mapping."""
    from flax import nnx

    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.state(model_or_params, nnx.Param)
    if isinstance(model_or_params, nnx.State):
        return {tuple(str(p) for p in path): var[...] for path, var in nnx.to_flat_state(model_or_params)}
    if isinstance(model_or_params, Mapping):
        return {tuple(str(p) for p in k) if isinstance(k, tuple) else tuple(k.split("/")): v
                for k, v in model_or_params.items()}
    raise TypeError(f"export needs an nnx draft, an nnx.State or a {{path: array}} mapping, got "
                    f"{type(model_or_params).__name__}")


def expected_torch_shapes(draft_config: Any) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the torch draft for ``draft_config`` (built on ``meta``)."""
    import torch

    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    with torch.device("meta"):
        model = DFlashDraftModel(draft_config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_torch_state(model_or_params: Any, draft_config: Any) -> dict[str, np.ndarray]:
    """float32 torch-layout arrays keyed by torch names; names and shapes checked against torch."""
    state = {}
    for path, value in _flat_params(model_or_params).items():
        array = _host_array(value)
        state[torch_name(path)] = array.T if path[-1] == "kernel" else array
    expected = expected_torch_shapes(draft_config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"nnx draft does not match the torch draft layout: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise ValueError(f"nnx parameter {name!r} has torch-layout shape {state[name].shape}, the torch draft "
                             f"expects {shape}; was the nnx draft built from another draft config?")
    return state


def export_nnx_draft(model_or_params: Any, draft_config: Any, out_dir: str | Path, *,
                     dtype: str = "float32") -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by ``DFlashDraftModel.from_pretrained``."""
    import torch
    from safetensors.torch import save_file

    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} not supported; use one of {_EXPORT_DTYPES}")
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    state = {k: torch.from_numpy(np.array(v, order="C", copy=True)).to(tdtype)
             for k, v in to_torch_state(model_or_params, draft_config).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draft_config.save_pretrained(out)
    save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def load_nnx_draft_from_torch_folder(draft_dir: str | Path, *, dp: int = 1, tp: int = 1, dtype: Any = None,
                                     param_dtype: Any = None, precision: Any = None) -> Any:
    """A sharded nnx draft holding the weights of a torch draft folder (export's inverse).

    Shapes are checked by the torch loader first (clear errors naming the tensor), then the
    weights replace the fresh initialisation parameter by parameter, keeping each one's sharding.
    """
    import jax
    import jax.numpy as jnp
    from transformers import Qwen3Config

    from dflash_gptoss.easydel_dflash_draft_model import create_draft_model, param_variables
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    path = Path(draft_dir).expanduser()
    torch_model = DFlashDraftModel.from_pretrained(path)  # validates folder, names, shapes; reads bf16 too
    state = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
    draft_config = Qwen3Config.from_pretrained(path)
    model = create_draft_model(draft_config, dp=dp, tp=tp, dtype=dtype or jnp.float32,
                               param_dtype=param_dtype or jnp.float32, precision=precision)
    for key, var in param_variables(model):
        array = state[torch_name(key)]
        array = array.T if key[-1] == "kernel" else array
        old = var[...]
        var[...] = jax.device_put(jnp.asarray(array, dtype=old.dtype), old.sharding)
    return model


__all__ = ["expected_torch_shapes", "export_nnx_draft", "load_nnx_draft_from_torch_folder", "to_torch_state"]
