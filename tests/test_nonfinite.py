"""A NaN never reaches a figure or an exported draft: the benchmark refuses non-finite logits and the export
refuses non-finite weights, each with one error naming what is broken, and nothing is written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import dflash_benchmark  # noqa: E402


def _nan_snapshot(tiny_teacher_dir: Path, dst: Path, tensor: str) -> Path:
    """A copy of the tiny teacher with one NaN in ``tensor`` (a damaged or diverged checkpoint)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_teacher_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[tensor] = tensors[tensor].copy()
    tensors[tensor].flat[0] = np.nan
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def _random_draft(tiny_teacher_dir: Path, out: Path, nan: bool) -> Path:
    import torch
    from transformers import AutoConfig

    from dflash_gptoss.draft_config import make_draft_config
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    torch.manual_seed(0)
    config = make_draft_config(AutoConfig.from_pretrained(tiny_teacher_dir), num_hidden_layers=1, block_size=8,
                               mask_token_id=1, num_context_features=3)
    draft = DFlashDraftModel(config)
    if nan:
        with torch.no_grad():
            draft.fc.weight[0, 0] = float("nan")
    draft.save_pretrained(out)
    return out


def test_the_benchmark_refuses_a_target_with_a_nan_weight(tiny_teacher_dir, tmp_path, capsys):
    snapshot = _nan_snapshot(tiny_teacher_dir, tmp_path / "snap", "model.layers.2.mlp.router.weight")
    for draft in ("oracle", "random"):
        code = dflash_benchmark.main(["--target", str(snapshot), "--draft", draft, "--num-prompts", "2",
                                      "--max-new-tokens", "8", "--out-dir", str(tmp_path / "out")])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1, errors  # (the model's loading bar may precede it)
        assert errors[0].startswith("error: the target's logits are not finite (NaN or Inf) at the first prefill")
    assert not list((tmp_path / "out").glob("*.json"))  # no report


def test_the_benchmark_refuses_a_draft_with_a_nan_weight(tiny_teacher_dir, tmp_path, capsys):
    args = ["--target", str(tiny_teacher_dir), "--num-prompts", "2", "--max-new-tokens", "8", "--repeats", "1",
            "--out-dir", str(tmp_path / "out")]
    bad = _random_draft(tiny_teacher_dir, tmp_path / "bad", nan=True)
    assert dflash_benchmark.main([*args, "--draft", str(bad)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith("error: the draft's logits are not finite (NaN or Inf) "
                                                          "at its first proposal"), errors
    good = _random_draft(tiny_teacher_dir, tmp_path / "good", nan=False)
    assert dflash_benchmark.main([*args, "--draft", str(good)]) == 0  # the same draft without the NaN runs


def test_an_export_with_a_nan_weight_is_refused_and_writes_nothing(tiny_teacher_dir, tmp_path):
    from dflash_gptoss.export_draft import (
        NonFiniteWeightsError,
        _flat_params,
        export_nnx_draft,
        load_nnx_draft_from_torch_folder,
    )
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    folder = _random_draft(tiny_teacher_dir, tmp_path / "torch", nan=False)
    config = DFlashDraftModel.from_pretrained(folder).config
    params = {k: np.array(v) for k, v in _flat_params(load_nnx_draft_from_torch_folder(folder, dp=2, tp=4)).items()}
    key = next(k for k in params if k[-1] == "kernel")
    params[key] = params[key].copy()
    params[key].flat[:3] = [np.nan, np.inf, -np.inf]
    out = tmp_path / "export"
    with pytest.raises(NonFiniteWeightsError, match=r"the draft's parameters are not finite: .* \(3 of \d+ values\) "
                                                     "hold NaN or Inf; nothing was exported"):
        export_nnx_draft(params, config, out)
    assert not out.exists() and not list(tmp_path.glob(".export*"))  # nothing, not even a temporary folder
