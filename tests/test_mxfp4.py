"""MXFP4 snapshots: exact dequantization (== transformers' own) and JAX teacher parity on one.

The tiny MXFP4 snapshot has gpt-oss-20b's tensor names, layouts, dtypes (uint8 blocks/scales,
bf16 elsewhere) and quantization_config; transformers loads it dequantized (Mxfp4Config
(dequantize=True), bf16 -> float32, exact) and is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("easydel")

LAYER_IDS = [0, 3, 5]
T = 48


@pytest.fixture(scope="module")
def mxfp4_snapshot(tmp_path_factory) -> Path:
    from transformers import GptOssForCausalLM

    from dflash_gptoss.teacher_mxfp4 import write_mxfp4_snapshot
    from dflash_gptoss.tiny_teacher import tiny_gptoss_config

    root = tmp_path_factory.mktemp("mxfp4")
    torch.manual_seed(1)
    model = GptOssForCausalLM(tiny_gptoss_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(30.0)
    model.save_pretrained(root / "float")
    return write_mxfp4_snapshot(root / "float", root / "mxfp4")


def _expert_keys(path: Path):
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if ".mlp.experts." in k}


def test_layout_matches_gpt_oss_20b(mxfp4_snapshot):
    from dflash_gptoss.teacher_mxfp4 import QUANTIZATION_CONFIG

    cfg = json.loads((mxfp4_snapshot / "config.json").read_text())
    assert cfg["quantization_config"] == QUANTIZATION_CONFIG
    t = _expert_keys(mxfp4_snapshot)
    e, h, i = cfg["num_local_experts"], cfg["hidden_size"], cfg["intermediate_size"]
    shapes = {
        "gate_up_proj_blocks": (e, 2 * i, h // 32, 16), "gate_up_proj_scales": (e, 2 * i, h // 32),
        "down_proj_blocks": (e, h, i // 32, 16), "down_proj_scales": (e, h, i // 32),
        "gate_up_proj_bias": (e, 2 * i), "down_proj_bias": (e, h),
    }
    for suffix, shape in shapes.items():
        tensor = t[f"model.layers.0.mlp.experts.{suffix}"]
        assert tuple(tensor.shape) == shape, suffix
        assert tensor.dtype == (torch.bfloat16 if suffix.endswith("bias") else torch.uint8), suffix
    assert "model.layers.0.mlp.experts.gate_up_proj" not in t


def test_dequantize_equals_transformers(mxfp4_snapshot):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from dflash_gptoss.teacher_mxfp4 import dequantize_mxfp4

    t = _expert_keys(mxfp4_snapshot)
    for proj in ("gate_up_proj", "down_proj"):
        blocks, scales = t[f"model.layers.2.mlp.experts.{proj}_blocks"], t[f"model.layers.2.mlp.experts.{proj}_scales"]
        ours = dequantize_mxfp4(blocks.numpy(), scales.numpy())
        theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).numpy()
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_array_equal(np.signbit(ours), np.signbit(theirs))


def test_quantize_roundtrip_is_close():
    from dflash_gptoss.teacher_mxfp4 import dequantize_mxfp4, quantize_mxfp4

    w = np.random.default_rng(0).normal(size=(2, 64, 48)).astype(np.float32)
    back = dequantize_mxfp4(*quantize_mxfp4(w))
    group_max = np.abs(w.reshape(2, 2, 32, 48)).max(axis=2, keepdims=True)
    err = np.abs(back - w).reshape(2, 2, 32, 48) / group_max
    # half the widest e2m1 step (4 -> 6) over the smallest scaled group max (3): 1/3
    assert err.max() <= 1 / 3 + 1e-6
    np.testing.assert_array_equal(dequantize_mxfp4(*quantize_mxfp4(back)), back)  # grid points are fixed


def test_jax_teacher_on_mxfp4_matches_transformers(mxfp4_snapshot):
    from transformers import GptOssForCausalLM, Mxfp4Config

    from dflash_gptoss.teacher_jax import JaxTeacher

    ids = np.random.default_rng(1).integers(0, 4096, (2, T)).astype(np.int32)
    model = GptOssForCausalLM.from_pretrained(
        mxfp4_snapshot, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)).float().eval()
    outs: dict[int, torch.Tensor] = {}
    for i in LAYER_IDS:
        model.model.layers[i].register_forward_hook(
            lambda _m, _a, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long()).logits.numpy()
    ref = np.concatenate([outs[i].numpy() for i in LAYER_IDS], axis=-1)
    teacher = JaxTeacher(mxfp4_snapshot, LAYER_IDS, dp=2, tp=4, dtype="float32")
    features, labels = teacher.forward(ids)
    diff = np.abs(features - ref).max()
    print(f"MXFP4 snapshot, float32: max|features| diff {diff:.2e}, "
          f"argmax agreement {(labels == logits.argmax(-1)).mean():.4f}")
    assert diff < 1e-5
    np.testing.assert_array_equal(labels, logits.argmax(-1))
