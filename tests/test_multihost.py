"""Multi-host (JAX multi-controller) on one machine: 2 processes x 4 CPU devices against 1 x 8.

What is checked, and why:
* a cache built by 2 processes (each feeding and writing only its rows into the shared out-dir,
  process 0 creating the files and marking them complete) is byte-identical to the one-process
  build, for both layouts, and so is a 2-process ``--resume`` of a half-written build;
* 2-process training through the CLI (``--coordinator-address/--num-processes/--process-id``)
  gives the same per-step losses as one process on the same dp x tp mesh, within ``LOSS_RTOL``:
  the only difference is the cross-process (gloo) gradient all-reduce, whose summation order may
  differ (measured: at most one float32 ulp, ~1e-7 relative, over these steps); its checkpoints
  load in one process, a 2-process ``--resume`` continues them, and its export equals the
  one-process export within ``PARAM_ATOL``;
* bad distributed flags fail at once with exit code 2 and one clear message.

The subprocesses run this file as a script (see ``_worker`` at the bottom) or the real CLIs; every
launch has a timeout and kills its whole process group on failure. The mesh is dp=4 x tp=2, so the
data-parallel all-reduce crosses processes and tp stays inside each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_CLI = REPO / "scripts" / "tpu_dflash_train_with_easydel_trainer.py"
BUILD_CLI = REPO / "scripts" / "tpu_dflash_build_teacher_cache.py"
CTX, B, K, N = 32, 8, 3, 16
DP, TP = 4, 2
BUILD = dict(ctx_len=CTX, block_size=B, num_context_features=K, num_blocks=N, batch_size=8, dp=DP, tp=TP, seed=0)
LOSS_RTOL = 1e-5
"""Per-step losses: a mean over a few hundred float32 terms summed in another order (~1e-7 relative;
measured max 8e-8). Later steps' parameters differ only where a gradient sits at the noise floor, and
such an element moves the loss by |g| * |dp| ~ 1e-8 * lr: invisible. 1e-5 leaves a 100x margin."""
LR, STEPS = 3e-3, 4
PARAM_ATOL, PARAM_FIRM_FRACTION = 1e-6, 0.99


def adam_update_bound(step: int, b1: float = 0.9, b2: float = 0.999) -> float:
    """The largest |m_hat / sqrt(v_hat)| AdamW can apply at ``step`` (eps ignored: it only shrinks it).

    By Cauchy-Schwarz, |sum_i b1^(t-i) g_i| <= sqrt(sum_j (b1^2/b2)^j) * sqrt(sum_i b2^(t-i) g_i^2), so
    |m_t| / sqrt(v_t) <= (1-b1) sqrt(sum_j<t (b1^2/b2)^j) / sqrt(1-b2); bias correction multiplies by
    sqrt(1-b2^t) / (1-b1^t). Step 1 gives exactly 1 (Adam's first step is lr * sign(g)).
    """
    s = sum((b1 * b1 / b2) ** j for j in range(step))
    return (1 - b1) * np.sqrt(s) / np.sqrt(1 - b2) * np.sqrt(1 - b2 ** step) / (1 - b1 ** step)
LAUNCH_TIMEOUT_S = 420


# ----------------------------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 25) -> str:
    noise = ("W1", "I1", "E1", "W0", "I0", "E0", "[Gloo]", "Applying MoE")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if not ln.startswith(noise)]
    return "\n".join(lines[-n:])


def _launch(commands: list[list[str]], logs: Path) -> None:
    """Start one process per command (4 CPU devices each), wait for all; on a timeout or any failure
    kill every process group still running and fail with the logs' tails."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    procs, outs = [], []
    try:
        for i, cmd in enumerate(commands):
            out = logs / f"process{i}.log"
            outs.append(out)
            with open(out, "w") as f:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        codes = [p.wait(timeout=LAUNCH_TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    report = "\n".join(f"--- process {i} ---\n{_tail(o)}" for i, o in enumerate(outs))
    assert codes is not None, f"timed out after {LAUNCH_TIMEOUT_S}s\n{report}"
    assert codes == [0] * len(commands), f"exit codes {codes}\n{report}"


def _distributed_flags(port: int, pid: int) -> list[str]:
    return ["--coordinator-address", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-process (8 devices) builds of both layouts on the same dp x tp mesh: the references."""
    from dflash_gptoss.cache_builder import build_teacher_cache
    from dflash_gptoss.draft_config import target_layer_ids
    from dflash_gptoss.teacher_jax import JaxTeacher

    root = tmp_path_factory.mktemp("ref")
    teacher = JaxTeacher(tiny_teacher_dir, target_layer_ids(6, K), dp=DP, tp=TP)
    for layout in ("blocks", "windows"):
        build_teacher_cache(tiny_teacher_dir, root / layout, teacher=teacher, progress=False, layout=layout, **BUILD)
    return {"blocks": root / "blocks", "windows": root / "windows"}


def _half_written(src: Path, dst: Path) -> None:
    """``dst``: ``src`` as a build killed after half its chunks (later rows zero, not complete)."""
    from dflash_gptoss.cache_format import META_FILE, read_json, write_json_atomic, write_progress

    shutil.copytree(src, dst)
    meta = read_json(dst / META_FILE)
    write_json_atomic(dst / META_FILE, dict(meta, complete=False))
    write_progress(dst, N // 2, N)
    for name in ("features_u16.npy", "token_ids.npy", "labels.npy"):
        a = np.load(dst / name, mmap_mode="r+")
        a[N // 2:] = 0
        a.flush()


def _same_cache(got: Path, want: Path, *, resumed: bool = False) -> None:
    """Byte-identical arrays and meta.json. ``feature_stats`` measure the build run: a full two-process
    build measures every window as one process does, and a resumed one the windows it computed. Each
    window's sums are float32 reductions on device over T*H = 3072 values, whose order may differ between
    the two meshes' programs: the worst-case bound of such a sum is n * eps32 = 3072 * 6e-8 = 1.8e-4
    relative (seen: 6.5e-8), so 2e-4; a window missing from the gather would move the mean by ~1/N."""
    from dflash_gptoss.cache_format import META_FILE, read_json

    files = sorted(p.name for p in want.glob("*.npy"))
    assert files == sorted(p.name for p in got.glob("*.npy"))
    for name in files:
        assert (got / name).read_bytes() == (want / name).read_bytes(), f"{got.name}/{name} differs"
    meta_got, meta_want = read_json(got / META_FILE), read_json(want / META_FILE)
    assert meta_got["complete"] is True
    stats_got, stats_want = meta_got.pop("feature_stats"), meta_want.pop("feature_stats")
    assert {**meta_got, "created_unix": 0} == {**meta_want, "created_unix": 0}
    assert stats_got["windows"] == (N - N // 2 if resumed else N) and stats_want["windows"] == N
    for a, b in zip(stats_got["per_layer"], stats_want["per_layer"], strict=True):
        assert a["layer"] == b["layer"]
        if not resumed:
            assert (a["mean"], a["rms"]) == pytest.approx((b["mean"], b["rms"]), rel=2e-4, abs=0)
    assert read_json(got / "progress.json")["windows_done"] == N


# ----------------------------------------------------------------------------------- tests
def test_two_process_cache_builds_equal_one_process(ref, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    _half_written(ref["windows"], tmp_path / "resumed")
    port = _free_port()
    _launch([[sys.executable, __file__, "build", f"localhost:{port}", str(pid), str(tiny_teacher_dir), str(tmp_path)]
             for pid in range(2)], tmp_path / "logs")
    _same_cache(tmp_path / "blocks", ref["blocks"])
    _same_cache(tmp_path / "windows", ref["windows"])
    _same_cache(tmp_path / "resumed", ref["windows"], resumed=True)


def _train_cmd(cache: Path, teacher: Path, save: Path, pid: int, port: int, steps: int, *extra: str) -> list[str]:
    return [sys.executable, str(TRAIN_CLI), "--cache-dir", str(cache), "--teacher-snapshot-dir", str(teacher),
            "--save-directory", str(save), "--model-name", "m", "--max-training-steps", str(steps),
            "--total-batch-size", "8", "--dp", str(DP), "--tp", str(TP), "--vocab-chunk-size", "1024",
            "--learning-rate", str(LR), "--lr-schedule", "constant", "--anchors-per-window", "8",
            "--mask-token-id", "1", "--log-steps", "100", *extra, *_distributed_flags(port, pid)]


def test_two_process_training_equals_one_process(ref, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    from dflash_gptoss.easydel_dflash_draft_model import load_draft_state, param_arrays
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings, run_training
    from dflash_gptoss.export_draft import to_torch_state

    cache, save = ref["windows"], tmp_path / "ckpt"
    port = _free_port()
    _launch([_train_cmd(cache, tiny_teacher_dir, save, pid, port, STEPS, "--save-steps", "2", "--export-dir",
                        str(tmp_path / "export"), "--summary-json", str(tmp_path / "summary.json"))
             for pid in range(2)], tmp_path / "logs")
    two = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(p.name for p in (save / "m").glob("run-*")) == ["run-2", "run-4"]

    one = run_training(DFlashTrainingSettings(
        cache_dir=str(cache), teacher_snapshot_dir=str(tiny_teacher_dir), save_directory=str(tmp_path / "one"),
        model_name="m", max_training_steps=STEPS, total_batch_size=8, dp=DP, tp=TP, vocab_chunk_size=1024,
        log_steps=100, learning_rate=LR, lr_schedule="constant", anchors_per_window=8, mask_token_id=1,
        progress_bar="json", export_dir=str(tmp_path / "one_export")))
    loss_two = np.array([h["loss"] for h in two["history"]])
    loss_one = np.array([h["loss"] for h in one["history"]])
    print("loss 2x4:", loss_two.tolist(), "1x8:", loss_one.tolist(),
          "max rel diff:", float(np.max(np.abs(loss_two - loss_one) / loss_one)))
    assert [h["step"] for h in two["history"]] == [1, 2, 3, 4]
    np.testing.assert_allclose(loss_two, loss_one, rtol=LOSS_RTOL, atol=0)
    # An argmax may flip on a float32 near-tie between the two summation orders: allow one block's
    # leading run (at most B-1 slots) to change, out of the 8 windows x 8 anchors of a step.
    np.testing.assert_allclose([h["mean_accept_len"] for h in two["history"]],
                               [h["mean_accept_len"] for h in one["history"]], rtol=0, atol=(B - 1) / 64)

    # Parameters after 4 AdamW steps. Where a gradient is far above the float32 noise floor, the update
    # is the same on both runs; where it sits at the floor, each run's update can be anything AdamW
    # allows (adam_update_bound). So: every element within the sum of both runs' largest updates, and
    # (a broken cross-process reduction would move nearly every element) nearly all within PARAM_ATOL.
    exp_two = load_file(str(tmp_path / "export" / "model.safetensors"))
    exp_one = load_file(str(tmp_path / "one_export" / "model.safetensors"))
    assert exp_two.keys() == exp_one.keys()
    diffs = np.concatenate([np.abs(exp_two[k] - exp_one[k]).ravel() for k in exp_one])
    print(f"max |param diff| {diffs.max():.3g}; within {PARAM_ATOL}: {np.mean(diffs <= PARAM_ATOL):.6f}")
    assert diffs.max() <= 2 * LR * sum(adam_update_bound(t) for t in range(1, STEPS + 1))
    assert np.mean(diffs <= PARAM_ATOL) >= PARAM_FIRM_FRACTION

    # the 2-process checkpoint loads in one process and holds exactly the exported weights
    state = load_draft_state(save / "m" / "run-4", dp=DP, tp=TP)
    draft_config = AutoConfig.from_pretrained(tmp_path / "export")
    for k, v in to_torch_state(param_arrays(state.model), draft_config).items():
        np.testing.assert_array_equal(v, exp_two[k], err_msg=k)

    # a 2-process --resume continues from run-4 like the one-process run would
    port = _free_port()
    _launch([_train_cmd(cache, tiny_teacher_dir, save, pid, port, 5, "--resume", "--summary-json",
                        str(tmp_path / "resumed.json")) for pid in range(2)], tmp_path / "logs_resume")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert (resumed["start_step"], resumed["final_step"]) == (4, 5)
    more = run_training(DFlashTrainingSettings(
        cache_dir=str(cache), teacher_snapshot_dir=str(tiny_teacher_dir), save_directory=str(tmp_path / "one"),
        model_name="m", max_training_steps=5, total_batch_size=8, dp=DP, tp=TP, vocab_chunk_size=1024,
        log_steps=100, learning_rate=LR, lr_schedule="constant", anchors_per_window=8, mask_token_id=1,
        progress_bar="json", resume=True))
    np.testing.assert_allclose([h["loss"] for h in resumed["history"]], [h["loss"] for h in more["history"]],
                               rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize(("flags", "message"), [
    (["--num-processes", "2", "--process-id", "0"], "needs --coordinator-address"),
    (["--num-processes", "2", "--coordinator-address", "localhost:1234"], "needs --process-id"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator-address", "localhost:1234"],
     "--process-id 2 must lie in [0, 2)"),
    (["--num-processes", "2", "--process-id", "1", "--coordinator-address", "localhost"], "must be HOST:PORT"),
    (["--process-id", "1"], "need --num-processes"),
    (["--distributed-auto", "--process-id", "1"], "do not combine"),
    (["--distributed-auto"], "found no cluster to join"),  # this machine is no TPU pod / SLURM / MPI job
])
def test_bad_distributed_flags_exit_2(flags: list[str], message: str, tmp_path: Path) -> None:
    cluster_env = [k for k in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "JAX_COORDINATOR_ADDRESS",
                               "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")
                   if k in os.environ]  # (jax sets harmless TPU_* variables in-process; those do not count)
    if "--distributed-auto" in flags and len(flags) == 1 and cluster_env:
        pytest.skip(f"a cluster environment is present ({cluster_env[:3]}): auto-detection would try to join it")
    for cli, required in ((BUILD_CLI, ["--model-snapshot-dir", str(tmp_path), "--ctx-len", "8", "--num-blocks", "1",
                                       "--out-dir", str(tmp_path / "c")]),
                          (TRAIN_CLI, ["--cache-dir", str(tmp_path), "--teacher-snapshot-dir", str(tmp_path),
                                       "--save-directory", str(tmp_path), "--max-training-steps", "1"])):
        r = subprocess.run([sys.executable, str(cli), *required, *flags], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
        assert r.returncode == 2, (cli.name, r.stderr[-2000:])
        assert message in r.stderr, (cli.name, r.stderr[-2000:])


def test_batch_not_divisible_by_processes_is_refused(ref, tiny_teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import jax

    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings, TrainerInputError, validate_settings

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    s = DFlashTrainingSettings(cache_dir=str(ref["windows"]), teacher_snapshot_dir=str(tiny_teacher_dir),
                               save_directory=str(tmp_path), total_batch_size=3, dp=1, tp=8)
    with pytest.raises(TrainerInputError, match="not divisible by the 2 processes"):
        validate_settings(s)


def test_single_process_needs_no_runtime() -> None:
    from dflash_gptoss.distributed import initialize_distributed, process_row_range

    assert initialize_distributed() is None
    assert initialize_distributed(None, 1, 0) is None
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((DP, TP), ("dp", "tp"))
    assert process_row_range(NamedSharding(mesh, P("dp")), (8,)) == (0, 8)


# ----------------------------------------------------------------------------------- worker
def _worker(argv: list[str]) -> None:
    """``build COORD PID SNAPSHOT OUT``: one of 2 processes building (blocks, windows) fresh and
    resuming ``OUT/resumed`` with one teacher (the test's references use the same settings)."""
    os.environ.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    sys.path.insert(0, str(REPO))
    from dflash_gptoss.distributed import initialize_distributed

    mode, coordinator, pid, snapshot, out = argv
    assert mode == "build"
    initialize_distributed(coordinator, 2, int(pid))
    from dflash_gptoss.cache_builder import build_teacher_cache
    from dflash_gptoss.draft_config import target_layer_ids
    from dflash_gptoss.teacher_jax import JaxTeacher

    teacher = JaxTeacher(snapshot, target_layer_ids(6, K), dp=DP, tp=TP)
    root = Path(out)
    for layout in ("blocks", "windows"):
        build_teacher_cache(snapshot, root / layout, teacher=teacher, progress=False, layout=layout, **BUILD)
    result = build_teacher_cache(snapshot, root / "resumed", teacher=teacher, progress=False, layout="windows",
                                 resume=True, **BUILD)
    assert result.windows_written == N - N // 2, result.windows_written


if __name__ == "__main__":
    _worker(sys.argv[1:])
