"""The arithmetic behind the benchmark's figures: medians of repeats, their spread, ratio quartiles.

A wall-clock figure on a shared machine is one draw from a noisy distribution. The
benchmark therefore times every prompt ``R`` times per loop and works with medians
(a single slow repeat cannot move a median of three). Two facts are derived here,
once, so the report, the screen and the tests read the same definitions:

* **spread** of a loop's repeats on one prompt: ``(max - min) / median``. It is the
  widest disagreement between any two repeats, relative to the figure reported. A
  run is **noisy** when any loop on any prompt has a spread above ``NOISE_THRESHOLD``.
* **quartiles** by linear interpolation between closest ranks (numpy's default
  ``percentile``), so a reader can redo them with numpy.

No torch, no timing here: plain numbers in, plain numbers out.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

NOISE_THRESHOLD = 0.10  # repeats of a loop on a prompt may disagree by at most 10% of their median
SPREAD_DEFINITION = "(max - min) / median of one loop's decode times over the repeats of one prompt"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation between closest ranks (numpy's default);
    0.0 for no values (an empty report, not an error)."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}.")
    return float(np.quantile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def spread(times: Sequence[float]) -> float | None:
    """``(max - min) / median`` of one loop's repeats; None when fewer than two repeats (nothing to compare)."""
    if len(times) < 2:
        return None
    middle = statistics.median(times)
    if middle <= 0:
        raise ValueError(f"timings must be positive, got {list(times)}.")
    return (max(times) - min(times)) / middle


def is_noisy(spreads: Sequence[float | None], threshold: float = NOISE_THRESHOLD) -> bool | None:
    """True when any spread exceeds ``threshold``; None when no spread could be measured (one repeat)."""
    known = [s for s in spreads if s is not None]
    if not known:
        return None
    return max(known) > threshold


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range of per-prompt speedups (how much the prompts agree)."""
    if not ratios:
        raise ValueError("no ratios to summarize.")
    q1, q3 = percentile(ratios, 0.25), percentile(ratios, 0.75)
    return {"median": percentile(ratios, 0.5), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": min(ratios), "max": max(ratios)}
