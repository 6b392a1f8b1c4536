"""bf16 <-> uint16 bit patterns: the one place the cache's bf16 conversion lives.

The cache stores bf16 values as their raw 16-bit patterns so ``np.load(mmap_mode="r")``
works without a bf16 numpy dtype. ``ml_dtypes`` (a JAX dependency, also pulled in by
numpy-using torch stacks) provides the bf16 dtype; rounding float32 -> bf16 is
round-to-nearest-even, and bits -> float32 is exact.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Any float array (float32, bf16, ...) -> uint16 bf16 bit patterns (nearest-even)."""
    x = np.asarray(x)
    if x.dtype != BF16:
        x = x.astype(np.float32).astype(BF16)
    return x.view(np.uint16)


def from_bf16_bits(bits: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """uint16 bf16 bit patterns -> ``dtype`` (float32 by default; exact)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"expected uint16 bf16 bit patterns, got dtype {bits.dtype}")
    return bits.view(BF16).astype(dtype)
