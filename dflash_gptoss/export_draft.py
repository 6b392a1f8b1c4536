"""Export the JAX (nnx) draft to a PyTorch draft folder, and load such a folder back into JAX.

The folder is what :meth:`DFlashDraftModel.from_pretrained` (benchmark), serving engines and
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` read. It is written by the torch
draft's own ``save_pretrained`` (transformers'), so a JAX export and a torch save are the same
kind of folder: ``config.json`` from the SHARED draft config
(:func:`dflash_gptoss.draft_config.make_draft_config`; never a second config writer, legacy RoPE keys
included), ``model.safetensors`` with exactly the torch draft's state-dict names and shapes, and
``auto_map`` + the two self-contained code files. The expected names and shapes come from a torch
draft built on the ``meta`` device, so a drift between the two implementations is an error at
export time, not at load time on another machine.

Never half-written: the folder is written beside the target under a temporary name and renamed
into place (a killed export leaves a hidden ``.<name>.tmp-*`` folder, never a target that looks
complete). A target that exists and is not a draft is refused up front by
:func:`check_export_dir`, cheap enough for a trainer's pre-flight checks (no torch, no JAX).
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.run_safety.preflight import OutputPathError, check_output_dir

_EXPORT_DTYPES = ("float32", "bfloat16")


class ExportDirError(OutputPathError):
    """The export folder cannot be written (the message names the path and the fix)."""


def check_export_dir(out_dir: str | Path) -> Path:
    """Pre-flight check of an export target: where a draft may be written, or :class:`ExportDirError`.

    Accepted: a path that does not exist yet (under a writable folder), an empty folder, or an
    earlier DFlash draft folder (replaced as a whole). Refused: a file, a folder holding anything
    else (overwriting it would destroy data that is not a draft), a place where no file can be created
    (``preflight``'s real write probe: permission bits say nothing for root or a read-only mount).
    Costs a few ``stat`` calls and one probe file; no torch, no JAX.
    """
    out = Path(out_dir).expanduser()
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ExportDirError(f"export folder {str(out)!r} is a file, not a folder; pass a new folder path.")
    if out.is_dir() and any(out.iterdir()) and not _is_draft_folder(out):
        raise ExportDirError(f"export folder {str(out)!r} exists and is not a DFlash draft (no config.json with a "
                             "dflash_config); refusing to replace it: pass a new folder, or move that one away.")
    try:
        check_output_dir(out.parent, "export folder parent")  # the temporary folder is made beside ``out``
    except OutputPathError as e:
        raise ExportDirError(f"export folder {str(out)!r} cannot be written: {e}") from e
    return out


def _is_draft_folder(path: Path) -> bool:
    config_file = path / "config.json"
    if not config_file.is_file():
        return False
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    from dflash_gptoss.configuration_gptoss_dflash import is_draft_config_dict

    return isinstance(raw, dict) and is_draft_config_dict(raw)


def write_folder_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary folder beside ``out_dir``, which is then renamed into place.

    If ``write`` raises, the temporary folder is removed and ``out_dir`` is untouched. An existing
    ``out_dir`` (checked by :func:`check_export_dir`) is moved aside, replaced, then deleted.
    """
    out = check_export_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():
            old.rename(out)  # put the earlier draft back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def remove_leftovers(out: Path) -> list[Path]:
    """Remove the hidden ``.<export>.tmp-*`` / ``.<export>.old-*`` folders a killed export left beside ``out``
    (each up to a draft's size), saying so in one line; returns what was removed."""
    left = sorted(p for p in out.parent.glob(f".{out.name}.*-*")
                  if p.is_dir() and p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-")))
    for p in left:
        shutil.rmtree(p, ignore_errors=True)
    if left:
        logging.getLogger(__name__).warning(
            f"removed {len(left)} folder(s) left beside {out} by an export that was killed: "
            + ", ".join(p.name for p in left))
    return left


def torch_name(path: tuple[str, ...]) -> str:
    """nnx parameter path -> torch state-dict name (``kernel`` and ``weight`` both become ``weight``)."""
    return ".".join(path[:-1]) + ".weight"


def _host_array(value: Any) -> np.ndarray:
    """A full float32 host copy of a (possibly sharded, possibly multi-host) array."""
    from dflash_gptoss.distributed import gather_to_host

    return np.asarray(gather_to_host(value), dtype=np.float32)


def _flat_params(model_or_params: Any) -> dict[tuple[str, ...], Any]:
    """``{path: array}`` from an nnx module, an ``nnx.State`` or an already flat mapping."""
    from flax import nnx

    from dflash_gptoss.easydel_dflash_draft_model import param_arrays

    if isinstance(model_or_params, nnx.Module | nnx.State):
        return param_arrays(model_or_params)
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
    check_finite(state)
    return state


class NonFiniteWeightsError(ValueError):
    """A draft whose parameters hold NaN or Inf: it is never written (the message names the parameters)."""


def check_finite(state: Mapping[str, np.ndarray]) -> None:
    """Refuse NaN/Inf parameters, naming the first ones and how many values each holds."""
    bad = {name: int(np.size(a) - np.isfinite(a).sum()) for name, a in state.items() if not np.isfinite(a).all()}
    if bad:
        named = ", ".join(f"{name} ({n} of {np.size(state[name])} values)" for name, n in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteWeightsError(f"the draft's parameters are not finite: {named}{more} hold NaN or Inf; "
                                    "nothing was exported. Training diverged or learned from non-finite features: "
                                    "export an earlier checkpoint, or retrain with a lower --learning-rate.")


def torch_draft_from_state(draft_config: Any, state: Mapping[str, Any]) -> Any:
    """A torch ``DFlashDraftModel`` holding ``state`` (torch tensors, by name) without a second copy.

    Built on ``meta`` and given the tensors themselves (``assign``), so exporting a 0.8B draft does
    not first allocate and randomly initialise 0.8B parameters. The config is copied: saving
    records ``dtype``/``architectures``/``auto_map`` in the model's config, not the caller's.
    """
    import torch

    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    with torch.device("meta"):
        model = DFlashDraftModel(copy.deepcopy(draft_config))
    model.load_state_dict(dict(state), strict=True, assign=True)
    return model.eval()


def export_nnx_draft(model_or_params: Any, draft_config: Any, out_dir: str | Path, *, dtype: str = "float32",
                     before_commit: Callable[[Path], None] | None = None) -> Path:
    """Write a draft folder (``DFlashDraftModel.save_pretrained``'s) from the nnx draft, atomically.

    ``before_commit(tmp_folder)`` runs on the complete folder before it is renamed into place
    (e.g. a check that the torch draft reproduces the JAX one, writing its report there); if it
    raises, nothing is left at ``out_dir``.
    """
    import torch

    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} not supported; use one of {_EXPORT_DTYPES}")
    check_export_dir(out_dir)  # before gathering weights: a refused target costs nothing
    tdtype = torch.float32 if dtype == "float32" else torch.bfloat16
    state = {k: torch.from_numpy(np.array(v, order="C", copy=True)).to(tdtype)
             for k, v in to_torch_state(model_or_params, draft_config).items()}
    model = torch_draft_from_state(draft_config, state)

    def write(tmp: Path) -> None:
        try:
            model.save_pretrained(tmp)
        except Exception as e:  # safetensors reports a full disk as its own error type, naming no file
            if "No space left" in str(e) or "StorageFull" in str(e):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors")) from e
            raise
        if before_commit is not None:
            before_commit(tmp)

    return write_folder_atomically(out_dir, write)


def load_nnx_draft_from_torch_folder(draft_dir: str | Path, *, dp: int = 1, tp: int = 1, dtype: Any = None,
                                     param_dtype: Any = None, precision: Any = None) -> Any:
    """A sharded nnx draft holding the weights of a torch draft folder (export's inverse).

    Shapes are checked by the torch loader first (clear errors naming the tensor), then the
    weights replace the fresh initialisation parameter by parameter, keeping each one's sharding.
    A draft with attention biases is refused by :func:`create_draft_model` (the JAX draft has none).
    """
    import jax
    import jax.numpy as jnp

    from dflash_gptoss.easydel_dflash_draft_model import create_draft_model, param_variables
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    path = Path(draft_dir).expanduser()
    torch_model = DFlashDraftModel.from_pretrained(path)  # validates folder, names, shapes; reads bf16 too
    state = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
    model = create_draft_model(torch_model.config, dp=dp, tp=tp, dtype=dtype or jnp.float32,
                               param_dtype=param_dtype or jnp.float32, precision=precision)
    for key, var in param_variables(model):
        array = state[torch_name(key)]
        array = array.T if key[-1] == "kernel" else array
        old = var[...]
        var[...] = jax.device_put(jnp.asarray(array, dtype=old.dtype), old.sharding)
    return model


__all__ = [
    "ExportDirError", "NonFiniteWeightsError", "check_export_dir", "check_finite", "expected_torch_shapes",
    "export_nnx_draft", "load_nnx_draft_from_torch_folder", "to_torch_state", "torch_draft_from_state",
    "write_folder_atomically",
]
