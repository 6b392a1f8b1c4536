"""MXFP4 expert weights as stored by ``openai/gpt-oss-*`` snapshots: exact dequantization, tiny writer.

Layout (transformers 5.5, ``integrations/mxfp4.py::_convert_moe_packed_tensors``):
``<proj>_blocks`` uint8 ``[E, out, G, 16]`` packs 32 e2m1 values per group (low nibble = even
index, high nibble = odd index) and ``<proj>_scales`` uint8 ``[E, out, G]`` holds one
power-of-two exponent per group, biased by 127. Dequantized, the ``[E, out, G*32]`` values are
transposed to transformers' parameter layout ``[E, in, out]`` (``gate_up_proj``: ``[E, H, 2I]``
with gate/up interleaved on the last axis; ``down_proj``: ``[E, I, H]``).

Every e2m1 value times a power of two is exact in bf16 and float32, so dequantization is
exact; the JAX teacher reads MXFP4 snapshots through :func:`dequantize_mxfp4`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)
GROUP = 32  # values per scale
EXPERT_PROJS = ("gate_up_proj", "down_proj")
# gpt-oss-20b's config.json quantization_config, verbatim.
QUANTIZATION_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 blocks ``[E, out, G, 16]`` + uint8 scales ``[E, out, G]`` -> float32 ``[E, in, out]`` (exact)."""
    blocks = np.asarray(blocks, dtype=np.uint8)
    scales = np.asarray(scales, dtype=np.uint8)
    if blocks.ndim != 4 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {blocks.shape} / scales {scales.shape} do not match "
                         "[E, out, G, 16] / [E, out, G]")
    e, out, g, b = blocks.shape
    vals = np.empty((e, out, g, 2 * b), dtype=np.float32)
    vals[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    vals[..., 1::2] = FP4_VALUES[blocks >> 4]
    vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
    return np.ascontiguousarray(vals.reshape(e, out, g * 2 * b).transpose(0, 2, 1))


def _e2m1_nearest(x: np.ndarray) -> np.ndarray:
    """Index (0..15) of the e2m1 value nearest to ``x`` (|x| <= 6), ties to the even mantissa."""
    mags = FP4_VALUES[:8]
    # Nearest magnitude = how many midpoints lie strictly below |x|: a tie (|x| on a midpoint) goes
    # to the lower value, as argmin over the distances would (they are exact: Sterbenz). One pass,
    # no [..., 8] distance array (the real-width snapshot quantizes ~10^9 values).
    mag_idx = np.searchsorted((mags[:-1] + mags[1:]) / 2, np.abs(x), side="left")
    return np.where(np.signbit(x) & (mag_idx > 0), mag_idx + 8, mag_idx).astype(np.uint8)


def quantize_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float ``[E, in, out]`` -> (blocks ``[E, out, in/32, 16]``, scales ``[E, out, in/32]``), both uint8.

    Per group of 32 inputs the scale is the smallest power of two with ``max|x| / 2^s <= 6``;
    values round to the nearest e2m1 value. Only used to write test snapshots.
    """
    w = np.asarray(w, dtype=np.float32)
    e, n_in, out = w.shape
    if n_in % GROUP:
        raise ValueError(f"MXFP4 needs the input dim ({n_in}) to be a multiple of {GROUP}")
    g = n_in // GROUP
    x = w.transpose(0, 2, 1).reshape(e, out, g, GROUP)
    amax = np.abs(x).max(axis=-1)
    exp = np.ceil(np.log2(np.maximum(amax, np.finfo(np.float32).tiny) / 6.0)).astype(np.int32)
    exp = np.clip(exp, -127, 127)
    idx = _e2m1_nearest(np.clip(np.ldexp(x, -exp[..., None]), -6.0, 6.0))
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).astype(np.uint8)
    # C-contiguous: safetensors' numpy writer dumps the raw buffer without checking the layout.
    return np.ascontiguousarray(blocks), np.ascontiguousarray(exp + 127, dtype=np.uint8)


def checkpoint_tensors(name: str, t) -> dict:
    """One float parameter as the real snapshots store it: expert weights as ``<name>_blocks`` +
    ``<name>_scales`` (MXFP4, uint8), every other tensor in bf16 (torch tensors)."""
    import torch

    if name.split(".")[-1] in EXPERT_PROJS:
        blocks, scales = quantize_mxfp4(t.float().numpy())
        return {name + "_blocks": torch.from_numpy(blocks), name + "_scales": torch.from_numpy(scales)}
    return {name: t.to(torch.bfloat16).contiguous()}


def write_mxfp4_snapshot(src_snapshot_dir: str | Path, dst_dir: str | Path) -> Path:
    """Write an MXFP4 copy of a float GPT-OSS snapshot, laid out like ``openai/gpt-oss-20b``.

    Expert weights become ``<proj>_blocks`` / ``<proj>_scales`` (uint8); every other tensor is
    stored in bf16 (as in the real snapshot); ``config.json`` gains gpt-oss-20b's
    ``quantization_config``. Other files (tokenizer, generation config) are copied.
    """
    from safetensors.torch import load_file, save_file

    src, dst = Path(src_snapshot_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    out: dict = {}
    for name, t in tensors.items():
        out.update(checkpoint_tensors(name, t))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
    cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json",):
            if not extra.name.endswith(".safetensors.index.json"):
                shutil.copy2(extra, dst / extra.name)
    return dst
