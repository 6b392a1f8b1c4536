"""The closing report of an end-to-end run reads the steps' own outputs and adds them up right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dflash_gptoss.benchmark.pipeline_report import summary_table, write_pipeline_report


def test_report_joins_benchmark_training_and_timings(tmp_path: Path) -> None:
    bench = {
        "teacher": "tiny GPT-OSS teacher (embedded default, not gpt-oss-20b)", "device": "CPU", "dtype": "float32",
        "settings": {"num_prompts": 2, "max_new_tokens": 16, "block_size": 8, "repeats": 3},
        "lossless_prompts": 2, "lossless_all": True, "acceptance_mean": 4.25, "acceptance_median": 4.0,
        "acceptance_p90": 8.0, "target_forwards_per_token": 0.235, "baseline_tokens_per_s": 100.0,
        "dflash_tokens_per_s": 300.0, "speedup_mean": 3.0, "speedup": 2.5,
        "speedup_per_prompt": {"median": 2.4, "q1": 2.1, "q3": 2.7, "iqr": 0.6, "min": 2.0, "max": 3.0},
        "noisy": False, "noise": {"threshold": 0.1, "max_spread": 0.04}, "step_costs": {"loop_efficiency": 0.9},
    }
    # 40 steps: the last 5% (2 steps) have loss 1 and 3, accepted lengths 5 and 7.
    history = [{"step": i + 1, "loss": 9.0, "mean_accept_len": 1.0, "expected_accept_len": 1.0} for i in range(38)]
    history += [{"step": 39, "loss": 1.0, "mean_accept_len": 5.0, "expected_accept_len": 4.0},
                {"step": 40, "loss": 3.0, "mean_accept_len": 7.0, "expected_accept_len": 4.0}]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    evals = [{"step": k, "eval_loss": 5.0 - k / 10, "eval_accept_len_mean": m, "eval_accept_len_median": 2.0,
              "eval_accept_len_p90": 6.0, "eval_seconds": 0.5} for k, m in ((1, 1.0), (20, 3.5), (40, 3.25))]
    check = {"torch_accept_len_mean": 3.5, "jax_accept_len_mean": 3.5, "num_anchors": 64, "blocks_from": "held-out",
             "passed": True}
    (tmp_path / "train.json").write_text(json.dumps({
        "final_step": 40, "history": history, "eval_history": evals, "best_eval_step": 20, "exported_step": 20,
        "exported_from": "best held-out evaluation", "export_check": check}))
    summary, paths = write_pipeline_report(tmp_path / "bench.json", tmp_path / "train.json",
                                           {"cache": 60, "train": 240.4}, tmp_path / "out", "run")
    assert summary["training_final_loss"] == 2.0 and summary["training_mean_accept_len"] == 6.0
    assert summary["wall_seconds_total"] == 300.4
    assert [p.name for p in paths] == ["run_pipeline.json", "run_training.png"]
    assert json.loads(paths[0].read_text())["summary"] == summary
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(summary_table(summary))
    assert "4.25 / 4.0 / 8.0" in table and "2/2 prompts" in table and "total 5.0 min" in table
    # The headline is the benchmark's total-decode-time speedup, with its spread and noise beside it.
    assert ("| speedup (total decode time) | **2.50x**; per prompt median 2.40x, IQR 2.10-2.70x; median of 3 "
            "interleaved repeats, repeats within 4%; loop efficiency 0.90 |") in table
    assert summary["speedup_mean"] == 3.0  # kept for continuity, not the headline
    # The held-out curve's last and best points, and the export check, as the steps wrote them.
    assert summary["eval_last"]["step"] == 40 and summary["eval_best"]["eval_accept_len_mean"] == 3.5
    assert summary["eval_seconds_total"] == 1.5 and summary["export_check"] == check
    assert ("last step 40: 3.25 / 2 / 6 (loss 1.000); best step 20: 3.50 / 2 / 6 (loss 3.000); 3 evaluations "
            "took 2s") in table
    assert "step 20 (best held-out evaluation): accepted length 3.500 (torch) vs 3.500 (JAX) on 64 held-out" in table

    # A benchmark JSON from before repeats/medians is refused by name, not with a KeyError.
    old = {k: v for k, v in bench.items() if k not in ("speedup", "noise")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"old\.json: the benchmark JSON has no 'speedup'/'noise'"):
        write_pipeline_report(tmp_path / "old.json", tmp_path / "train.json", {}, tmp_path / "out", "old")
    assert not (tmp_path / "out" / "old_pipeline.json").exists()

    # The report's stem is taken exclusively: a second report under the same name is refused, the first kept.
    from dflash_gptoss.run_safety.preflight import OutputPathError

    before = paths[0].read_text()
    with pytest.raises(OutputPathError, match=r"--name run_pipeline: .*run_pipeline\.json already holds an earlier"):
        write_pipeline_report(tmp_path / "bench.json", tmp_path / "train.json", {}, tmp_path / "out", "run")
    assert paths[0].read_text() == before
