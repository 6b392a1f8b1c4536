"""The closing report of an end-to-end run reads the steps' own outputs and adds them up right."""

from __future__ import annotations

import json
from pathlib import Path

from dflash_gptoss.pipeline_report import summary_table, write_pipeline_report


def test_report_joins_benchmark_training_and_timings(tmp_path: Path) -> None:
    bench = {
        "teacher": "tiny GPT-OSS teacher (embedded default, not gpt-oss-20b)", "device": "CPU", "dtype": "float32",
        "settings": {"num_prompts": 2, "max_new_tokens": 16, "block_size": 8},
        "lossless_prompts": 2, "lossless_all": True, "acceptance_mean": 4.25, "acceptance_median": 4.0,
        "acceptance_p90": 8.0, "target_forwards_per_token": 0.235, "baseline_tokens_per_s": 100.0,
        "dflash_tokens_per_s": 300.0, "speedup_mean": 3.0,
    }
    # 40 steps: the last 5% (2 steps) have loss 1 and 3, accepted lengths 5 and 7.
    history = [{"step": i + 1, "loss": 9.0, "mean_accept_len": 1.0, "expected_accept_len": 1.0} for i in range(38)]
    history += [{"step": 39, "loss": 1.0, "mean_accept_len": 5.0, "expected_accept_len": 4.0},
                {"step": 40, "loss": 3.0, "mean_accept_len": 7.0, "expected_accept_len": 4.0}]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    (tmp_path / "train.json").write_text(json.dumps({"final_step": 40, "history": history}))
    summary, paths = write_pipeline_report(tmp_path / "bench.json", tmp_path / "train.json",
                                           {"cache": 60, "train": 240.4}, tmp_path / "out", "run")
    assert summary["training_final_loss"] == 2.0 and summary["training_mean_accept_len"] == 6.0
    assert summary["wall_seconds_total"] == 300.4
    assert [p.name for p in paths] == ["run_pipeline.json", "run_training.png"]
    assert json.loads(paths[0].read_text())["summary"] == summary
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = "\n".join(summary_table(summary))
    assert "4.25 / 4.0 / 8.0" in table and "2/2 prompts" in table and "total 5.0 min" in table
