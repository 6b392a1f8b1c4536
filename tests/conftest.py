"""Shared test set-up.

JAX tests need a real 2x4 ``dp`` x ``tp`` mesh on CPU, so 8 host devices are forced
before anything imports jax. The tiny teacher is built once per machine (cached
outside the repo) and shared by every test that needs a real GPT-OSS model.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher_dir() -> Path:
    """The embedded tiny GPT-OSS teacher snapshot (built once per machine, then reused)."""
    from dflash_gptoss.tiny_teacher import ensure_tiny_teacher

    return ensure_tiny_teacher(progress=False)
