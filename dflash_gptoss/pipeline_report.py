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


def plot_training_curve(history: list[dict[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Loss and accepted length (expected and per-block) against the training step."""
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
    for key, color, label in (("mean_accept_len", "#d9822b", "accepted length per block (training batch)"),
                              ("expected_accept_len", "#3b75af", "expected from slot accuracies")):
        ax_acc.plot(steps, _smooth([h[key] for h in history], window), color=color, label=label)
    ax_acc.set_xlabel("training step")
    ax_acc.set_ylabel("accepted tokens per block")
    ax_acc.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def pipeline_summary(bench: dict[str, Any], train: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    """The figures the closing table shows, in one flat dict (also written as JSON)."""
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
        "acceptance_mean": bench["acceptance_mean"],
        "acceptance_median": bench["acceptance_median"],
        "acceptance_p90": bench["acceptance_p90"],
        "target_forwards_per_token": bench["target_forwards_per_token"],
        "baseline_tokens_per_s": bench["baseline_tokens_per_s"],
        "dflash_tokens_per_s": bench["dflash_tokens_per_s"],
        "speedup_mean": bench["speedup_mean"],
        "training_steps": train.get("final_step"),
        "training_final_loss": sum(h["loss"] for h in tail) / len(tail) if tail else None,
        "training_mean_accept_len": sum(h["mean_accept_len"] for h in tail) / len(tail) if tail else None,
        "training_expected_accept_len": sum(h["expected_accept_len"] for h in tail) / len(tail) if tail else None,
        "wall_seconds": {k: round(v, 1) for k, v in timings.items()},
        "wall_seconds_total": round(sum(timings.values()), 1),
    }


def summary_table(s: dict[str, Any]) -> list[str]:
    """A short markdown table a person can paste into a note."""
    rows = [
        ("teacher", s["teacher"]),
        ("device", f"{s['device']} ({s['dtype']})"),
        ("prompts x new tokens, block", f"{s['prompts']} held-out x {s['max_new_tokens']}, B={s['block_size']}"),
        ("accepted length mean / median / p90",
         f"{s['acceptance_mean']:.2f} / {s['acceptance_median']} / {s['acceptance_p90']:.1f}"),
        ("target forwards per token", f"{s['target_forwards_per_token']:.3f} (baseline 1.000)"),
        ("lossless", f"{s['lossless_prompts']}/{s['prompts']} prompts token-identical to greedy"),
        ("tokens/s baseline -> dflash",
         f"{s['baseline_tokens_per_s']:.1f} -> {s['dflash_tokens_per_s']:.1f} ({s['speedup_mean']:.2f}x)"),
        ("training (last 5% of steps)",
         f"{s['training_steps']} steps, loss {s['training_final_loss']:.3f}, accepted/block "
         f"{s['training_mean_accept_len']:.2f}" if s["training_final_loss"] is not None else "no history"),
        ("wall time", ", ".join(f"{k} {v:.0f}s" for k, v in s["wall_seconds"].items())
         + f"; total {s['wall_seconds_total'] / 60:.1f} min"),
    ]
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def write_pipeline_report(bench_json: str | Path, train_summary_json: str | Path, timings: dict[str, float],
                          out_dir: str | Path, stem: str) -> tuple[dict[str, Any], list[Path]]:
    """``<stem>_pipeline.json`` and ``<stem>_training.png`` in ``out_dir``; returns the summary and the paths."""
    bench = json.loads(Path(bench_json).read_text())
    train = json.loads(Path(train_summary_json).read_text())
    summary = pipeline_summary(bench, train, timings)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_training_curve(train["history"], out / f"{stem}_training.png",
                              title=f"DFlash draft training: {bench['teacher']}")
    path = out / f"{stem}_pipeline.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"summary": summary, "bench_json": str(bench_json),
                               "train_summary_json": str(train_summary_json)}, indent=2) + "\n")
    tmp.replace(path)
    return summary, [path, png]
