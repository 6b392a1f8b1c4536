"""The benchmark CLI end to end on the tiny teacher, its arithmetic, its checks before work, and the Modal app's wiring.

No assertion here is about how fast anything ran (timings on a shared CI machine are noise);
they are about what was run, in which order, and whether the report's figures are the
stated functions of the timings it recorded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss.benchmark import stats as bench_stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import dflash_benchmark  # noqa: E402


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The benchmark's CPU setting for the tests that time forwards directly (and back after)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if the target's weights are loaded: the checks under test must come before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the target was loaded before the bad input was refused")

    monkeypatch.setattr("dflash_gptoss.teacher_torch.load_target", refuse)


def _run_order(report: dict) -> list[tuple[int, int, str]]:
    """(repeat, prompt, loop) of every timed loop call, in the order the run started them."""
    starts = []
    for row in report["per_prompt"]:
        for entry in row["schedule"]:
            starts.append((entry["baseline_start_s"], entry["repeat"], row["prompt_index"], "baseline"))
            starts.append((entry["dflash_start_s"], entry["repeat"], row["prompt_index"], "dflash"))
    return [tuple(rest) for _, *rest in sorted(starts)]


def test_cli_oracle_interleaves_repeats_and_reports_medians(tiny_teacher_dir, tmp_path):
    code = dflash_benchmark.main([
        "--target", str(tiny_teacher_dir), "--draft", "oracle", "--num-prompts", "3", "--max-new-tokens", "40",
        "--block-size", "8", "--repeats", "3", "--out-dir", str(tmp_path), "--no-warmup",
    ])
    assert code == 0
    [json_file] = tmp_path.glob("bench_*.json")
    assert (tmp_path / f"{json_file.stem}_acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp"))
    report = json.loads(json_file.read_text())
    assert report["teacher"].startswith("tiny GPT-OSS teacher")
    assert report["settings"]["repeats"] == 3 and report["settings"]["cpu_threads"] == 1

    # Interleaved: 3 passes; in each, prompt by prompt, baseline then DFlash.
    assert _run_order(report) == [(r, p, loop) for r in range(3) for p in range(3) for loop in ("baseline", "dflash")]

    # Lossless on every repeat, and the oracle's acceptance is exact (40 tokens: 1 from prefill, then
    # 39 = 4 full blocks of 8 + a last block of 7), the same on every repeat.
    assert report["lossless_all"] and report["lossless_prompts"] == 3
    assert all(row["mismatched_repeats"] == [] for row in report["per_prompt"])
    assert report["acceptance_hist"] == {"7": 3, "8": 12} and report["acceptance_same_every_repeat"]
    assert report["target_forwards_per_token"] == pytest.approx(6 / 40)
    assert report["baseline_target_forwards_per_token"] == 1.0

    # Every figure is the stated function of the recorded repeats (recomputed here with numpy).
    ratios = []
    for row in report["per_prompt"]:
        for loop in ("baseline", "dflash"):
            stats = row[loop]
            assert len(stats["decode_s_repeats"]) == 3 and stats["new_tokens"] == 40
            assert stats["decode_s"] == np.median(stats["decode_s_repeats"])
            assert stats["prefill_s"] == np.median(stats["prefill_s_repeats"])
            times = stats["decode_s_repeats"]
            assert stats["decode_spread"] == pytest.approx((max(times) - min(times)) / np.median(times), rel=1e-12)
        assert row["decode_speedup"] == row["baseline"]["decode_s"] / row["dflash"]["decode_s"]
        assert row["noisy"] == (max(row["baseline"]["decode_spread"], row["dflash"]["decode_spread"]) > 0.10)
        ratios.append(row["decode_speedup"])
    rows = report["per_prompt"]
    assert report["speedup"] == pytest.approx(
        sum(r["baseline"]["decode_s"] for r in rows) / sum(r["dflash"]["decode_s"] for r in rows), rel=1e-12)
    per = report["speedup_per_prompt"]
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    assert (per["q1"], per["median"], per["q3"]) == pytest.approx((q1, median, q3), rel=1e-12)
    assert report["noisy"] == any(r["noisy"] for r in rows)
    assert report["noise"]["noisy_prompts"] == [r["prompt_index"] for r in rows if r["noisy"]]
    assert report["speedup_mean"] == pytest.approx(statistics.fmean(r["end_to_end_speedup"] for r in rows))

    costs = report["step_costs"]
    assert costs["drafter"] == "oracle" and costs["block_size"] == 8 and costs["repeats"] == 3 * 10  # 10 per pass
    # cost context: mean prompt (64) + half the new tokens (20)
    assert costs["context_len"] == 64 + 20
    assert min(costs["target_forward_1_token_s"], costs["target_verify_block_s"], costs["draft_propose_s"]) > 0
    assert costs["accepted_length_mean"] == report["acceptance_mean"] == pytest.approx(117 / 15)  # 3 x (4x8 + 7)
    allowed = costs["accepted_length_mean"] * costs["target_forward_1_token_s"] / (
        costs["target_verify_block_s"] + costs["draft_propose_s"])
    assert costs["modelled_speedup"] == pytest.approx(allowed, rel=1e-12)
    assert costs["loop_efficiency"] == pytest.approx(report["speedup"] / allowed, rel=1e-12)


def test_noise_spread_and_quartiles_arithmetic():
    # Spread is (max - min) / median; binary-exact values keep the boundary exact.
    assert bench_stats.spread([1.0, 1.0, 1.125]) == 0.125
    assert bench_stats.spread([2.0, 1.0, 1.0625]) == pytest.approx(1.0 / 1.0625)
    assert bench_stats.spread([1.0]) is None  # one repeat: nothing to compare
    with pytest.raises(ValueError, match="positive"):
        bench_stats.spread([0.0, 0.0])
    # Noisy when any spread is ABOVE the threshold; an unmeasurable spread neither flags nor clears a run.
    assert bench_stats.is_noisy([0.0625, 0.09375]) is False
    assert bench_stats.is_noisy([0.0625, None, 0.125]) is True
    assert bench_stats.is_noisy([0.125], threshold=0.125) is False
    assert bench_stats.is_noisy([None, None]) is None
    assert bench_stats.NOISE_THRESHOLD == 0.10
    # Quartiles agree with numpy's default (linear) percentile.
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 7, 20):
        values = rng.uniform(0.5, 10.0, n).tolist()
        summary = bench_stats.ratio_summary(values)
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        assert (summary["q1"], summary["median"], summary["q3"]) == pytest.approx((q1, median, q3), rel=1e-12)
        assert summary["iqr"] == pytest.approx(q3 - q1, abs=1e-12)
        assert (summary["min"], summary["max"]) == (min(values), max(values))


def _ids_file(path: Path, lengths: list[int]) -> Path:
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"input_ids": rng.integers(5, 4000, n).tolist()}) + "\n" for n in lengths))
    return path


def test_position_limit_refused_before_model_work_and_exact_limit_runs(tiny_teacher_dir, tmp_path, capsys,
                                                                       monkeypatch):
    # The tiny teacher has max_position_embeddings=2048; a 2040-token prompt leaves room for 9 new tokens
    # (positions 0..2040+9-2 = 2047). The longest prompt is the one named.
    argv = ["--target", str(tiny_teacher_dir), "--draft", "oracle", "--repeats", "1", "--no-warmup",
            "--out-dir", str(tmp_path / "out")]
    two = _ids_file(tmp_path / "two.jsonl", [100, 2040])
    with monkeypatch.context() as mp:
        mp.setattr("dflash_gptoss.teacher_torch.load_target",
                   lambda *a, **k: pytest.fail("target loaded before refusal"))
        assert dflash_benchmark.main([*argv, "--prompts-file", str(two), "--max-new-tokens", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: prompt 1 has 2040 tokens; with --max-new-tokens 10 the loops would feed "
                          "positions up to 2048, but the target has max_position_embeddings=2048")
    assert "Use --max-new-tokens <= 9 with these prompts" in err and err.count("\n") == 1
    assert not list((tmp_path / "out").glob("*.json"))

    one = _ids_file(tmp_path / "one.jsonl", [2040])  # one long prompt: a 2040-token prefill is slow on CPU
    assert dflash_benchmark.main([*argv, "--prompts-file", str(one), "--max-new-tokens", "9"]) == 0
    [report_file] = (tmp_path / "out").glob("bench_*.json")
    report = json.loads(report_file.read_text())
    assert report["lossless_all"] and report["settings"]["max_position_embeddings"] == 2048
    assert [row["dflash"]["new_tokens"] for row in report["per_prompt"]] == [9]
    assert report["noisy"] is None  # one repeat: the noise is unknown, and said so
    # Costs are timed mid-decode (2040 + 9 // 2 = 2044), clamped so a block of 8 fits in 2048 positions.
    assert report["step_costs"]["context_len"] == 2048 - 8
    assert "noise: unknown (1 repeat" in capsys.readouterr().out


def test_output_paths_checked_before_model_work(tmp_path, capsys, no_model_loads):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me\n")
    cases = [
        (["--out-dir", str(a_file)], f"error: --out-dir {a_file} exists and is not a folder"),
        (["--out-dir", str(a_file / "sub")], f"error: --out-dir {a_file / 'sub'}: {a_file} is a file"),
        (["--out-dir", str(tmp_path / "out"), "--report-name", "x/y"], "error: --report-name 'x/y' must be a plain"),
    ]
    (tmp_path / "out2" / "taken.json").mkdir(parents=True)
    cases.append((["--out-dir", str(tmp_path / "out2"), "--report-name", "taken"],
                  f"error: --out-dir/--report-name: {tmp_path / 'out2' / 'taken.json'} is a folder"))
    for extra, message in cases:
        assert dflash_benchmark.main(["--target", "tiny", "--draft", "oracle", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert a_file.read_text() == "keep me\n"


def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, no_model_loads):
    assert dflash_benchmark.main(["--target", str(tmp_path / "missing"), "--out-dir", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert dflash_benchmark.main(["--target", "tiny", "--block-size", "1", "--out-dir", str(tmp_path)]) == 2
    assert "--block-size must be >= 2" in capsys.readouterr().err
    assert dflash_benchmark.main(["--target", "tiny", "--max-new-tokens", "1", "--out-dir", str(tmp_path)]) == 2
    assert "--max-new-tokens must be >= 2" in capsys.readouterr().err
    assert dflash_benchmark.main(["--target", "tiny", "--draft", str(tmp_path / "nodraft"),
                                  "--out-dir", str(tmp_path)]) == 2
    assert f"--draft '{tmp_path / 'nodraft'}' is not a folder" in capsys.readouterr().err
    for flag in ("--repeats", "--cpu-threads"):
        with pytest.raises(SystemExit) as exit_info:
            dflash_benchmark.parse_args([flag, "0"])
        assert exit_info.value.code == 2
        assert f"argument {flag}: 0 must be >= 1" in capsys.readouterr().err


def test_measure_costs_times_the_real_forwards(tiny_teacher_dir):
    import torch

    from dflash_gptoss.benchmark.decode_costs import measure_costs, modelled_speedup
    from dflash_gptoss.draft_config import make_draft_config
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
    from dflash_gptoss.teacher_torch import load_target

    target = load_target(tiny_teacher_dir)
    torch.manual_seed(0)
    config = make_draft_config(target.config, num_hidden_layers=1, block_size=4, mask_token_id=3,
                               num_context_features=3)
    draft = DFlashDraftModel(config).eval()
    costs = measure_costs(target, draft, context_len=48, repeats=3)
    assert (costs["drafter"], costs["block_size"], costs["context_len"], costs["repeats"]) == ("dflash", 4, 48, 3)
    assert min(costs["target_forward_1_token_s"], costs["target_verify_block_s"], costs["draft_propose_s"]) > 0
    # The modelled speedup is linear in the accepted length: a * t_step / (t_verify + t_draft).
    by_length = costs["modelled_speedup_by_accepted_length"]
    assert list(by_length) == ["1", "2", "3", "4"]
    for a in range(1, 5):
        assert by_length[str(a)] == pytest.approx(a * by_length["1"], rel=1e-12)
        assert modelled_speedup(costs, a) == pytest.approx(by_length[str(a)], rel=1e-12)
    for bad in (4, 2046):  # no room for the context before a block / for a block within 2048 positions
        with pytest.raises(ValueError, match="context_len must be in"):
            measure_costs(target, draft, context_len=bad, repeats=1)
    assert all(not layer._forward_hooks for layer in target.model.layers)  # every hook removed again


def test_decode_costs_script_refuses_before_building_and_runs_on_the_tiny_teacher(tiny_teacher_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_decode_costs", REPO / "scripts" / "bench_decode_costs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with monkeypatch.context() as mp:
        mp.setattr("dflash_gptoss.teacher_torch.load_target",
                   lambda *a, **k: pytest.fail("target loaded before refusal"))
        code = script.main(["--target", str(tiny_teacher_dir), "--context-len", "2000", "--oracle-tokens", "64",
                            "--out-dir", str(tmp_path)])
        assert code == 2
        assert capsys.readouterr().err.startswith(
            "error: --context-len 2000 with --block-size 8 and --oracle-tokens 64 needs 2063 positions; the target "
            "has max_position_embeddings=2048")
    code = script.main(["--target", str(tiny_teacher_dir), "--context-len", "48", "--block-size", "4",
                        "--draft-layers", "1", "--oracle-tokens", "16", "--repeats", "2", "--out-dir", str(tmp_path)])
    assert code == 0
    [out] = tmp_path.glob("decode_costs_target_*.json")
    report = json.loads(out.read_text())
    assert report["costs"]["context_len"] == 48 and report["costs"]["repeats"] == 2
    assert "1 threads" in report["device"]
    assert report["oracle_end_to_end"]["lossless"] and report["oracle_end_to_end"]["new_tokens"] == 16


def test_modal_app_builds_without_network_and_checks_outputs_before_the_gpu(tmp_path, capsys, monkeypatch):
    modal = pytest.importorskip("modal")
    spec = importlib.util.spec_from_file_location("modal_bench", REPO / "modal" / "dflash_gptoss20b_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.app.name == "dflash-gptoss20b-benchmark"
    assert module.MODEL_ID == "openai/gpt-oss-20b"
    assert isinstance(module.benchmark, modal.Function)

    class NoGpu:
        def remote(self, **kwargs):
            raise AssertionError("the remote benchmark was started before the bad input was refused")

    monkeypatch.setattr(module, "benchmark", NoGpu())
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    entrypoint = module.main.info.raw_f
    for kwargs, message in (({"out_dir": str(a_file)}, f"--out-dir {a_file} exists and is not a folder"),
                            ({"out_dir": str(tmp_path), "repeats": 0}, "--repeats must be >= 1"),
                            ({"out_dir": str(tmp_path), "prompts_file": str(tmp_path / "no.jsonl")},
                             "--prompts-file")):
        with pytest.raises(SystemExit) as exit_info:
            entrypoint(**kwargs)
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"error: {message}")


def test_sampling_flags_are_refused_before_model_work(tmp_path, capsys, no_model_loads):
    base = ["--target", "tiny", "--out-dir", str(tmp_path)]
    cases = [
        (["--temperature", "-0.5"], "error: --temperature must be a finite number >= 0 (0 = greedy), got -0.5."),
        (["--temperature", "nan"], "error: --temperature must be a finite number >= 0 (0 = greedy), got nan."),
        (["--temperature", "1", "--top-p", "0"], "error: --top-p must be in (0, 1] (1 = no cut), got 0.0."),
        (["--temperature", "1", "--top-p", "1.5"], "error: --top-p must be in (0, 1] (1 = no cut), got 1.5."),
        (["--top-p", "0.9"], "error: --top-p 0.9 needs --temperature > 0"),
        (["--temperature", "0", "--top-p", "0.9"], "error: --top-p 0.9 needs --temperature > 0"),
        (["--temperature", "1", "--draft", "oracle", "--draft-sample", "sample"],
         "error: --draft-sample sample needs a draft with a distribution to sample; the oracle"),
        (["--draft-sample", "sample"], "error: --draft-sample sample needs --temperature > 0"),
    ]
    for extra, message in cases:
        assert dflash_benchmark.main([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # no report started


def test_cli_at_temperature_one_reports_the_distribution_guarantee(tiny_teacher_dir, tmp_path, capsys):
    args = ["--target", str(tiny_teacher_dir), "--num-prompts", "2", "--max-new-tokens", "24", "--block-size", "4",
            "--repeats", "2", "--no-warmup", "--temperature", "1.0", "--seed", "3", "--out-dir", str(tmp_path)]
    for draft, mode in (("oracle", "greedy"), ("random", "sample")):
        assert dflash_benchmark.main([*args, "--draft", draft, "--draft-sample", mode,
                                      "--report-name", f"{draft}_{mode}"]) == 0
        out = capsys.readouterr().out
        assert "lossless: in distribution (T > 0), not checked per prompt" in out
        assert f"decoding: temperature 1.0, draft proposals: {mode}" in out
        report = json.loads((tmp_path / f"{draft}_{mode}.json").read_text())
        assert report["guarantee"] == "distribution" and report["lossless_all"] is None
        assert report["lossless_prompts"] is None and report["mismatched_prompts"] == []
        s = report["settings"]
        assert (s["temperature"], s["top_p"], s["draft_sample"], s["seed"]) == (1.0, None, mode, 3)
        # Each repeat of a prompt draws from the same seeded generator: the same samples, so the same work.
        assert report["acceptance_same_every_repeat"]
        slots = report["acceptance_probability_per_slot"]
        assert [row["slot"] for row in slots] == [1, 2, 3]
        reached = [row["reached"] for row in slots]
        assert reached[0] == sum(1 for row in report["per_prompt"] for step in row["slot_accept_probs"] if step)
        assert reached == sorted(reached, reverse=True)  # a slot is reached only after the ones before it
        for row in slots:
            assert row["mean"] is None or 0.0 <= row["mean"] <= 1.0
        # Accepted lengths are consistent with how far each verify got: a accepted slots, then one more token.
        for row in report["per_prompt"]:
            for length, probs in zip(row["accepted_lengths"], row["slot_accept_probs"], strict=True):
                assert len(probs) in (length, length - 1)  # the rejected slot is counted; all-accepted has none


def test_report_stems_are_taken_exclusively(tmp_path, monkeypatch):
    """Two runs never write one stem: a default stem taken in the same second becomes ``_2``; an explicit one
    is refused naming the running holder or the earlier report; a killed run's reservation is taken over."""
    import subprocess

    from dflash_gptoss.benchmark.core import prepare_outputs, write_report
    from dflash_gptoss.run_safety.preflight import OutputPathError
    from dflash_gptoss.run_safety.report_stem import release

    class Frozen:  # two runs that start in the same second
        @staticmethod
        def now(tz=None):
            import datetime as dt

            return dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=tz)

    monkeypatch.setattr("dflash_gptoss.benchmark.core.datetime", Frozen)
    _, first = prepare_outputs(tmp_path)
    _, second = prepare_outputs(tmp_path)
    assert (first.name, second.name) == ("bench_20261204_120000", "bench_20261204_120000_2")

    _, mine = prepare_outputs(tmp_path, "shared")
    with pytest.raises(OutputPathError, match=rf"--report-name shared: {tmp_path / 'shared.json'} is reserved by a "
                                              rf"running job \(pid {os.getpid()} on "):
        prepare_outputs(tmp_path, "shared")
    report = {"settings": {"block_size": 2}, "acceptance_hist": {"1": 3}, "teacher": "t", "draft": "d",
              "device": "cpu", "dtype": "float32", "acceptance_mean": 1.0, "noisy": False, "speedup": 1.0,
              "speedup_per_prompt": None}
    json_path, png_path = write_report(report, tmp_path, stem=mine)
    assert json.loads(json_path.read_text()) == report and png_path.is_file()
    with pytest.raises(OutputPathError, match=r"already holds an earlier report; pass another --report-name"):
        prepare_outputs(tmp_path, "shared")

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "killed.json").write_text(json.dumps({"reserved_by": {
        "pid": int(dead.stdout), "host": __import__("socket").gethostname(), "token": "x", "started_utc": "then"}}))
    _, taken_over = prepare_outputs(tmp_path, "killed")  # its process is gone
    assert taken_over.name == "killed"
    release(taken_over)
    assert not (tmp_path / "killed.json").exists()


def test_a_report_whose_reservation_was_replaced_is_not_written(tmp_path):
    from dflash_gptoss.benchmark.core import prepare_outputs, write_report
    from dflash_gptoss.run_safety.preflight import OutputPathError

    _, stem = prepare_outputs(tmp_path, "r")
    (tmp_path / "r.json").write_text(json.dumps({"reserved_by": {"pid": 1, "host": "elsewhere", "token": "other"}}))
    with pytest.raises(OutputPathError, match="reservation of the report name was replaced by another run"):
        write_report({}, tmp_path, stem=stem)
    assert not (tmp_path / "r_acceptance.png").exists()


def test_the_trainer_summary_and_the_pipeline_report_have_one_writer(tmp_path, capsys):
    """``--summary-json`` is held by its running trainer (``<file>.writing``): a second trainer naming the same
    file is refused before any work, naming the holder; the pipeline report's stem is taken like the
    benchmark's."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import tpu_dflash_train_with_easydel_trainer as train_cli
    finally:
        sys.path.pop(0)
    from dflash_gptoss.run_safety.report_stem import release, reserve_writer

    summary = tmp_path / "summary.json"
    summary.write_text("{}")  # a finished summary of an earlier run: replaced by the next run, not refused
    held = reserve_writer(summary, "--summary-json")
    (tmp_path / "cache").mkdir()
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--cache-dir", str(tmp_path / "cache"), "--teacher-snapshot-dir", str(tmp_path / "cache"),
                        "--save-directory", str(tmp_path / "ckpt"), "--max-training-steps", "1",
                        "--summary-json", str(summary)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--summary-json {summary.name}: {summary}.writing is reserved by a running job (pid {os.getpid()}" in err
    release(held)
    assert not (tmp_path / f"{summary.name}.writing").exists() and summary.read_text() == "{}"
    again = reserve_writer(summary, "--summary-json")  # free again
    release(again)
