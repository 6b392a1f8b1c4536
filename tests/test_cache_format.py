"""Cache format: bf16 bit patterns, the size formula, the free-space refusal, safe writes.

None of these tests load a teacher: the size refusal must happen before any teacher
work, so the gpt-oss-20b case only needs its real config.json values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from dflash_gptoss.bf16 import from_bf16_bits, to_bf16_bits
from dflash_gptoss.cache_builder import plan_teacher_cache
from dflash_gptoss.cache_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    InsufficientSpaceError,
    array_specs,
    bytes_per_window,
    cache_nbytes,
    check_free_space,
    create_memmaps,
    read_progress,
    write_json_atomic,
    write_progress,
)

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "scripts" / "tpu_dflash_build_teacher_cache.py"

# openai/gpt-oss-20b config.json values that size the cache (no weights needed).
GPTOSS20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "hidden_size": 2880,
    "vocab_size": 201088,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "intermediate_size": 2880,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
}


def test_bf16_round_trip_is_exact_for_every_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    as_f32 = from_bf16_bits(bits)
    nan = np.isnan(as_f32)
    assert nan.sum() == 2 * 127  # NaN payloads (both signs); their float32 values stay NaN
    np.testing.assert_array_equal(to_bf16_bits(as_f32[~nan]), bits[~nan])


def test_bf16_rounding_matches_ml_dtypes_nearest_even() -> None:
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100
    np.testing.assert_array_equal(to_bf16_bits(x), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    # a bf16 input is stored as-is (what the teacher returns with dtype="bfloat16")
    np.testing.assert_array_equal(to_bf16_bits(x.astype(ml_dtypes.bfloat16)), to_bf16_bits(x))


@pytest.mark.parametrize("layout", ["blocks", "windows"])
def test_size_formula_matches_the_files_on_disk(tmp_path: Path, layout: str) -> None:
    dims = dict(num_windows=7, ctx_len=12, block_size=4, num_context_features=3, hidden_size=16)
    specs = array_specs(layout, **dims)
    per_window = 12 * 3 * 16 * 2 + (16 * 2 + 4 * 4 if layout == "blocks" else 12 * (4 * 2 + 1)) + 8
    assert bytes_per_window(specs) == per_window
    arrays = create_memmaps(tmp_path, specs)
    for a in arrays.values():
        a.flush()
    on_disk = sum((tmp_path / s.file).stat().st_size for s in specs.values())
    assert on_disk - sum(s.nbytes for s in specs.values()) <= 128 * len(specs)  # headers only
    assert on_disk <= cache_nbytes(layout, **dims) <= on_disk + 64 * 1024 + 128 * len(specs)


def test_seed_example_size_at_gptoss20b_scale() -> None:
    n = cache_nbytes("blocks", num_windows=4096, ctx_len=4096, block_size=8, num_context_features=4, hidden_size=2880)
    features = 4096 * 4096 * 4 * 2880 * 2
    assert features == 386_547_056_640
    assert features < n < features + 30_000_000  # + anchors (24 MB), ids, offsets, headers
    windows = cache_nbytes(
        "windows", num_windows=4096, ctx_len=4096, block_size=8, num_context_features=4, hidden_size=2880
    )
    assert windows < n + 4096 * 4096 * 8  # same features; per-position ids instead of anchors


def test_check_free_space_message_has_formula_and_numbers(tmp_path: Path) -> None:
    with pytest.raises(InsufficientSpaceError) as e:
        check_free_space(tmp_path, 5000, layout="blocks", details="1 * (...) = 5000 bytes", free_bytes=1000)
    msg = str(e.value)
    assert "5000 bytes" in msg and "1000 bytes" in msg and "ctx_len*K*H*2" in msg
    assert check_free_space(tmp_path, 5000, layout="blocks", details="", free_bytes=10_000) == 10_000
    # bytes an existing cache frees/reuses count as available
    check_free_space(tmp_path, 5000, layout="blocks", details="", free_bytes=1000, reclaimable=4000)


def _gptoss20b_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    snap = tmp_path / "gpt-oss-20b"
    snap.mkdir()
    (snap / "config.json").write_text(json.dumps(GPTOSS20B_CONFIG))
    data = tmp_path / "data.jsonl"
    ids = np.random.default_rng(0).integers(0, 200000, size=5000).tolist()
    data.write_text(json.dumps({"input_ids": ids}) + "\n")
    return snap, data


def test_seed_example_at_gptoss20b_size_is_refused_before_teacher_work(tmp_path: Path) -> None:
    snap, data = _gptoss20b_snapshot(tmp_path)
    with pytest.raises(InsufficientSpaceError) as e:
        plan_teacher_cache(
            snap,
            tmp_path / "cache",
            ctx_len=4096,
            block_size=8,
            num_context_features=4,
            num_blocks=4096,
            batch_size=4,
            data=data,
            free_bytes=50 * 10**9,
        )
    msg = str(e.value)
    assert "386.6 GB" in msg and "50.0 GB" in msg and "4096 * (4096*4*2880*2 + 2880*2 + 8*4 + 8) + headers" in msg
    assert not (tmp_path / "cache").exists()


def test_cli_refuses_gptoss20b_example_with_exit_2_and_no_jax(tmp_path: Path) -> None:
    """A real subprocess: one error line, exit code 2, no traceback, jax never imported."""
    snap, data = _gptoss20b_snapshot(tmp_path)
    probe = (
        "import runpy, sys; sys.argv = sys.argv[1:]\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('JAX_IMPORTED' if 'jax' in sys.modules else 'NO_JAX', file=sys.stderr); raise\n"
    )
    args = [
        str(CLI),
        "--model-snapshot-dir",
        str(snap),
        "--ctx-len",
        "4096",
        "--block-size",
        "8",
        "--num-context-features",
        "4",
        "--num-blocks",
        "4096",
        "--batch-size",
        "4",
        "--out-dir",
        str(tmp_path / "cache"),
        "--data",
        str(data),
        "--assume-free-bytes",
        str(10**9),
    ]
    r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("error: the cache needs 386.6 GB"), r.stderr
    assert "Traceback" not in r.stderr and lines[-1] == "NO_JAX"


def test_write_json_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2, "format": FORMAT_NAME, "format_version": FORMAT_VERSION})
    assert json.loads(path.read_text())["a"] == 2
    assert sorted(os.listdir(tmp_path)) == ["meta.json"]


def test_progress_checkpoint_round_trip(tmp_path: Path) -> None:
    assert read_progress(tmp_path) == 0
    write_progress(tmp_path, 6, 10)
    assert read_progress(tmp_path) == 6
