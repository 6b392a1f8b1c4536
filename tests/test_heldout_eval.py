"""Held-out evaluation while training, and the export that checks itself (tiny teacher, 2x4 CPU mesh).

* a run with ``--eval-cache-dir`` scores the same held-out blocks at its first step, every
  ``--eval-steps`` and its last step; the accepted length is the benchmark's count (1 + leading correct
  slots); ``--keep-best`` exports the best evaluated step, and the export check reproduces that step's
  JAX figure with the exported torch draft (driven by the benchmark's own drafter);
* a deliberately broken export (fc columns of the wrong layers, i.e. features of layer l-1; or a
  one-slot shift of the proposals) fails the check with both figures named, and nothing is exported;
* bad eval inputs are refused before training.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss.draft_config import target_layer_ids
from dflash_gptoss.train_heldout_eval import (
    EvalBlock,
    EvalCacheError,
    EvalSet,
    TeacherTopK,
    accept_lengths,
    check_eval_cache,
    expected_accept_lengths,
    proposal_probabilities,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
CTX, B, K = 32, 8, 3
BUILD = dict(ctx_len=CTX, block_size=B, num_context_features=K, batch_size=8, layout="windows", dp=2, tp=4, seed=0)
STEPS, EVAL_STEPS = 200, 50


@pytest.fixture(scope="module")
def caches(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo's pipeline in miniature: the teacher's greedy continuations of train-split prompts (training
    cache) and of held-out-split prompts (eval cache), prompts as context only."""
    from transformers import AutoTokenizer

    from dflash_gptoss.cache_builder import build_teacher_cache
    from dflash_gptoss.data_corpus import split_prompts
    from dflash_gptoss.data_generation import generate_teacher_data
    from dflash_gptoss.teacher_jax import JaxTeacher

    root = tmp_path_factory.mktemp("caches")
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    for name, split, n in (("train", "train", 64), ("heldout", "heldout", 16)):
        generate_teacher_data(tiny_teacher_dir, root / f"{name}.jsonl", split_prompts(tok, split, n, 32, seed=1),
                              max_new_tokens=64, batch_size=n, progress=False)
    teacher = JaxTeacher(tiny_teacher_dir, target_layer_ids(6, K), dp=2, tp=4)
    out = {"train": root / "train", "eval": root / "eval", "eval_ctx24": root / "eval_ctx24"}
    build_teacher_cache(tiny_teacher_dir, out["train"], teacher=teacher, progress=False, num_blocks=64,
                        data=root / "train.jsonl", **BUILD)
    build_teacher_cache(tiny_teacher_dir, out["eval"], teacher=teacher, progress=False, num_blocks=8,
                        data=root / "heldout.jsonl", **BUILD)
    build_teacher_cache(tiny_teacher_dir, out["eval_ctx24"], teacher=teacher, progress=False, num_blocks=8,
                        data=root / "heldout.jsonl", **dict(BUILD, ctx_len=24))
    return out


def _settings(caches: dict[str, Path], teacher: Path, save: Path, **kw: object):
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings

    base = dict(cache_dir=str(caches["train"]), teacher_snapshot_dir=str(teacher), save_directory=str(save),
                model_name="m", max_training_steps=STEPS, total_batch_size=8, dp=2, tp=4, vocab_chunk_size=1024,
                log_steps=100, learning_rate=3e-3, lr_schedule="constant", anchors_per_window=8, mask_token_id=1,
                progress_bar="json", eval_cache_dir=str(caches["eval"]), eval_steps=EVAL_STEPS, keep_best=True,
                eval_temperature=1.0, eval_top_k=16)
    base.update(kw)
    return DFlashTrainingSettings(**base)


@pytest.fixture(scope="module")
def run(caches, tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    from dflash_gptoss.easydel_dflash_trainer import run_training

    root = tmp_path_factory.mktemp("run")
    summary = run_training(_settings(caches, tiny_teacher_dir, root / "ckpt", export_dir=str(root / "draft")))
    return summary, root


def test_accept_length_is_the_benchmarks_count() -> None:
    correct = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]])
    # 1 + leading run of correct slots: what one verify accepts (the target adds the corrected token)
    assert accept_lengths(correct).tolist() == [3, 1, 5]
    # The walk: a run of anchors 1..7 of row 0; anchor n accepts a, the loop's next anchor is n + a.
    per_anchor = {1: 3, 2: 1, 3: 1, 4: 2, 5: 5, 6: 1, 7: 4}
    blocks = [EvalBlock(0, n, np.zeros(5, np.int32)) for n in per_anchor]
    correct = np.array([[1] * (a - 1) + [0] * (5 - a) for a in per_anchor.values()])  # B = 5
    entry = summarize(7, 2.5, correct, EvalSet([], blocks, [(0, 1, 7)]), 0.1)
    # steps at anchors 1 (3 tokens) -> 4 (2) -> 6 (1) -> 7 (4): per step, not per position
    assert entry["eval_accept_len_hist"] == {"1": 1, "2": 1, "3": 1, "4": 1} and entry["eval_walk_steps"] == 4
    assert entry["eval_accept_len_mean"] == 2.5 and entry["eval_accept_len_position_mean"] == pytest.approx(17 / 7)
    assert entry["eval_slot_accuracy"] == pytest.approx([4 / 7, 3 / 7, 2 / 7, 1 / 7])


def test_expected_accepted_length_at_a_temperature_from_the_teachers_top_k() -> None:
    # One window of 6 positions, top-2 per position; blocks of B = 4 (3 proposals) anchored at 0 and 2.
    ids = np.array([[[5, 6], [7, 8], [1, 2], [3, 4], [9, 0], [0, 1]]])
    probs = np.array([[[0.5, 0.3], [0.6, 0.2], [0.9, 0.05], [0.4, 0.4], [0.7, 0.1], [0.5, 0.5]]])
    top = TeacherTopK(1.0, ids, probs)
    blocks = [EvalBlock(0, 0, np.zeros(4, np.int32)), EvalBlock(0, 2, np.zeros(4, np.int32))]
    eval_set = EvalSet([], blocks, [(0, 0, 0), (0, 2, 2)])
    # Slot j of the block at n proposes position n+j, whose law is the teacher's at n+j-1.
    pred = np.array([[6, 7, 2], [1, 3, 5]])  # last proposal of block 2 (5) is outside position 4's top 2
    lower, upper = proposal_probabilities(eval_set, pred, top)
    assert lower.tolist() == [[0.3, 0.6, 0.05], [0.9, 0.4, 0.0]]
    # outside the top k: at most the k-th probability (0.1) and the mass the top k miss (1 - 0.8 = 0.2)
    np.testing.assert_allclose(upper, [[0.3, 0.6, 0.05], [0.9, 0.4, 0.1]], atol=1e-15, rtol=0)
    expected = expected_accept_lengths(lower)
    assert expected.tolist() == pytest.approx([1 + 0.3 + 0.3 * 0.6 + 0.3 * 0.6 * 0.05, 1 + 0.9 + 0.9 * 0.4], abs=1e-15)
    assert expected_accept_lengths(upper)[1] == pytest.approx(1 + 0.9 + 0.36 + 0.036, abs=1e-15)
    entry = summarize(1, 0.0, np.zeros((2, 3)), eval_set, 0.0, pred, top)
    assert entry["eval_expected_accept_len_lower"] == pytest.approx(expected.mean(), abs=1e-15)
    assert entry["eval_proposals_outside_top_k"] == pytest.approx(1 / 6)
    assert entry["eval_slot_accept_prob"] == pytest.approx([0.6, 0.5, 0.025], abs=1e-15)


def test_teacher_top_probs_are_the_softmax_of_its_logits(caches, tiny_teacher_dir) -> None:
    """The on-device top-k equals numpy's float64 softmax and sort of the same teacher's logits.

    Tolerance: the device computes ``exp(l / T - max)`` in float32, whose argument carries an absolute
    error of about ``|l / T| * eps32`` (logits here reach ~30, so ~40 * 1.2e-7 = 5e-6), which becomes
    the same relative error of the probability: rtol 1e-5 is that with a 2x margin."""
    from dflash_gptoss.easydel_dflash_cache import DFlashCacheDataset
    from dflash_gptoss.teacher_jax import JaxTeacher
    from dflash_gptoss.train_heldout_eval import teacher_top_k

    ds = DFlashCacheDataset(caches["eval"], process_index=0, process_count=1)
    teacher = JaxTeacher(tiny_teacher_dir, target_layer_ids(6, K), dp=2, tp=4)
    ids = np.asarray(ds.arrays["token_ids"])[:3]
    top = teacher_top_k(teacher, ids, 0.7, 5, rows_per_call=2)  # 3 rows in calls of 2: one padded call
    assert top.ids.shape == top.probs.shape == (3, CTX, 5)
    logits = teacher.logits(np.concatenate([ids, ids[-1:]])).astype(np.float64)[:3] / 0.7
    full = np.exp(logits - logits.max(-1, keepdims=True))
    full /= full.sum(-1, keepdims=True)
    want = -np.sort(-full, axis=-1)[..., :5]
    assert np.abs(logits).max() < 50  # the bound the tolerance assumes
    np.testing.assert_allclose(top.probs, want, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.take_along_axis(full, top.ids, axis=-1), top.probs, rtol=1e-5, atol=1e-9)


def test_eval_history_keep_best_and_the_export_check(run, caches) -> None:
    from dflash_gptoss.easydel_dflash_cache import DFlashCacheDataset
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
    from dflash_gptoss.train_heldout_eval import build_eval_set

    summary, root = run
    hist = summary["eval_history"]
    assert [e["step"] for e in hist] == [1, 50, 100, 150, 200]
    blocks = build_eval_set(DFlashCacheDataset(caches["eval"], process_index=0, process_count=1), block_size=B,
                            anchors_per_item=8, rows_per_batch=8).num_blocks
    for e in hist:  # every trainable anchor scored; the walk's steps fewer (a step covers its accepted tokens)
        assert e["eval_blocks"] == blocks and sum(e["eval_accept_len_hist"].values()) == e["eval_walk_steps"]
        assert e["eval_walk_steps"] <= blocks  # each step consumes at least its own anchor
        assert 1 <= e["eval_accept_len_median"] <= B and 1 <= e["eval_accept_len_mean"] <= B
        assert len(e["eval_slot_accuracy"]) == B - 1 and np.isfinite(e["eval_loss"])
        # at temperature 1: an expected accepted length per block, bounded by what the top 16 miss
        assert e["eval_temperature"] == 1.0 and e["eval_top_k"] == 16
        assert 1 <= e["eval_expected_accept_len_lower"] <= e["eval_expected_accept_len_upper"] <= B
        assert len(e["eval_slot_accept_prob"]) == B - 1 and all(0 <= p <= 1 for p in e["eval_slot_accept_prob"])
    # the draft learns what held-out text needs (measured: loss 5.80 -> 4.08 at best, accepted 1.00 -> 1.46)
    assert min(e["eval_loss"] for e in hist[1:]) < hist[0]["eval_loss"] - 1.0
    means = [e["eval_accept_len_mean"] for e in hist]
    assert max(means) > means[0] + 0.2
    best = hist[int(np.argmax(means))]
    assert summary["best_eval_step"] == best["step"] == summary["exported_step"]
    check = summary["export_check"]
    assert check["passed"] and check["blocks_from"] == "held-out" and check["num_anchors"] == blocks
    # the check's JAX figure is the best evaluation's own per-block mean (same blocks, parameters, function)
    assert check["jax_accept_len_mean"] == pytest.approx(best["eval_accept_len_position_mean"], abs=1e-12)
    assert abs(check["torch_accept_len_mean"] - check["jax_accept_len_mean"]) <= 0.02
    assert json.loads((root / "draft" / "export_check.json").read_text()) == check
    DFlashDraftModel.from_pretrained(root / "draft")


def _export_again(caches, teacher: Path, root: Path, out: Path):
    """Resume the finished run (no step left) and export it again: the export and its check only."""
    from dflash_gptoss.easydel_dflash_trainer import run_training

    return run_training(_settings(caches, teacher, root / "ckpt", resume=True, keep_best=False, export_dir=str(out)))


@pytest.mark.parametrize("broken", ["features_of_layer_l_minus_1", "one_slot_shift"])
def test_a_broken_export_is_caught_and_not_exported(run, caches, tiny_teacher_dir, tmp_path, monkeypatch,
                                                    broken) -> None:
    import dflash_gptoss.decoding
    import dflash_gptoss.export_draft
    from dflash_gptoss.export_check import ExportCheckError

    _, root = run
    if broken == "features_of_layer_l_minus_1":  # fc's column block for layer l holds layer l-1's weights
        real = dflash_gptoss.export_draft.to_torch_state

        def to_torch_state(params, config):
            state = real(params, config)
            state["fc.weight"] = np.roll(state["fc.weight"], state["fc.weight"].shape[0], axis=1)
            return state

        monkeypatch.setattr(dflash_gptoss.export_draft, "to_torch_state", to_torch_state)
    else:  # slot k proposes the token of position n+k+1 (a causal-LM shift at inference)
        import torch

        real = dflash_gptoss.decoding.DFlashDrafter.propose_logits

        def propose_logits(self, anchor, position, num):  # what propose (its argmax) and sampling both read
            logits = real(self, anchor, position, num)
            return torch.cat([logits[1:], torch.zeros_like(logits[:1])])

        monkeypatch.setattr(dflash_gptoss.decoding.DFlashDrafter, "propose_logits", propose_logits)
    out = tmp_path / "draft"
    with pytest.raises(ExportCheckError, match=r"accepted length \d\.\d{4} \(torch\) vs \d\.\d{4} \(JAX\), gap"):
        _export_again(caches, tiny_teacher_dir, root, out)
    assert not out.exists()  # nothing exported
    rejected = json.loads((tmp_path / "draft.rejected" / "export_check.json").read_text())
    # either figure may give it away (a barely trained draft accepts ~1 token either way; its slots differ)
    assert not rejected["passed"] and (rejected["accept_len_gap"] > 0.02 or rejected["max_slot_accuracy_gap"] > 0.01)
    monkeypatch.undo()
    again = _export_again(caches, tiny_teacher_dir, root, out)  # the same run, exported correctly
    assert again["export_check"]["passed"] and (out / "model.safetensors").is_file()


def test_bad_eval_inputs_are_refused_before_training(caches, tiny_teacher_dir, tmp_path) -> None:
    from dflash_gptoss.cache_format import read_meta
    from dflash_gptoss.easydel_dflash_trainer import TrainerInputError, build_trainer

    with pytest.raises(EvalCacheError, match="ctx_len: training cache 32, eval cache 24"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_cache_dir=str(caches["eval_ctx24"])))
    meta = read_meta(caches["train"])
    other = json.loads(json.dumps(meta))
    other["teacher"]["weights_fingerprint"] = "0" * 64
    with pytest.raises(EvalCacheError, match="teacher weights fingerprint"):
        check_eval_cache(meta, other, "elsewhere")
    with pytest.raises(TrainerInputError, match="--keep-best needs --eval-cache-dir"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_cache_dir=None, eval_steps=None))
    with pytest.raises(TrainerInputError, match="--eval-steps needs --eval-cache-dir"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_cache_dir=None, keep_best=False))
    # the training cache itself, and a cache that shares its windows (same data, the seed relabelled), are not
    # held out
    with pytest.raises(EvalCacheError, match=r"is the training cache .* its figures would not be held out"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_cache_dir=str(caches["train"])))
    from dflash_gptoss.cache_format import write_json_atomic
    from dflash_gptoss.run_safety.integrity import write_manifest

    shutil.copytree(caches["train"], tmp_path / "relabelled")
    relabelled = dict(read_meta(tmp_path / "relabelled"), seed=7)
    write_json_atomic(tmp_path / "relabelled" / "meta.json", relabelled)
    write_manifest(tmp_path / "relabelled", kind="teacher-cache")
    with pytest.raises(EvalCacheError, match=r"shares 64 window\(s\) with the training cache .* \(e\.g\. its row "
                                             r"0 is training row 0, token for token\)"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_cache_dir=str(tmp_path / "relabelled")))
    with pytest.raises(TrainerInputError, match="--eval-temperature needs --eval-cache-dir"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_cache_dir=None, keep_best=False,
                                eval_steps=None))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(TrainerInputError, match="--eval-temperature must be a finite number > 0"):
            build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_temperature=bad))
    with pytest.raises(TrainerInputError, match="--eval-top-k 5000 is more than the teacher's 4096 tokens"):
        build_trainer(_settings(caches, tiny_teacher_dir, tmp_path, eval_top_k=5000))
    assert not (tmp_path / "m").exists()
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import tpu_dflash_train_with_easydel_trainer as cli
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["--cache-dir", "c", "--teacher-snapshot-dir", "t", "--save-directory", "s",
                                       "--max-training-steps", "1", "--eval-steps", "0"])
    assert info.value.code == 2


def test_the_export_check_fails_on_non_finite_torch_outputs(run, caches, tiny_teacher_dir, tmp_path) -> None:
    """Whatever the accepted lengths would say: an exported draft whose logits are NaN fails the check."""
    from safetensors.numpy import load_file, save_file

    from dflash_gptoss.easydel_dflash_cache import DFlashCacheDataset
    from dflash_gptoss.export_check import ExportCheckError, torch_correct
    from dflash_gptoss.train_heldout_eval import build_eval_set

    _, root = run
    broken = tmp_path / "draft"
    shutil.copytree(root / "draft", broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["fc.weight"] = tensors["fc.weight"].copy()
    tensors["fc.weight"][:] = np.nan
    save_file(tensors, str(broken / "model.safetensors"))
    cache = DFlashCacheDataset(caches["eval"], process_index=0, process_count=1)
    blocks = build_eval_set(cache, block_size=B, anchors_per_item=8, rows_per_batch=8).blocks[:16]
    with pytest.raises(ExportCheckError, match=r"the exported torch draft's logits are not finite \(NaN or Inf\) "
                                               r"on block 0 \(cache row 0, anchor \d+\); nothing was exported"):
        torch_correct(broken, tiny_teacher_dir, cache, blocks)
    assert torch_correct(root / "draft", tiny_teacher_dir, cache, blocks).shape == (16, B - 1)
