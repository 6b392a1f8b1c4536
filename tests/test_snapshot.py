"""A damaged teacher snapshot is named before any expensive work, by every script that reads one.

Each case damages a copy of the tiny teacher the way a user meets it (an interrupted download, a
hand edit, a file from another model) and asserts the one error line each script prints: it names
the damaged file (and the JSON line and column, or the tensor), and nothing is left behind.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from dflash_gptoss.teacher_snapshot import SnapshotError, expected_tensors, read_config, validate_snapshot

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import dflash_benchmark  # noqa: E402
import generate_teacher_data  # noqa: E402
import tpu_dflash_build_teacher_cache  # noqa: E402


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _drop_tensor(snapshot: Path, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(snapshot / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(snapshot / "model.safetensors"))


def _scripts_refuse(snapshot: Path, tmp_path: Path, capsys, message: str) -> None:
    """The benchmark, the cache builder and data generation each print ``message`` in one error line, exit 2."""
    out = tmp_path / "cache"
    runs = {
        "benchmark": lambda: dflash_benchmark.main(["--target", str(snapshot), "--draft", "oracle",
                                                    "--out-dir", str(tmp_path / "bench")]),
        "builder": lambda: tpu_dflash_build_teacher_cache.main([
            "--model-snapshot-dir", str(snapshot), "--out-dir", str(out), "--ctx-len", "32", "--block-size", "8",
            "--num-context-features", "3", "--num-blocks", "8", "--batch-size", "8"]),
        "data": lambda: generate_teacher_data.main(["--model-snapshot-dir", str(snapshot), "--out",
                                                    str(tmp_path / "data.jsonl"), "--num-samples", "2"]),
    }
    for name, run in runs.items():
        assert run() == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (name, err)
    assert not out.exists()  # no incomplete cache folder
    assert not (tmp_path / "data.jsonl").exists()


def test_the_tiny_teacher_and_its_mxfp4_copy_pass(tiny_teacher_dir, tmp_path):
    from dflash_gptoss.teacher_mxfp4 import write_mxfp4_snapshot

    assert validate_snapshot(tiny_teacher_dir)["model_type"] == "gpt_oss"
    mxfp4 = write_mxfp4_snapshot(tiny_teacher_dir, tmp_path / "mxfp4")
    cfg = validate_snapshot(mxfp4)
    assert any(name.endswith("_blocks") for name in expected_tensors(cfg, mxfp4=True))


def test_the_tensors_expected_are_transformers_own_parameters_at_gpt_oss_20b_sizes():
    """gpt-oss-20b's config (the planner's preset): the expected tensors are exactly the state dict of
    transformers' GptOssForCausalLM (built on the meta device), with the experts in MXFP4 as the real
    snapshot stores them: blocks [E, out, in/32, 16] and scales [E, out, in/32] for a dense [E, in, out]."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = read_config(REPO / "dflash_gptoss" / "planning" / "presets" / "gpt-oss-20b")
    hf = GptOssConfig(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        state = {name: tuple(p.shape) for name, p in GptOssForCausalLM(hf).state_dict().items()}
    assert {name: shape for name, (shape, _) in expected_tensors(cfg, mxfp4=False).items()} == state
    quantized = {}
    for name, shape in state.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, inner, out = shape
            quantized[name + "_blocks"], quantized[name + "_scales"] = (e, out, inner // 32, 16), (e, out, inner // 32)
        else:
            quantized[name] = shape
    assert {name: shape for name, (shape, _) in expected_tensors(cfg, mxfp4=True).items()} == quantized


def test_a_truncated_tokenizer_is_named_with_line_and_column(tiny_teacher_dir, tmp_path, capsys):
    snapshot = _copy(tiny_teacher_dir, tmp_path / "snap")
    text = (snapshot / "tokenizer.json").read_text()
    _truncate(snapshot / "tokenizer.json", len(text.encode()) // 2)
    with pytest.raises(SnapshotError, match=r"tokenizer\.json:\d+:\d+: tokenizer\.json is not valid JSON"):
        validate_snapshot(snapshot)
    _scripts_refuse(snapshot, tmp_path, capsys, f"{snapshot / 'tokenizer.json'}:")


def test_the_trainer_names_the_tokenizer_not_the_mask_token(tiny_teacher_dir, tmp_path):
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings, TrainerInputError, build_trainer

    snapshot = _copy(tiny_teacher_dir, tmp_path / "snap")
    _truncate(snapshot / "tokenizer.json", 1000)
    settings = DFlashTrainingSettings(cache_dir=str(tmp_path), teacher_snapshot_dir=str(snapshot),
                                      save_directory=str(tmp_path / "ckpt"), max_training_steps=1, total_batch_size=8,
                                      dp=2, tp=4)
    with pytest.raises(TrainerInputError) as info:
        build_trainer(settings)
    assert "tokenizer.json" in str(info.value) and "mask" not in str(info.value).lower()
    assert not (tmp_path / "ckpt").exists()


def test_a_config_that_is_not_json_is_named_with_line_and_column(tiny_teacher_dir, tmp_path, capsys):
    snapshot = _copy(tiny_teacher_dir, tmp_path / "snap")
    cfg = (snapshot / "config.json").read_text()
    (snapshot / "config.json").write_text(cfg.replace('"hidden_size": 96,', '"hidden_size": 96', 1))
    _scripts_refuse(snapshot, tmp_path, capsys, f"{snapshot / 'config.json'}:")


def test_a_wrong_hidden_size_is_named_before_the_teacher_loads(tiny_teacher_dir, tmp_path, capsys):
    snapshot = _copy(tiny_teacher_dir, tmp_path / "snap")
    cfg = json.loads((snapshot / "config.json").read_text())
    cfg["hidden_size"] = 128
    (snapshot / "config.json").write_text(json.dumps(cfg))
    _scripts_refuse(snapshot, tmp_path, capsys,
                    "tensor 'model.embed_tokens.weight' is F32 [4096, 96], but "
                    f"{snapshot / 'config.json'} implies F32/BF16/F16 [4096, 128]")


def test_a_missing_tensor_is_named_and_never_initialised(tiny_teacher_dir, tmp_path, capsys):
    snapshot = _copy(tiny_teacher_dir, tmp_path / "snap")
    _drop_tensor(snapshot, "model.layers.3.self_attn.q_proj.bias")
    _scripts_refuse(snapshot, tmp_path, capsys,
                    "tensor 'model.layers.3.self_attn.q_proj.bias' is missing from model.safetensors")


def test_a_truncated_weights_file_is_named(tiny_teacher_dir, tmp_path, capsys):
    snapshot = _copy(tiny_teacher_dir, tmp_path / "snap")
    size = (snapshot / "model.safetensors").stat().st_size
    _truncate(snapshot / "model.safetensors", size - 1000)
    _scripts_refuse(snapshot, tmp_path, capsys, f"{snapshot / 'model.safetensors'}: its tensors need {size} bytes "
                                                f"but the file has {size - 1000}")
    _truncate(snapshot / "model.safetensors", 4)
    with pytest.raises(SnapshotError, match="too short for a safetensors file"):
        validate_snapshot(snapshot)
