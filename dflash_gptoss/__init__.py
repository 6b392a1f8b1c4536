"""dflash_gptoss: DFlash block-diffusion draft models for GPT-OSS.

Importing the package is cheap on purpose: torch, transformers, jax and easydel are imported only
by the modules that need them. The public classes are exported lazily: ``dflash_gptoss.DFlashDraftModel``
imports ``modeling_gptoss_dflash`` (and torch) on first use, not before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DFlashDraftConfig": "configuration_gptoss_dflash",
    "DFlashDraftModel": "modeling_gptoss_dflash",
    "DFlashDraftNNX": "easydel_dflash_draft_model",
    "DFlashCacheDataset": "easydel_dflash_cache",
    "DFlashTrainer": "easydel_dflash_trainer",
    "DFlashTrainingSettings": "train_settings",
    "CacheBuildSettings": "cache_settings",
    "JaxTeacher": "teacher_jax",
    "DFlashDrafter": "decoding",
    "Sampling": "decoding",
    "baseline_decode": "decoding",
    "speculative_decode": "decoding",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
