"""The benchmark CLI end to end on the tiny teacher, and the Modal app's wiring (no network)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import dflash_benchmark  # noqa: E402


def test_cli_oracle_writes_a_complete_report(tiny_teacher_dir, tmp_path):
    code = dflash_benchmark.main([
        "--target", str(tiny_teacher_dir), "--draft", "oracle", "--num-prompts", "3", "--max-new-tokens", "40",
        "--block-size", "8", "--out-dir", str(tmp_path), "--no-warmup",
    ])
    assert code == 0
    [json_file] = tmp_path.glob("bench_*.json")
    assert (tmp_path / f"{json_file.stem}_acceptance.png").stat().st_size > 0
    report = json.loads(json_file.read_text())
    assert report["teacher"].startswith("tiny GPT-OSS teacher")
    assert report["lossless_all"] and report["lossless_prompts"] == 3
    # 40 tokens: 1 from prefill, then 39 = 4 full blocks of 8 + a last block of 7.
    assert report["acceptance_hist"] == {"7": 3, "8": 12}
    assert report["target_forwards_per_token"] == pytest.approx(6 / 40)
    assert report["baseline_target_forwards_per_token"] == 1.0
    for key in ("speedup_mean", "acceptance_mean", "acceptance_median", "acceptance_p90", "prefill_s_mean",
                "baseline_tokens_per_s", "dflash_tokens_per_s", "device", "settings"):
        assert key in report
    assert all(row["dflash"]["new_tokens"] == 40 for row in report["per_prompt"])


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys):
    assert dflash_benchmark.main(["--target", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert dflash_benchmark.main(["--target", "tiny", "--block-size", "1", "--out-dir", str(tmp_path)]) == 2
    assert "--block-size must be >= 2" in capsys.readouterr().err
    assert dflash_benchmark.main(["--target", "tiny", "--max-new-tokens", "0", "--out-dir", str(tmp_path)]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def test_modal_app_builds_without_network():
    modal = pytest.importorskip("modal")
    spec = importlib.util.spec_from_file_location("modal_bench", REPO / "modal" / "dflash_gptoss20b_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.app.name == "dflash-gptoss20b-benchmark"
    assert module.MODEL_ID == "openai/gpt-oss-20b"
    assert isinstance(module.benchmark, modal.Function)
