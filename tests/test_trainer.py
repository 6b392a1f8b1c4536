"""The easydel DFlash trainer on the tiny teacher's caches (CPU, 8 host devices).

What is checked, and why:
* training on a ``windows`` cache lowers the loss and raises the expected accepted length
  (the figure the benchmark cares about) over a short run;
* one step on dp=8 x tp=1 equals one step on dp=2 x tp=4 (easydel meshes need dp*tp = the
  8 visible devices, so dp=1 x tp=1 cannot be run here): the batch is sharded over dp and
  the gradient reduction over dp falls out of jit, the exact CE over tp-sharded vocab. The two
  meshes sum in different orders, so "equal" means what float32 and AdamW promise
  (:func:`assert_same_first_adam_step`), never bit equality;
* checkpoints land in ``save_directory/model_name/run-<step>``, ``resume`` continues from the
  latest, and exporting a checkpoint equals exporting the final in-memory state;
* bad inputs fail before compiling, with a clear message (and exit code 2 from the CLI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss.draft_config import target_layer_ids
from dflash_gptoss.easydel_dflash_cache import CacheMismatchError

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "scripts" / "tpu_dflash_train_with_easydel_trainer.py"
CTX, B, K = 32, 8, 3


@pytest.fixture(scope="module")
def caches(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A ``blocks`` cache (48 blocks) and a ``windows`` cache (16 windows), one shared JAX teacher."""
    from dflash_gptoss.cache_builder import build_teacher_cache
    from dflash_gptoss.teacher_jax import JaxTeacher

    root = tmp_path_factory.mktemp("caches")
    teacher = JaxTeacher(tiny_teacher_dir, target_layer_ids(6, K), dp=2, tp=4)
    out = {}
    for layout, n in (("blocks", 48), ("windows", 16)):
        build_teacher_cache(tiny_teacher_dir, root / layout, teacher=teacher, progress=False, ctx_len=CTX,
                            block_size=B, num_context_features=K, num_blocks=n, batch_size=16, layout=layout,
                            dp=2, tp=4, seed=0)
        out[layout] = root / layout
    return out


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different tiny GPT-OSS (hidden 64, vocab 4098): not divisible by tp=4, mismatching the caches."""
    import torch
    from transformers import GptOssForCausalLM

    from dflash_gptoss.tiny_teacher import tiny_gptoss_config

    root = tmp_path_factory.mktemp("other_teacher")
    torch.manual_seed(0)
    cfg = tiny_gptoss_config(vocab_size=4098, hidden_size=64)
    GptOssForCausalLM(cfg).float().save_pretrained(root)
    return root


LR = 3e-3  # the learning rate of _settings (constant schedule, no warmup, no weight decay)
ADAM_EPS = 1e-8  # eformer's AdamW default; the trainer does not change it
GRAD_NOISE = 1e-4
"""Gradients of one batch summed in two orders (two meshes, or accumulation) agree within
``GRAD_NOISE * max|g|`` of each tensor: float32 sums of n terms drift by ~sqrt(n) * 6e-8 of the
terms' size, ~1e-6 of the largest gradient for the few thousand terms here (measured: 6e-7);
1e-4 leaves a 150x margin for other machines' thread counts and summation orders."""
PARAM_ATOL = 1e-6


def _first_batch_grads(trainer) -> tuple[float, dict[tuple[str, ...], np.ndarray]]:
    """Loss and gradient of the first batch the trainer's stream yields, by the trainer's own loss
    function (``dflash_batch_loss``) on the trainer's mesh; call before ``train()``."""
    import jax
    from flax import nnx

    from dflash_gptoss.train_step import dflash_batch_loss

    batch, state = next(trainer._stream()), trainer.model_state

    def loss(tree):
        return dflash_batch_loss(state.merge(tree), batch, trainer.frozen_embed, trainer.frozen_lm_head,
                                 mesh=trainer.model.mesh, mask_token_id=trainer.mask_token_id,
                                 weights=trainer.loss_weights, vocab_chunk_size=trainer.vocab_chunk_size)[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(state.graphstate)
    return float(value), {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}


def assert_same_first_adam_step(pa: dict, pb: dict, ga: dict, gb: dict) -> None:
    """Parameters after ONE AdamW step from the same init, with gradients ``ga`` / ``gb`` summed in
    two orders, agree as far as the math promises.

    AdamW's first, bias-corrected update of element i is ``lr * g_i / (|g_i| + eps)``. Where ``|g_i|``
    is far above ``eps`` that is ``lr * sign(g_i)`` whatever the summation order; where ``g_i`` sits at
    the float32 noise floor it can be anything in ``(-lr, lr)`` on each side. So:

    * the gradients agree within ``GRAD_NOISE * max|g|`` per tensor (``delta``);
    * every parameter agrees within ``2 * lr`` (two first steps can differ by no more);
    * where ``|g_i| >= sqrt(2 * lr * eps * delta / PARAM_ATOL)`` the update's sensitivity
      ``lr * eps / g_i**2`` times the gradient difference ``2 * delta`` is below ``PARAM_ATOL``, so
      those parameters agree within ``PARAM_ATOL`` (1e-6, far above float32 rounding of weights ~0.1).
    """
    assert pa.keys() == pb.keys() == ga.keys() == gb.keys()
    for k in pa:
        delta = GRAD_NOISE * float(np.abs(ga[k]).max())
        np.testing.assert_allclose(ga[k], gb[k], rtol=0, atol=delta, err_msg=f"gradient {k}")
        diff = np.abs(pa[k] - pb[k])
        assert diff.max() <= 2 * LR * (1 + 1e-3), (k, float(diff.max()))
        firm = np.minimum(np.abs(ga[k]), np.abs(gb[k])) >= np.sqrt(2 * LR * ADAM_EPS * delta / PARAM_ATOL)
        assert firm.mean() > 0.5, (k, float(firm.mean()))  # the check below must cover most of the tensor
        np.testing.assert_allclose(pa[k][firm], pb[k][firm], rtol=0, atol=PARAM_ATOL, err_msg=f"parameter {k}")


def _settings(cache: Path, teacher: Path, save: Path, **kw: object):
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings

    base = dict(cache_dir=str(cache), teacher_snapshot_dir=str(teacher), save_directory=str(save), model_name="m",
                max_training_steps=2, total_batch_size=8, dp=2, tp=4, vocab_chunk_size=1024, log_steps=100,
                learning_rate=3e-3, lr_schedule="constant", num_draft_layers=1, anchors_per_window=8,
                mask_token_id=1, progress_bar="json")
    base.update(kw)
    return DFlashTrainingSettings(**base)


def test_short_run_learns(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    from dflash_gptoss.easydel_dflash_trainer import run_training

    s = _settings(caches["windows"], tiny_teacher_dir, tmp_path, max_training_steps=40, loss_decay_gamma=4.0)
    hist = run_training(s)["history"]
    assert [h["step"] for h in hist] == list(range(1, 41))
    loss = np.array([h["loss"] for h in hist])
    accept = np.array([h["expected_accept_len"] for h in hist])
    assert np.isfinite(loss).all()
    print(f"loss {loss[0]:.3f} -> {loss[-1]:.3f}; expected accepted length {accept[0]:.3f} -> {accept[-1]:.3f}")
    assert loss[-5:].mean() < loss[:5].mean() - 1.0
    assert accept[-5:].mean() > accept[:5].mean() + 0.05
    assert all(1.0 <= h["mean_accept_len"] <= B for h in hist)


def test_one_step_same_on_dp8_and_dp2_tp4(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    from dflash_gptoss.easydel_dflash_draft_model import param_arrays
    from dflash_gptoss.easydel_dflash_trainer import build_trainer

    results = []
    for dp, tp in ((8, 1), (2, 4)):
        trainer, _ = build_trainer(_settings(caches["blocks"], tiny_teacher_dir, tmp_path / f"{dp}x{tp}",
                                             max_training_steps=1, dp=dp, tp=tp))
        loss, grads = _first_batch_grads(trainer)
        state = trainer.train().state
        params = {k: np.asarray(v) for k, v in param_arrays(state.model).items()}
        results.append((trainer.history[0]["loss"], loss, grads, params))
        assert not any("embed" in "/".join(k) or "lm_head" in "/".join(k) for k in params)  # frozen: not state
    (loss_a, fn_a, ga, pa), (loss_b, fn_b, gb, pb) = results
    # a mean over ~400 float32 terms in another order: ~1e-7 relative; 1e-5 is 100x that
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert fn_a == pytest.approx(loss_a, rel=1e-5) and fn_b == pytest.approx(loss_b, rel=1e-5)
    print("max |grad diff| / max|grad|:", max(float(np.abs(ga[k] - gb[k]).max() / np.abs(ga[k]).max()) for k in ga),
          " max |param diff|:", max(float(np.abs(pa[k] - pb[k]).max()) for k in pa))
    assert_same_first_adam_step(pa, pb, ga, gb)


def test_checkpoint_resume_and_export(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from dflash_gptoss.easydel_dflash_trainer import build_trainer, export_checkpoint, latest_checkpoint, run_training

    first = run_training(_settings(caches["blocks"], tiny_teacher_dir, tmp_path, max_training_steps=3, save_steps=2))
    assert first["final_step"] == 3
    assert sorted(p.name for p in (tmp_path / "m").glob("run-*")) == ["run-2", "run-3"]
    resumed = run_training(_settings(caches["blocks"], tiny_teacher_dir, tmp_path, max_training_steps=5,
                                     resume=True, export_dir=str(tmp_path / "export")))
    assert (resumed["start_step"], resumed["final_step"]) == (3, 5)
    assert [h["step"] for h in resumed["history"]] == [4, 5]
    latest = latest_checkpoint(tmp_path, "m")
    assert latest is not None and latest.name == "run-5"
    _, draft_config = build_trainer(_settings(caches["blocks"], tiny_teacher_dir, tmp_path / "unused"))
    again = export_checkpoint(latest, draft_config, tmp_path / "export_ckpt")
    final, reloaded = load_file(tmp_path / "export" / "model.safetensors"), load_file(again / "model.safetensors")
    assert final.keys() == reloaded.keys() and "fc.weight" in final
    for k in final:
        np.testing.assert_array_equal(final[k], reloaded[k], err_msg=k)
    assert (tmp_path / "export" / "config.json").is_file()
    # Stopping at step 3 and resuming to 5 ends where an uninterrupted 5-step run ends.
    straight = tmp_path / "straight"
    run_training(_settings(caches["blocks"], tiny_teacher_dir, straight, max_training_steps=5, save_steps=100,
                           export_dir=str(straight / "export")))
    uninterrupted = load_file(straight / "export" / "model.safetensors")
    for k in final:
        np.testing.assert_allclose(final[k], uninterrupted[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_bad_inputs(caches, tiny_teacher_dir, other_teacher, tmp_path: Path) -> None:
    from dflash_gptoss.easydel_dflash_trainer import TrainerInputError, build_trainer

    with pytest.raises(TrainerInputError, match="not divisible by dp=4"):
        build_trainer(_settings(caches["blocks"], tiny_teacher_dir, tmp_path, total_batch_size=6, dp=4, tp=2))
    with pytest.raises(TrainerInputError, match="vocab_size=4098 is not divisible by tp=4"):
        build_trainer(_settings(caches["blocks"], other_teacher, tmp_path))
    with pytest.raises(CacheMismatchError, match="block_size"):
        build_trainer(_settings(caches["blocks"], tiny_teacher_dir, tmp_path, block_size=4))
    with pytest.raises(CacheMismatchError, match="hidden_size"):
        build_trainer(_settings(caches["blocks"], other_teacher, tmp_path, dp=4, tp=2))
    with pytest.raises(TrainerInputError, match="must equal the 8 visible devices"):
        build_trainer(_settings(caches["blocks"], tiny_teacher_dir, tmp_path, dp=2, tp=2))


def test_cli_bad_input_is_one_error_line(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    args = [sys.executable, str(CLI), "--cache-dir", str(caches["blocks"]), "--teacher-snapshot-dir",
            str(tiny_teacher_dir), "--save-directory", str(tmp_path), "--max-training-steps", "1"]
    for extra, message in ((["--total-batch-size", "6", "--dp", "4", "--tp", "2"], "not divisible by --dp 4"),
                           (["--dp", "2", "--tp", "2"], "must equal the 8 visible devices")):
        proc = subprocess.run(args + extra, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_gradient_accumulation_equals_one_big_batch(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    """2 x 4 rows accumulated == 8 rows at once (same rows: a step reads total_batch_size * accumulation)."""
    from dflash_gptoss.easydel_dflash_draft_model import param_arrays
    from dflash_gptoss.easydel_dflash_trainer import build_trainer

    out = []
    for batch, acc in ((8, 1), (4, 2)):
        s = _settings(caches["blocks"], tiny_teacher_dir, tmp_path / str(acc), max_training_steps=1,
                      total_batch_size=batch, gradient_accumulation_steps=acc)
        trainer, _ = build_trainer(s)
        if acc == 1:
            _, grads = _first_batch_grads(trainer)  # the 8 rows both runs read
        state = trainer.train().state
        out.append((trainer.history[0]["loss"], {k: np.asarray(v) for k, v in param_arrays(state.model).items()}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)  # two means of 4 vs one of 8: float32 order only
    # Both steps differentiate the same loss of the same rows; only the summation order differs.
    assert_same_first_adam_step(out[0][1], out[1][1], grads, grads)


def test_anchor_sampling_and_loss_weights() -> None:
    from dflash_gptoss.easydel_dflash_cache import response_anchor_mask
    from dflash_gptoss.train_batches import anchor_positions_for_step
    from dflash_gptoss.train_step import expected_accept_length, slot_weights

    a, w = anchor_positions_for_step(CTX, B, 8, rows=5, seed=3, step=7)
    assert a.shape == (5, 8) and a.min() >= 1 and a.max() <= CTX - B + 1 and (w == 1).all()
    assert all(len(set(row)) == 8 for row in a.tolist())  # without replacement
    np.testing.assert_array_equal(a, anchor_positions_for_step(CTX, B, 8, rows=5, seed=3, step=7)[0])
    assert not np.array_equal(a, anchor_positions_for_step(CTX, B, 8, rows=5, seed=3, step=8)[0])
    assert anchor_positions_for_step(CTX, B, 1000, rows=1, seed=0, step=0)[0].shape == (1, CTX - B + 1)
    # rows 2..3 of a global batch of 5 are the same anchors whoever draws them
    np.testing.assert_array_equal(a[2:4], anchor_positions_for_step(CTX, B, 8, 2, 3, 7, row_offset=2, global_rows=5)[0])

    # Prompts: row 0 is prompt up to position 9, row 1 has only 2 response anchors, row 2 none.
    response = np.ones((3, CTX), np.uint8)
    response[0, :10] = 0
    response[1, : CTX - B] = 0
    response[2, -1] = 0
    response[2, : CTX - 2] = 0
    allowed = response_anchor_mask(response, B)
    lo = 1
    for row in range(3):  # anchor n is allowed iff positions n .. n+B-2 are all response
        expect = [bool(response[row, n: n + B - 1].all()) for n in range(lo, CTX - B + 2)]
        assert allowed[row].tolist() == expect
    a, w = anchor_positions_for_step(CTX, B, 4, rows=3, seed=0, step=0, allowed=allowed)
    assert (a[0] >= 10).all() and (w[0] == 1).all()
    assert sorted(a[1][w[1] == 1].tolist()) == [CTX - B, CTX - B + 1] and w[1].sum() == 2
    assert w[2].sum() == 0

    np.testing.assert_allclose(slot_weights(4, 0.0), [1, 1, 1])
    np.testing.assert_allclose(slot_weights(4, 2.0), np.exp(-np.arange(3) / 2.0), rtol=1e-6)
    assert float(expected_accept_length(np.array([1.0, 0.5, 0.5]))) == pytest.approx(1 + 1 + 0.5 + 0.25)


def test_cli_trains_and_exports(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    import json

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(CLI), "--cache-dir", str(caches["windows"]), "--teacher-snapshot-dir",
         str(tiny_teacher_dir), "--save-directory", str(tmp_path / "ckpt"), "--model-name", "cli",
         "--max-training-steps", "2", "--total-batch-size", "4", "--dp", "2", "--tp", "4", "--vocab-chunk-size",
         "1000", "--log-steps", "1", "--anchors-per-window", "4", "--loss-decay-gamma", "4",
         "--export-dir", str(tmp_path / "export"), "--summary-json", str(tmp_path / "summary.json")],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt" / "cli" / "run-2").is_dir()
    assert (tmp_path / "export" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_step"] == 2 and len(summary["history"]) == 2
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    draft = DFlashDraftModel.from_pretrained(tmp_path / "export")  # what the benchmark loads
    assert draft.config.block_size == B and draft.config.dflash_config["mask_token_id"] == 1  # the tokenizer's


def test_lr_schedules_with_warmup(caches, tiny_teacher_dir, tmp_path: Path) -> None:
    """Every --lr-schedule accepts warmup (eformer alone refuses warmup for a constant rate)."""
    from dflash_gptoss.easydel_dflash_trainer import build_trainer

    for schedule, at_10 in (("cosine", 7.5e-4), ("linear", 2e-3 / 3), ("constant", 1e-3)):
        trainer, _ = build_trainer(_settings(caches["blocks"], tiny_teacher_dir, tmp_path, max_training_steps=20,
                                             warmup_steps=5, lr_schedule=schedule, learning_rate=1e-3))
        lrs = [float(trainer.scheduler(i)) for i in (0, 5, 10)]
        assert lrs[0] < 1e-6 and lrs[1] == pytest.approx(1e-3), schedule
        assert lrs[2] == pytest.approx(at_10, rel=1e-3), schedule
