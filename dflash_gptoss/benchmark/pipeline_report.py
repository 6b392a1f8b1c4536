"""The end-to-end run's closing report: one table, one JSON, the training curve (PNG).

Joins what the steps already wrote (the trainer's ``--summary-json`` with its per-step
history, the benchmark's JSON) with the wall time of each step, so a person sees in one
place what the draft learned, what it achieved at inference, and where the time went.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["pipeline_summary", "plot_training_curve", "summary_table", "write_pipeline_report"]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean (per-step training figures are noisy: one batch each)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_training_curve(history: list[dict[str, float]], path: str | Path, *, title: str = "",
                        eval_history: list[dict[str, Any]] | None = None, best_step: int | None = None) -> Path:
    """Loss and accepted length (expected and per-block) against the training step; with ``eval_history``
    the held-out loss and accepted length beside them (train vs held-out), the exported step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    window = max(1, len(history) // 50)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    ax_loss.plot(steps, [h["loss"] for h in history], color="#bbbbbb", lw=0.6, label="per step")
    ax_loss.plot(steps, _smooth([h["loss"] for h in history], window), color="#3b75af", label=f"mean of {window}")
    ax_loss.set_xlabel("training step")
    ax_loss.set_ylabel("weighted cross-entropy (nats)")
    ax_loss.legend(fontsize=8)
    for key, color, label in (("mean_accept_len", "#d9822b", "accepted per block (training batch, every anchor)"),
                              ("expected_accept_len", "#3b75af", "expected from slot accuracies")):
        ax_acc.plot(steps, _smooth([h[key] for h in history], window), color=color, label=label)
    if eval_history:
        es = [e["step"] for e in eval_history]
        ax_loss.plot(es, [e["eval_loss"] for e in eval_history], "o-", color="#2a9d4b", ms=3, label="held-out")
        ax_loss.legend(fontsize=8)
        ax_acc.plot(es, [e["eval_accept_len_mean"] for e in eval_history], "o-", color="#2a9d4b", ms=3,
                    label="held-out: accepted per verify step (greedy walk)")
        if best_step is not None:
            best = next(e for e in eval_history if e["step"] == best_step)
            ax_acc.plot([best_step], [best["eval_accept_len_mean"]], "*", color="#c0392b", ms=11,
                        label=f"exported (step {best_step})")
    ax_acc.set_xlabel("training step")
    ax_acc.set_ylabel("accepted tokens per block")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def pipeline_summary(bench: dict[str, Any], train: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The figures the closing table shows, in one flat dict (also written as JSON)."""
    if "speedup" not in bench or "noise" not in bench:
        raise ValueError("the benchmark JSON has no 'speedup'/'noise' (written by a benchmark before repeats and "
                         "medians); rerun scripts/dflash_benchmark.py.")
    history = train.get("history") or []
    tail = history[-max(1, len(history) // 20):]
    n = bench["settings"]["num_prompts"]
    return {
        "teacher": bench["teacher"],
        "device": bench["device"],
        "dtype": bench["dtype"],
        "prompts": n,
        "max_new_tokens": bench["settings"]["max_new_tokens"],
        "block_size": bench["settings"]["block_size"],
        "lossless_prompts": bench["lossless_prompts"],
        "lossless_all": bench["lossless_all"],
        "guarantee": bench.get("guarantee", "token identity"),
        "acceptance_mean": bench["acceptance_mean"],
        "acceptance_median": bench["acceptance_median"],
        "acceptance_p90": bench["acceptance_p90"],
        "target_forwards_per_token": bench["target_forwards_per_token"],
        "baseline_tokens_per_s": bench["baseline_tokens_per_s"],
        "dflash_tokens_per_s": bench["dflash_tokens_per_s"],
        "speedup": bench["speedup"],
        "speedup_per_prompt": bench["speedup_per_prompt"],
        "repeats": bench["settings"]["repeats"],
        "noisy": bench["noisy"],
        "max_spread": bench["noise"]["max_spread"],
        "loop_efficiency": bench["step_costs"]["loop_efficiency"],
        "speedup_mean": bench["speedup_mean"],
        "training_steps": train.get("final_step"),
        "training_final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "training_mean_accept_len": sum(h["mean_accept_len"] for h in tail) / len(tail) if tail else None,
        "training_expected_accept_len": sum(h["expected_accept_len"] for h in tail) / len(tail) if tail else None,
        **_heldout_fields(train),
        "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds_total": round(sum(timings.values()), 1),
    }


def _heldout_fields(train: dict[str, Any]) -> dict[str, Any]:
    """The held-out curve's last and best points, the exported step and the export check (None when absent)."""
    evals = train.get("eval_history") or []
    best_step = train.get("best_eval_step")
    best = next((e for e in evals if e["step"] == best_step), None)
    keep = ("step", "eval_loss", "eval_accept_len_mean", "eval_accept_len_median", "eval_accept_len_p90")
    return {
        "eval_history": evals,
        "eval_last": {k: evals[-1][k] for k in keep} if evals else None,
        "eval_best": {k: best[k] for k in keep} if best else None,
        "eval_seconds_total": round(sum(e.get("eval_seconds", 0.0) for e in evals), 2),
        "exported_step": train.get("exported_step"),
        "exported_from": train.get("exported_from"),
        "export_check": train.get("export_check"),
    }


def _eval_text(e: dict[str, Any]) -> str:
    return (f"step {e['step']}: {e['eval_accept_len_mean']:.2f} / {e['eval_accept_len_median']:g} / "
            f"{e['eval_accept_len_p90']:g} (loss {e['eval_loss']:.3f})")


def _check_text(s: dict[str, Any]) -> str:
    c = s.get("export_check")
    if not c:
        return "not run"
    return (f"step {s['exported_step']} ({s['exported_from']}): accepted length {c['torch_accept_len_mean']:.3f} "
            f"(torch) vs {c['jax_accept_len_mean']:.3f} (JAX) on {c['num_anchors']} {c['blocks_from']} blocks, "
            + ("passed" if c["passed"] else "FAILED"))


def _speedup_text(s: dict[str, Any]) -> str:
    per = s["speedup_per_prompt"]
    text = f"**{s['speedup']:.2f}x**"
    if per:
        text += f"; per prompt median {per['median']:.2f}x, IQR {per['q1']:.2f}-{per['q3']:.2f}x"
    text += f"; median of {s['repeats']} interleaved repeats"
    if s["noisy"] is None:
        text += ", noise unknown"
    else:
        text += (f", NOISY (repeats disagree by up to {s['max_spread']:.0%})" if s["noisy"]
                 else f", repeats within {s['max_spread']:.0%}")
    if s["loop_efficiency"] is not None:
        text += f"; loop efficiency {s['loop_efficiency']:.2f}"
    return text


def summary_table(s: dict[str, Any]) -> list[str]:
    """A short markdown table a person can paste into a note."""
    rows = [
        ("teacher", s["teacher"]),
        ("device", f"{s['device']} ({s['dtype']})"),
        ("prompts x new tokens, block", f"{s['prompts']} held-out x {s['max_new_tokens']}, B={s['block_size']}"),
        ("accepted length mean / median / p90",
         f"{s['acceptance_mean']:.2f} / {s['acceptance_median']} / {s['acceptance_p90']:.1f}"),
        ("target forwards per token", f"{s['target_forwards_per_token']:.3f} (baseline 1.000)"),
        ("lossless", f"{s['lossless_prompts']}/{s['prompts']} prompts token-identical to greedy"
         if s.get("guarantee", "token identity") == "token identity"
         else "in distribution (T > 0): proven by tests/test_sampling_*.py, not checked per prompt"),
        ("speedup (total decode time)", _speedup_text(s)),
        ("tokens/s baseline -> dflash (prefill + decode)",
         f"{s['baseline_tokens_per_s']:.1f} -> {s['dflash_tokens_per_s']:.1f}"),
        ("training (last 5% of steps)",
         f"{s['training_steps']} steps, loss {s['training_final_loss']:.3f}, accepted/block "
         f"{s['training_mean_accept_len']:.2f}" if s["training_final_loss"] is not None else "no history"),
        ("held-out accepted length per verify step mean / median / p90 (greedy walk over the held-out cache)",
         f"last {_eval_text(s['eval_last'])}" + (f"; best {_eval_text(s['eval_best'])}" if s["eval_best"] else "")
         + f"; {len(s['eval_history'])} evaluations took {s['eval_seconds_total']:.0f}s"
         if s.get("eval_last") else "no held-out evaluation"),
        ("export check (exported torch draft vs JAX draft)", _check_text(s)),
        ("wall time", ", ".join(f"{k} {v:.0f}s" for k, v in s["wall_seconds"].items())
         + f"; total {s['wall_seconds_total'] / 60:.1f} min"),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON file ({err}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


def write_pipeline_report(bench_json: str | Path, train_summary_json: str | Path, timings: dict[str, float],
                          out_dir: str | Path, stem: str) -> tuple[dict[str, Any], list[Path]]:
    """``<stem>_pipeline.json`` and ``<stem>_training.png`` in ``out_dir``; returns the summary and the paths."""
    from dflash_gptoss.run_safety.preflight import check_file_stem, check_output_dir

    out = check_output_dir(out_dir, "--out-dir", create=True)
    check_file_stem(stem, "--name")
    bench, train = _read_json(bench_json), _read_json(train_summary_json)
    try:
        summary = pipeline_summary(bench, train, timings)
    except ValueError as err:
        raise ValueError(f"{bench_json}: {err}") from None
    from dflash_gptoss.run_safety.report_stem import release, reserve

    held = reserve(out, f"{stem}_pipeline", unique=False, siblings=(f"{stem}_training.png",), flag="--name")
    try:
        return summary, _write_files(out, stem, summary, train, bench, bench_json, train_summary_json)
    except BaseException:
        release(held)
        raise


def _write_files(out: Path, stem: str, summary: dict[str, Any], train: dict[str, Any], bench: dict[str, Any],
                 bench_json: str | Path, train_summary_json: str | Path) -> list[Path]:
    """The PNG, then the JSON over the stem's reservation."""
    png = out / f"{stem}_training.png"
    tmp_png = plot_training_curve(train.get("history") or [], png.with_name(png.name + ".tmp"),
                                  title=f"DFlash draft training: {bench['teacher']}",
                                  eval_history=train.get("eval_history"), best_step=train.get("exported_step")
                                  if train.get("eval_history") else None)
    tmp_png.replace(png)
    path = out / f"{stem}_pipeline.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"summary": summary, "bench_json": str(bench_json),
                               "train_summary_json": str(train_summary_json)}, indent=2) + "\n")
    tmp.replace(path)
    return [path, png]
