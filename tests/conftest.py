"""Shared test set-up.

JAX tests need a real 2x4 ``dp`` x ``tp`` mesh on CPU, so 8 host devices are forced
before anything imports jax. The tiny teacher is built once per machine (cached
outside the repo) and shared by every test that needs a real GPT-OSS model.

Tiers: ``bash scripts/test.sh`` runs everything; ``bash scripts/test.sh -m "not slow"`` is the
quick tier. A test is ``slow`` when it is marked so or when it needs the tiny teacher (building it
takes minutes on a fresh machine), so the quick tier never builds it.
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


SLOW_FIXTURES = {"tiny_teacher_dir"}
"""Fixtures that make a test slow wherever they are used (directly or through another fixture)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
