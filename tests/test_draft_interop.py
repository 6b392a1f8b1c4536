"""Drafts that load everywhere, proven by loading (``docs/interop.md``, "What the tests prove, and what they do not").

* every saved/exported folder loads with ``AutoModel.from_pretrained(folder, trust_remote_code=True)``
  in a Python where dflash_gptoss cannot be imported, and gives bit-identical outputs;
* ``config.json``'s legacy ``rope_theta`` + ``rope_scaling`` alone build the same rotary embedding
  (what loaders on transformers 4.x read);
* a draft in the published gpt-oss layout (q/k/v/o biases, legacy RoPE keys only, z-lab's
  ``auto_map``) loads in the benchmark, which stays lossless with it;
* an export never half-writes and never replaces a folder that is not a draft.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from dflash_gptoss.draft_config import make_draft_config
from dflash_gptoss.export_draft import ExportDirError, check_export_dir, export_nnx_draft
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.tiny_teacher import tiny_gptoss_config

REPO = Path(__file__).resolve().parents[1]

# openai/gpt-oss-20b's RoPE (its config.json): YaRN x32 over 4096 positions, truncate off.
GPT_OSS_20B_ROPE = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                    "beta_slow": 1.0, "original_max_position_embeddings": 4096, "truncate": False}


def _tiny_draft(seed: int = 0, **target_overrides) -> DFlashDraftModel:
    torch.manual_seed(seed)
    config = make_draft_config(tiny_gptoss_config(**target_overrides), num_hidden_layers=2, block_size=8,
                               mask_token_id=3, num_context_features=3)
    draft = DFlashDraftModel(config).eval()
    with torch.no_grad():  # norms away from their all-ones init, so a norm that failed to load shows
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return draft


def _draft_inputs(draft: DFlashDraftModel, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden, k = draft.config.hidden_size, len(draft.target_layer_ids)
    return {"block_embeddings": torch.randn(2, 8, hidden, generator=g),
            "target_features": torch.randn(2, 11, k * hidden, generator=g),
            "position_ids": (500 + torch.arange(19)).expand(2, -1).contiguous()}


def _as_nnx_params(draft: DFlashDraftModel) -> dict[tuple[str, ...], object]:
    """The draft's weights as the JAX trainer holds them: ``{nnx path: array}``, kernels ``[in, out]``."""
    return {tuple(name.split(".")[:-1]) + ("kernel" if p.dim() == 2 else "weight",):
            (p.detach().T if p.dim() == 2 else p.detach()).numpy() for name, p in draft.named_parameters()}


# A Python where dflash_gptoss cannot be imported: isolated mode (no PYTHONPATH, no cwd on the
# path), the editable install's finder removed, and every sys.path entry holding the package dropped.
# It loads each folder with AutoModel + trust_remote_code (the folder's own code) and, as a loader that
# runs no remote code would, with a plain Qwen3Config; then it saves outputs and rotary tables.
_ISOLATED_LOADER = r"""
import importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "dflash_gptoss"))]
if sys.argv[3]:
    sys.path.insert(0, sys.argv[3])  # another transformers (e.g. 4.57.1), installed with --target
assert importlib.util.find_spec("dflash_gptoss") is None, "dflash_gptoss is still importable"
import torch, transformers
from transformers import AutoConfig, AutoModel, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
inputs = torch.load(sys.argv[1])
results = {}
for folder in sys.argv[4:]:
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(**inputs)
    plain = Qwen3RotaryEmbedding(Qwen3Config.from_pretrained(folder))
    results[folder] = {"out": out, "model_module": type(model).__module__, "model_class": type(model).__name__,
                       "config_class": type(config).__name__, "transformers": transformers.__version__,
                       "plain_inv_freq": plain.inv_freq, "plain_scaling": plain.attention_scaling}
assert not any(m == "dflash_gptoss" or m.startswith("dflash_gptoss.") for m in sys.modules)
torch.save(results, sys.argv[2])
"""


def _load_in_isolation(tmp_path: Path, inputs: dict[str, torch.Tensor], folders: list[Path],
                       transformers_path: str = "") -> dict[str, dict]:
    """Run :data:`_ISOLATED_LOADER` on ``folders``; its results by folder."""
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-I", "-c", _ISOLATED_LOADER, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt"), transformers_path, *map(str, folders)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "outputs.pt")


def _assert_same_draft(got: dict, draft: DFlashDraftModel, expected: torch.Tensor) -> None:
    assert got["model_module"].startswith("transformers_modules."), got["model_module"]  # the folder's copy
    assert (got["model_class"], got["config_class"]) == ("DFlashDraftModel", "DFlashDraftConfig")
    assert torch.equal(got["out"], expected), (got["out"] - expected).abs().max()
    # A loader without this package (plain Qwen3Config, as engines read the folder) gets the draft's exact RoPE.
    assert torch.equal(got["plain_inv_freq"], draft.rotary_emb.inv_freq)
    assert got["plain_scaling"] == draft.rotary_emb.attention_scaling


def test_saved_and_exported_folders_load_with_automodel_without_dflash_gptoss(tmp_path):
    """Both writers (torch ``save_pretrained`` and the trainer's JAX export) give self-contained folders."""
    draft = _tiny_draft()
    saved = tmp_path / "saved"
    draft.save_pretrained(saved)
    # The trainer's --export-dir path: export_nnx_draft over the {nnx path: array} mapping run_training passes.
    exported = export_nnx_draft(_as_nnx_params(draft), draft.config, tmp_path / "exported")
    for folder in (saved, exported):
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["config.json", "configuration_gptoss_dflash.py", "model.safetensors",
                         "modeling_gptoss_dflash.py"], files
        raw = json.loads((folder / "config.json").read_text())
        assert raw["auto_map"] == {"AutoConfig": "configuration_gptoss_dflash.DFlashDraftConfig",
                                   "AutoModel": "modeling_gptoss_dflash.DFlashDraftModel"}
        assert raw["model_type"] == "qwen3" and raw["architectures"] == ["DFlashDraftModel"]
    inputs = _draft_inputs(draft)
    with torch.no_grad():
        expected = draft(**inputs)
    results = _load_in_isolation(tmp_path, inputs, [saved, exported])
    for folder in (saved, exported):
        _assert_same_draft(results[str(folder)], draft, expected)


@pytest.mark.skipif(not os.environ.get("DFLASH_TRANSFORMERS4_PATH"),
                    reason="set DFLASH_TRANSFORMERS4_PATH to a transformers 4.x installed with pip --target "
                           "(see the test's docstring)")
def test_folder_loads_on_transformers_4x(tmp_path):
    """The same proof under transformers 4.x (z-lab's reference pins 4.57.1), YaRN as gpt-oss-20b's.

    Needs a second transformers beside the venv's, e.g.
    ``pip install --no-deps --target /tmp/tf4 transformers==4.57.1 huggingface_hub==0.36.0`` then
    ``DFLASH_TRANSFORMERS4_PATH=/tmp/tf4 pytest tests/test_draft_interop.py -k transformers_4x``.
    """
    draft = _tiny_draft(head_dim=64, rope_parameters=dict(GPT_OSS_20B_ROPE), max_position_embeddings=131072)
    draft.save_pretrained(tmp_path / "draft")
    inputs = _draft_inputs(draft)
    with torch.no_grad():
        expected = draft(**inputs)
    got = _load_in_isolation(tmp_path, inputs, [tmp_path / "draft"], os.environ["DFLASH_TRANSFORMERS4_PATH"])
    got = got[str(tmp_path / "draft")]
    assert got["transformers"].startswith("4."), got["transformers"]
    _assert_same_draft(got, draft, expected)


def test_legacy_rope_keys_alone_build_our_rotary_embedding(tmp_path):
    """transformers 4.x reads ``rope_theta`` + ``rope_scaling`` only; they must give the draft's exact RoPE."""
    draft = _tiny_draft(head_dim=64, rope_parameters=dict(GPT_OSS_20B_ROPE), max_position_embeddings=131072)
    draft.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_parameters"] == GPT_OSS_20B_ROPE
    assert raw["rope_theta"] == 150000.0
    assert raw["rope_scaling"] == {k: v for k, v in GPT_OSS_20B_ROPE.items() if k != "rope_theta"}

    legacy = {k: v for k, v in raw.items() if k not in ("rope_parameters", "auto_map")}
    legacy_config = Qwen3Config(**legacy)  # transformers' own legacy path: rope_scaling/rope_theta -> parameters
    ours = draft.rotary_emb
    theirs = Qwen3RotaryEmbedding(legacy_config)
    assert torch.equal(theirs.inv_freq, ours.inv_freq)
    assert theirs.attention_scaling == ours.attention_scaling == pytest.approx(1 + 0.1 * torch.log(torch.tensor(32.)))
    x = torch.zeros(1, 1, 64)
    positions = torch.tensor([[0, 1, 4095, 4096, 70000, 131071]])
    for a, b in zip(theirs(x, positions), ours(x, positions), strict=True):
        assert torch.equal(a, b)

    # The test can fail: without `truncate` (default true) YaRN's ramp moves, and without both legacy
    # keys a 4.x loader falls back to theta 10000 and no YaRN at all.
    no_truncate = dict(legacy, rope_scaling={k: v for k, v in legacy["rope_scaling"].items() if k != "truncate"})
    assert not torch.equal(Qwen3RotaryEmbedding(Qwen3Config(**no_truncate)).inv_freq, ours.inv_freq)
    bare = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling")}
    assert Qwen3RotaryEmbedding(Qwen3Config(**bare)).attention_scaling == 1.0


def _published_layout_folder(folder: Path, target_config, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A draft written the way the published gpt-oss draft is (per docs/interop.md), random weights.

    transformers-4.57 style ``config.json`` (``rope_theta`` + ``rope_scaling``, no ``rope_parameters``),
    z-lab's ``auto_map``, ``attention_bias: true`` and q/k/v/o ``.bias`` tensors.
    """
    hidden, heads, kv, hd = (target_config.hidden_size, target_config.num_attention_heads,
                             target_config.num_key_value_heads, target_config.head_dim)
    layers, inter, ids = 2, 2 * hidden, [1, 2, 3]
    rope = dict(target_config.rope_parameters)
    config = {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", "transformers_version": "4.57.1", "torch_dtype": "bfloat16",
        "vocab_size": target_config.vocab_size, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "hidden_act": "silu", "attention_bias": True, "attention_dropout": 0.0, "rms_norm_eps": 1e-5,
        "max_position_embeddings": target_config.max_position_embeddings, "rope_theta": rope.pop("rope_theta"),
        "rope_scaling": rope, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": layers, "layer_types": ["full_attention"] * layers,
        "block_size": 8, "num_target_layers": target_config.num_hidden_layers,
        "dflash_config": {"mask_token_id": 1, "target_layer_ids": ids},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(seed)
    state = {"fc.weight": torch.randn(hidden, len(ids) * hidden, generator=g) * 0.02,
             "hidden_norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
             "norm.weight": 1 + 0.1 * torch.randn(hidden, generator=g)}
    shapes = {"q_proj": (heads * hd, hidden), "k_proj": (kv * hd, hidden), "v_proj": (kv * hd, hidden),
              "o_proj": (hidden, heads * hd)}
    for i in range(layers):
        p = f"layers.{i}."
        for name, (out, inp) in shapes.items():
            state[f"{p}self_attn.{name}.weight"] = torch.randn(out, inp, generator=g) * 0.02
            state[f"{p}self_attn.{name}.bias"] = torch.randn(out, generator=g) * 0.02
        for name in ("q_norm", "k_norm"):
            state[f"{p}self_attn.{name}.weight"] = 1 + 0.1 * torch.randn(hd, generator=g)
        for name in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}{name}.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        state[f"{p}mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.02
        state[f"{p}mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g) * 0.02
        state[f"{p}mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g) * 0.02
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return state


def test_published_layout_with_attention_biases_loads_in_the_benchmark(tiny_teacher_dir, tmp_path):
    """q/k/v/o biases + legacy-only RoPE keys: loaded exactly, used, and the benchmark stays lossless."""
    sys.path.insert(0, str(REPO / "scripts"))
    import dflash_benchmark
    from transformers import AutoConfig

    target_config = AutoConfig.from_pretrained(tiny_teacher_dir)
    folder = tmp_path / "published"
    folder.mkdir()
    state = _published_layout_folder(folder, target_config)

    draft = DFlashDraftModel.from_pretrained(folder)
    assert draft.config.attention_bias is True
    assert draft.config.rope_parameters == dict(target_config.rope_parameters)  # from the legacy keys
    loaded = draft.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor.float()), name  # bf16 -> float32 is exact
    inputs = _draft_inputs(draft)
    with torch.no_grad():
        with_bias = draft(**inputs)
        for layer in draft.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).bias.zero_()
        assert not torch.allclose(draft(**inputs), with_bias)  # the biases take part in the forward

    code = dflash_benchmark.main(["--target", str(tiny_teacher_dir), "--draft", str(folder), "--num-prompts", "2",
                                  "--max-new-tokens", "24", "--block-size", "8", "--out-dir", str(tmp_path / "bench"),
                                  "--no-warmup"])
    assert code == 0
    [report_file] = (tmp_path / "bench").glob("bench_*.json")
    report = json.loads(report_file.read_text())
    assert report["lossless_all"] and report["lossless_prompts"] == 2
    assert report["settings"]["target_layer_ids"] == [1, 2, 3] and report["settings"]["draft_layers"] == 2


def test_export_refuses_a_folder_that_is_not_a_draft(tmp_path):
    """Refused before any work, with the path in the message; untouched afterwards."""
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportDirError, match=f"export folder '{precious}' exists and is not a DFlash draft"):
        check_export_dir(precious)
    with pytest.raises(ExportDirError, match="exists and is not a DFlash draft"):
        export_nnx_draft({}, None, precious)  # refused before the (here impossible) weights are even read
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ExportDirError, match="is a file, not a folder"):
        check_export_dir(a_file)
    (tmp_path / "empty").mkdir()
    assert check_export_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_export_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_export_is_atomic_and_replaces_an_earlier_draft(tmp_path):
    draft = _tiny_draft()
    params = _as_nnx_params(draft)
    out = tmp_path / "draft"

    def failing_check(folder: Path) -> None:
        assert (folder / "model.safetensors").is_file()  # runs on the complete folder, before the rename
        raise RuntimeError("export check failed")

    with pytest.raises(RuntimeError, match="export check failed"):
        export_nnx_draft(params, draft.config, out, before_commit=failing_check)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary folder left

    draft.save_pretrained(out)  # an earlier draft, plus a stale file an export must not keep
    (out / "stale.json").write_text("{}")
    export_nnx_draft(params, draft.config, out, dtype="bfloat16",
                     before_commit=lambda folder: (folder / "export_check.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "configuration_gptoss_dflash.py",
                                                     "export_check.json", "model.safetensors",
                                                     "modeling_gptoss_dflash.py"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_trainer_cli_refuses_a_non_draft_export_dir_before_training(tmp_path):
    """One ``error:`` line, exit code 2, before any JAX work; the folder is left as it was."""
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    (tmp_path / "cache").mkdir()
    (tmp_path / "teacher").mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "tpu_dflash_train_with_easydel_trainer.py"), "--cache-dir",
         str(tmp_path / "cache"), "--teacher-snapshot-dir", str(tmp_path / "teacher"), "--save-directory",
         str(tmp_path / "ckpt"), "--max-training-steps", "1", "--export-dir", str(precious)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"export folder '{precious}' exists and is not a DFlash draft" in errors[0]
    assert "Traceback" not in proc.stderr
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and not (tmp_path / "ckpt").exists()


def test_a_killed_exports_leftovers_are_removed_by_the_next_export(tmp_path, caplog):
    """A SIGKILLed export leaves a hidden ``.<export>.tmp-*`` folder (up to a draft's size): the next export
    removes it and says so in one line."""
    draft = _tiny_draft()
    out = tmp_path / "draft"
    left = tmp_path / ".draft.tmp-abc123"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 1024)
    old = tmp_path / ".draft.old-1234abcd"
    old.mkdir()
    unrelated = tmp_path / ".other.tmp-zzz"
    unrelated.mkdir()
    with caplog.at_level("WARNING", logger="dflash_gptoss.export_draft"):
        export_nnx_draft(_as_nnx_params(draft), draft.config, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-zzz", "draft"]
    [record] = [r for r in caplog.records if r.name == "dflash_gptoss.export_draft"]
    assert record.getMessage() == (f"removed 2 folder(s) left beside {out} by an export that was killed: "
                                   ".draft.old-1234abcd, .draft.tmp-abc123")


def test_a_damaged_draft_folder_is_exit_2_naming_the_file_before_the_target_loads(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import dflash_benchmark
    finally:
        sys.path.pop(0)

    def refuse(*args, **kwargs):
        raise AssertionError("the target was loaded before the bad draft was refused")

    monkeypatch.setattr("dflash_gptoss.teacher_torch.load_target", refuse)
    draft = _tiny_draft()
    folder = tmp_path / "draft"
    draft.save_pretrained(folder)
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])
    capsys.readouterr()  # (the save's progress bar)
    assert dflash_benchmark.main(["--target", "tiny", "--draft", str(folder), "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --draft '{folder}': {weights}: its tensors need {size} bytes but the file has "
                   f"{size // 2}; the file is truncated: write or download it again.\n")
    (folder / "config.json").write_text('{"model_type": "qwen3",')
    assert dflash_benchmark.main(["--target", "tiny", "--draft", str(folder), "--out-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --draft '{folder}': {folder / 'config.json'}:1:")
