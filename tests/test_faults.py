"""Nothing lost, nothing silent: one test per fault class, each asserting the exact error and that
nothing already made was lost.

* exclusive writers: two real processes on one folder (a second trainer CLI while the first holds it; a live lock holder
  and, after SIGKILL, its stale lock taken over);
* disk full: the cache's space is reserved before the teacher runs (a disk too small is refused at
  once, a disk that fills later is one clear error and a resumable cache), a checkpoint save that
  meets a full disk keeps the previous checkpoint usable. On a real small tmpfs where this machine
  lets the test mount one (root); elsewhere the same failure is injected at the write call;
* integrity: caches and checkpoints truncated, missing a file, altered byte-wise, or from another
  teacher, are refused naming the file (and, for checkpoints, the newest good one);
* checks before work: output paths, resume rules, --data records (file:line).

Every build here is tiny (tiny teacher, ctx 32); training runs are 2 steps.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss.cache_builder import CacheBuildError, open_out_dir, plan_teacher_cache, run_plan
from dflash_gptoss.cache_format import META_FILE, CacheFormatError, InsufficientSpaceError, read_json
from dflash_gptoss.draft_config import target_layer_ids
from dflash_gptoss.easydel_dflash_cache import CacheMismatchError, DFlashCacheDataset
from dflash_gptoss.run_safety.integrity import MANIFEST_NAME, write_manifest
from dflash_gptoss.run_safety.job_lock import LOCK_NAME, read_holder
from dflash_gptoss.train_checkpoints import CheckpointError, checkpoint_to_resume

REPO = Path(__file__).resolve().parents[1]
TRAIN_CLI = REPO / "scripts" / "tpu_dflash_train_with_easydel_trainer.py"
CTX, B, K, N = 32, 8, 3, 16
BUILD = dict(ctx_len=CTX, block_size=B, num_context_features=K, num_blocks=N, batch_size=8, layout="windows",
             dp=2, tp=4, seed=0)
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` mounted at ``path`` (True), or just the folder where mounting is not allowed (False)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _enospc(filename: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)


def _fill(folder: Path) -> Path:
    """Fill the filesystem of ``folder`` to the last byte with one file (removed to free it again)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        for size in (1 << 16, 1):  # big writes, then the last partial block byte by byte
            while f.write(b"\0" * size) == size:
                pass
    return filler


def _settings(cache: Path, teacher: Path, save: Path, **kw: object):
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings

    base = dict(cache_dir=str(cache), teacher_snapshot_dir=str(teacher), save_directory=str(save), model_name="m",
                max_training_steps=2, total_batch_size=8, dp=2, tp=4, vocab_chunk_size=1024, log_steps=100,
                learning_rate=3e-3, lr_schedule="constant", anchors_per_window=4, mask_token_id=1,
                progress_bar="json", save_steps=1)
    base.update(kw)
    return DFlashTrainingSettings(**base)


def _train_cli(cache: Path, teacher: Path, save: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TRAIN_CLI), "--cache-dir", str(cache), "--teacher-snapshot-dir", str(teacher),
            "--save-directory", str(save), "--model-name", "m", "--max-training-steps", "2", "--total-batch-size",
            "8", "--dp", "2", "--tp", "4", "--vocab-chunk-size", "1024", "--anchors-per-window", "4",
            "--mask-token-id", "1", "--save-steps", "1", *extra]


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir: Path):
    from dflash_gptoss.teacher_jax import JaxTeacher

    return JaxTeacher(tiny_teacher_dir, target_layer_ids(6, K), dp=2, tp=4)


@pytest.fixture(scope="module")
def cache(tiny_teacher_dir: Path, teacher, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete windows cache of the tiny teacher (with its manifest): copy it before damaging it."""
    from dflash_gptoss.cache_builder import build_teacher_cache

    out = tmp_path_factory.mktemp("cache") / "c"
    build_teacher_cache(tiny_teacher_dir, out, teacher=teacher, progress=False, **BUILD)
    return out


@pytest.fixture(scope="module")
def trained(cache: Path, tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run with checkpoints run-1 and run-2 (manifests written): copy it before damaging it."""
    from dflash_gptoss.easydel_dflash_trainer import run_training

    save = tmp_path_factory.mktemp("trained")
    run_training(_settings(cache, tiny_teacher_dir, save))
    return save


@pytest.fixture(scope="module")
def other_teacher(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher with every weight nudged: same config, same shapes, another model."""
    import torch
    from transformers import GptOssForCausalLM

    out = tmp_path_factory.mktemp("other_teacher")
    model = GptOssForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    model.save_pretrained(out)
    for f in tiny_teacher_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith("_report.json"):
            shutil.copy(f, out / f.name)
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_NAME))
    return dst


# ----------------------------------------------------------------------------------- exclusive writers
def test_two_trainers_on_one_run_folder_exactly_one_runs(cache, tiny_teacher_dir, tmp_path: Path) -> None:
    """Two real trainer CLIs on one --save-directory/--model-name: while the first holds the folder the
    second is refused at once naming the first's pid, and the first's checkpoints are whole (verified).

    The overlap is made certain, not hoped for: started together, the second may reach the lock only
    after the first has trained, saved and exited (a busy 2-core CI machine did exactly that, and the
    second was then refused for the checkpoints instead). So the first is frozen with SIGSTOP once its
    holder line names it, the second runs to its refusal, and the first is resumed with SIGCONT."""
    save = tmp_path / "ckpt"
    first = subprocess.Popen(_train_cli(cache, tiny_teacher_dir, save), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while (read_holder(save / "m") or {}).get("pid") != first.pid:
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first trainer never took the run folder's lock"
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(_train_cli(cache, tiny_teacher_dir, save), env=ENV, capture_output=True,
                                    text=True, timeout=600)
        finally:
            first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    line = _error_line(second.stderr)
    assert f"is in use by pid {first.pid} on host" in line and "draft training" in line, line
    from dflash_gptoss.train_checkpoints import checkpoints, verify_checkpoint

    assert [p.name for p in checkpoints(save / "m")] == ["run-1", "run-2"]
    for p in checkpoints(save / "m"):
        verify_checkpoint(p)


def test_a_live_holder_refuses_a_cache_build_and_its_stale_lock_is_taken_over(tiny_teacher_dir, tmp_path) -> None:
    out = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from dflash_gptoss.run_safety.job_lock import acquire; "
                               f"acquire({str(out)!r}, 'holder'); print('held', flush=True); time.sleep(600)"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert read_holder(out)["pid"] == holder.pid
        with pytest.raises(CacheBuildError, match=f"is in use by pid {holder.pid} on host .*holder"):
            plan_teacher_cache(tiny_teacher_dir, out, **BUILD)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused build wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's flock: the next build takes the folder over and names itself.
    plan = plan_teacher_cache(tiny_teacher_dir, out, **BUILD)
    assert read_holder(out)["pid"] == os.getpid() and plan.start_window == 0
    plan.lock.release()


# ----------------------------------------------------------------------------------- disk full
def test_a_disk_too_small_is_refused_before_the_teacher_loads(tiny_teacher_dir, tmp_path, monkeypatch) -> None:
    """The size check passes (the free space is overstated with free_bytes), the reservation does not: the
    error names the file, and the files just created are gone again."""
    with small_fs(tmp_path / "fs", "64k") as mounted:
        if not mounted:  # the same failure, injected where the reservation asks the kernel for blocks
            def no_space(fd: int, offset: int, size: int) -> None:
                raise _enospc()

            monkeypatch.setattr(os, "posix_fallocate", no_space)
        plan = plan_teacher_cache(tiny_teacher_dir, tmp_path / "fs" / "c", free_bytes=1 << 40, **BUILD)
        with pytest.raises(InsufficientSpaceError, match=r"could not reserve .* on disk for .*features_u16\.npy"):
            open_out_dir(plan)
        assert sorted(p.name for p in (tmp_path / "fs" / "c").iterdir()) == [LOCK_NAME]
        plan.lock.release()


def test_a_disk_that_fills_during_the_build_is_one_error_and_a_resumable_cache(
        tiny_teacher_dir, teacher, cache, tmp_path, monkeypatch) -> None:
    nbytes = sum(p.stat().st_size for p in cache.iterdir()) + 4 * 4096
    with small_fs(tmp_path / "fs", f"{nbytes // 1024 + 64}k") as mounted:
        out = tmp_path / "fs" / "c"
        plan = plan_teacher_cache(tiny_teacher_dir, out, **BUILD)
        arrays = open_out_dir(plan)  # every array's blocks are reserved now
        if mounted:
            filler = _fill(tmp_path / "fs")  # another writer takes the rest: only un-reserved writes can fail
        else:
            import dflash_gptoss.cache_builder as cb

            real, calls = cb.write_progress, []

            def write_progress(*args: object) -> None:  # the second chunk's progress meets a full disk
                calls.append(args)
                if len(calls) > 1:
                    raise _enospc(str(out / "progress.json"))
                real(*args)

            monkeypatch.setattr(cb, "write_progress", write_progress)
        with pytest.raises(OSError) as info:
            run_plan(plan, teacher, progress=False, arrays=arrays)
        assert info.value.errno == errno.ENOSPC
        assert not read_json(out / META_FILE)["complete"] and not (out / MANIFEST_NAME).exists()
        if mounted:
            filler.unlink()
        monkeypatch.undo()
        resumed = plan_teacher_cache(tiny_teacher_dir, out, resume=True, **BUILD)
        run_plan(resumed, teacher, progress=False)
        for f in ("features_u16.npy", "token_ids.npy", "labels.npy", "response_u8.npy"):
            assert (out / f).read_bytes() == (cache / f).read_bytes(), f
        DFlashCacheDataset(out, verify="full", process_index=0, process_count=1)


def test_a_disk_full_checkpoint_save_keeps_the_previous_one(cache, tiny_teacher_dir, tmp_path, monkeypatch) -> None:
    from dflash_gptoss.easydel_dflash_trainer import CheckpointWriteError, run_training
    from dflash_gptoss.train_checkpoints import checkpoints, verify_checkpoint

    with small_fs(tmp_path / "fs", "2200k") as mounted:  # one checkpoint of this draft is ~1.3 MB
        save = tmp_path / "fs"
        if not mounted:
            from easydel.infra.base_state import EasyDeLState

            real, calls = EasyDeLState.save_state, []

            def save_state(self, *a, **kw):
                calls.append(1)
                if len(calls) > 1:
                    raise _enospc(str(save / "m" / "run-2" / "tx"))
                return real(self, *a, **kw)

            monkeypatch.setattr(EasyDeLState, "save_state", save_state)
        with pytest.raises(CheckpointWriteError) as info:
            run_training(_settings(cache, tiny_teacher_dir, save, max_training_steps=3))
        msg = str(info.value)
        assert "saving checkpoint" in msg and "run-2 failed: the disk is full" in msg, msg
        assert f"newest good checkpoint is {save / 'm' / 'run-1'} (verified)" in msg, msg
        assert [p.name for p in checkpoints(save / "m")] == ["run-1"]  # the half-written run-2 is gone
        verify_checkpoint(save / "m" / "run-1")
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=16m", str(save)], check=True)
        monkeypatch.undo()
        summary = run_training(_settings(cache, tiny_teacher_dir, save, max_training_steps=3, resume=True))
        assert (summary["start_step"], summary["final_step"]) == (1, 3)


# ----------------------------------------------------------------------------------- integrity: caches
def test_damaged_caches_are_refused_naming_the_file(cache, tmp_path: Path) -> None:
    def opened(d: Path, verify: str = "auto") -> DFlashCacheDataset:
        return DFlashCacheDataset(d, verify=verify, process_index=0, process_count=1)

    truncated = _copy(cache, tmp_path / "truncated")
    with open(truncated / "features_u16.npy", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CacheFormatError, match=r"features_u16\.npy has 1000 bytes, the manifest says \d+ \(trunc"):
        opened(truncated)

    altered = _copy(cache, tmp_path / "altered")
    with open(altered / "labels.npy", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        f.write(b"\x07")
    opened(altered, verify="size")  # sizes intact: only the full check can see it ...
    with pytest.raises(CacheFormatError, match=r"labels\.npy does not match its checksum"):
        opened(altered)  # ... and "auto" does it for a cache this small

    no_manifest = _copy(cache, tmp_path / "no_manifest")
    (no_manifest / MANIFEST_NAME).unlink()
    with pytest.raises(CacheFormatError, match=f"has no {MANIFEST_NAME}: its writer did not finish"):
        opened(no_manifest)

    bad_json = _copy(cache, tmp_path / "bad_json")
    text = (bad_json / META_FILE).read_text().splitlines()
    text[3] = text[3] + ","  # a stray comma on line 4
    (bad_json / META_FILE).write_text("\n".join(text))
    with pytest.raises(CacheFormatError, match=r"meta\.json:4:\d+: not valid JSON"):
        opened(bad_json)

    edited = _copy(cache, tmp_path / "edited")
    meta = read_json(edited / META_FILE)
    (edited / META_FILE).write_text(json.dumps(dict(meta, ctx_len=CTX // 2)))
    with pytest.raises(CacheFormatError, match=r"contradicts itself .*ctx_len=16.*features: .* settings imply"):
        opened(edited)


def test_resume_of_a_complete_but_damaged_cache_is_refused(cache, tiny_teacher_dir, tmp_path: Path) -> None:
    damaged = _copy(cache, tmp_path / "c")
    (damaged / "token_ids.npy").unlink()
    with pytest.raises(CacheBuildError, match=r"marked complete but is damaged: .*token_ids\.npy is missing"):
        plan_teacher_cache(tiny_teacher_dir, damaged, resume=True, **BUILD)


def test_a_cache_from_another_teacher_is_refused(cache, other_teacher, tmp_path: Path) -> None:
    from dflash_gptoss.easydel_dflash_trainer import build_trainer

    with pytest.raises(CacheMismatchError, match="was built by another teacher: its meta.json records weights"):
        build_trainer(_settings(cache, other_teacher, tmp_path))
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------- integrity: checkpoints
@pytest.mark.parametrize("damage, message", [
    ("optimizer", r"tx/.* is missing"),
    ("weight_chunk", r"model/.*/kernel/0\.0 is missing"),
    ("bytes", r"model/.*/kernel/0\.0 does not match its checksum"),
    ("no_manifest", f"has no {MANIFEST_NAME}"),
])
def test_damaged_checkpoints_are_refused_naming_the_good_one(trained, tmp_path, damage, message) -> None:
    save = _copy(trained, tmp_path / "save")
    run2 = save / "m" / "run-2"
    if damage == "optimizer":
        shutil.rmtree(run2 / "tx")
    elif damage == "no_manifest":
        (run2 / MANIFEST_NAME).unlink()
    else:
        chunk = sorted(run2.glob("model/layers/0/self_attn/q_proj/kernel/0.0"))[0]
        if damage == "weight_chunk":
            chunk.unlink()
        else:
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0xFF
            chunk.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint_to_resume(save / "m", resume=True, resume_if_possible=False)
    assert "The newest good checkpoint is run-1: move run-2 out of the way" in str(info.value)


def test_a_damaged_checkpoint_is_one_error_line_and_the_good_one_resumes(trained, cache, tiny_teacher_dir,
                                                                          tmp_path) -> None:
    from dflash_gptoss.easydel_dflash_trainer import build_trainer, export_checkpoint

    save = _copy(trained, tmp_path / "save")
    shutil.rmtree(save / "m" / "run-2" / "tx")
    r = subprocess.run(_train_cli(cache, tiny_teacher_dir, save, "--resume", "--max-training-steps", "3"),
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "newest good checkpoint is run-1" in _error_line(r.stderr)
    with pytest.raises(CheckpointError, match="run-2 cannot be used"):
        export_checkpoint(save / "m" / "run-2", None, tmp_path / "export")
    (save / "m" / "run-2").rename(save / "m" / "damaged-run-2")  # the fix the message gives
    trainer, _ = build_trainer(_settings(cache, tiny_teacher_dir, save, max_training_steps=3, resume=True))
    assert int(trainer.model_state.step) == 1
    trainer.run_lock.release()


# ----------------------------------------------------------------------------------- checks before work
def test_resume_rules(trained, cache, tiny_teacher_dir, tmp_path) -> None:
    from dflash_gptoss.easydel_dflash_trainer import build_trainer

    save = _copy(trained, tmp_path / "save")
    with pytest.raises(CheckpointError, match="already holds checkpoints .*run-1, run-2.*pass --resume"):
        build_trainer(_settings(cache, tiny_teacher_dir, save))
    with pytest.raises(CheckpointError, match="--resume: .*other holds no run-<step> checkpoint"):
        build_trainer(_settings(cache, tiny_teacher_dir, save, model_name="other", resume=True))
    assert not (save / "other").exists()  # nothing left behind by the refusal
    with pytest.raises(CheckpointError, match=r"num_hidden_layers: checkpoint 1, now 2 \(--num-draft-layers\)"):
        build_trainer(_settings(cache, tiny_teacher_dir, save, resume=True, num_draft_layers=2))
    with pytest.raises(CheckpointError, match="anchors_per_window: the run started with 4, now 8"):
        build_trainer(_settings(cache, tiny_teacher_dir, save, resume=True, anchors_per_window=8))
    trainer, _ = build_trainer(_settings(cache, tiny_teacher_dir, tmp_path / "fresh", resume_if_possible=True))
    assert int(trainer.model_state.step) == 0
    trainer.run_lock.release()


def test_output_paths_are_checked_before_training(cache, tiny_teacher_dir, tmp_path) -> None:
    from dflash_gptoss.easydel_dflash_trainer import build_trainer
    from dflash_gptoss.run_safety.preflight import OutputPathError

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputPathError, match="export folder .*a_file. is a file, not a folder"):
        build_trainer(_settings(cache, tiny_teacher_dir, tmp_path / "s", export_dir=str(tmp_path / "a_file")))
    with pytest.raises(OutputPathError, match="exists and is not a DFlash draft"):
        build_trainer(_settings(cache, tiny_teacher_dir, tmp_path / "s", export_dir=str(cache)))
    with small_fs(tmp_path / "ro", "1m") as mounted:
        if mounted and subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")]).returncode == 0:
            with pytest.raises(OutputPathError, match="cannot be written: .*Read-only file system"):
                build_trainer(_settings(cache, tiny_teacher_dir, tmp_path / "s", export_dir=str(tmp_path / "ro" / "d")))
    assert not (tmp_path / "s").exists()
    r = subprocess.run(_train_cli(cache, tiny_teacher_dir, tmp_path / "s", "--summary-json", str(tmp_path)),
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--summary-json" in _error_line(r.stderr) and "is a directory" in r.stderr


def test_teacher_data_out_that_is_a_directory_fails_before_generating(tiny_teacher_dir, tmp_path,
                                                                       monkeypatch) -> None:
    import dflash_gptoss.teacher_torch
    from dflash_gptoss.data_generation import TeacherDataError, generate_teacher_data

    def load_target(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher was loaded before the output path was checked")

    monkeypatch.setattr(dflash_gptoss.teacher_torch, "load_target", load_target)
    with pytest.raises(TeacherDataError, match="--out .* is a directory; give the path of a file"):
        generate_teacher_data(tiny_teacher_dir, tmp_path, [[1, 2, 3]] * 4, max_new_tokens=64, progress=False)


@pytest.mark.parametrize("line, message", [
    ('{"input_ids": [5, 3459.7, 9]}', r"input_ids\[1\] = 3459\.7 is not an integer token id"),
    ('{"input_ids": [5, true]}', r"input_ids\[1\] = True is not an integer"),
    ('{"input_ids": [[5, 6], [7]]}', r"input_ids\[0\] = \[5, 6\] is not an integer"),
    ('{"input_ids": "5 6 7"}', "input_ids must be a non-empty list of token ids, got str"),
    ('{"text": 12}', '"text" must be a string, got int'),
    ('{"input_ids": [5, 6], "prompt_len": 1.5}', "prompt_len=1.5 must be an integer"),
    ('{"input_ids": [5, 6], "prompt_len": 3}', r"prompt_len=3 must lie in \[0, 2\]"),
    ('{"input_ids": [5, 999999]}', r"token ids must lie in \[0, \d+\)"),
    ('{"input_ids": [5, 6]', "not valid JSON"),
    (b'{"text": "caf\xe9"}', "not UTF-8 text"),
])
def test_data_records_are_validated_with_file_and_line(tiny_teacher_dir, tmp_path, line, message) -> None:
    data = tmp_path / "data.jsonl"
    good = b'{"input_ids": [1, 2, 3, 4]}\n'
    data.write_bytes(good + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n" + good)
    with pytest.raises(CacheBuildError, match=f"--data {data}:3: .*{message}"):
        plan_teacher_cache(tiny_teacher_dir, tmp_path / "out", data=data, **BUILD)
    assert not (tmp_path / "out").exists()


def test_verify_command_reports_each_folder(cache, trained, tmp_path) -> None:
    altered = _copy(cache, tmp_path / "altered")
    arr = np.load(altered / "token_ids.npy", mmap_mode="r+")
    arr[0, 0] += 1
    arr.flush()
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "dflash_verify.py"), "--no-progress", str(cache),
                        str(trained / "m" / "run-2"), str(altered)], env=ENV, capture_output=True, text=True)
    lines = r.stdout.splitlines()
    assert r.returncode == 1 and len(lines) == 3, r.stdout + r.stderr
    assert lines[0].startswith(f"ok {cache}: teacher-cache")
    assert lines[1].startswith(f"ok {trained / 'm' / 'run-2'}: draft-checkpoint")
    assert lines[2].startswith(f"DAMAGED {altered}") and "token_ids.npy does not match its checksum" in lines[2]


# ----------------------------------------------------------------------------------- non-finite values
def test_a_nan_feature_stops_training_at_its_step_and_nothing_of_it_is_saved(cache, tiny_teacher_dir,
                                                                             tmp_path) -> None:
    """One NaN feature in a cache row that step 2's batch reads (the manifest rewritten, as a cache built from a
    broken teacher would have it): step 1 trains and is saved, step 2 stops the run, naming the step, its rows
    and the good checkpoint, and nothing is exported."""
    from dflash_gptoss.easydel_dflash_trainer import NonFiniteTrainingError, run_training

    bad = _copy(cache, tmp_path / "nan_cache")
    rows = DFlashCacheDataset(bad, seed=0).epoch_permutation(0)[8:16]  # step 2 of 8-row batches
    features = np.load(bad / "features_u16.npy", mmap_mode="r+")
    features[rows[3], 5, 7] = 0x7FC0  # bf16 NaN
    features.flush()
    del features
    write_manifest(bad, kind="teacher-cache")
    save = tmp_path / "ckpt"
    with pytest.raises(NonFiniteTrainingError) as info:
        run_training(_settings(bad, tiny_teacher_dir, save, max_training_steps=3, export_dir=str(tmp_path / "draft")))
    message = str(info.value)
    assert message.startswith("training stopped at step 2: the loss is nan")
    assert f"rows [{', '.join(map(str, rows.tolist()))}] of the cache {bad}" in message
    assert f"The last good checkpoint is {save / 'm' / 'run-1'} (verified)" in message
    assert sorted(p.name for p in (save / "m").glob("run-*")) == ["run-1"]
    assert not (tmp_path / "draft").exists()


def _damaged_teacher(tiny_teacher_dir: Path, dst: Path, damage) -> Path:
    """A copy of the tiny teacher whose tensors ``damage(name, array)`` rewrote (returns the new array)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_teacher_dir, dst, ignore=shutil.ignore_patterns(LOCK_NAME))
    tensors = {k: damage(k, v.copy()) for k, v in load_file(str(dst / "model.safetensors")).items()}
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_a_nan_weight_stops_the_cache_build_at_its_first_window(cache, tiny_teacher_dir, tmp_path) -> None:
    """A snapshot with one NaN weight in layer 2: the build stops at window 0 naming target layer 2 (the first
    target layer after it), and the cache is never marked complete. A good build records per-layer stats."""
    from dflash_gptoss.cache_builder import NonFiniteFeaturesError, build_teacher_cache

    def one_nan(name: str, a: np.ndarray) -> np.ndarray:
        if name == "model.layers.2.mlp.router.weight":
            a.flat[0] = np.nan
        return a

    snapshot = _damaged_teacher(tiny_teacher_dir, tmp_path / "nan_teacher", one_nan)
    assert target_layer_ids(6, K) == [1, 2, 3]
    out = tmp_path / "nan_cache"
    with pytest.raises(NonFiniteFeaturesError, match=r"the teacher's features are not finite at window 0 \(target "
                                                     r"layer 2: \d+ NaN/Inf values\).* left incomplete"):
        build_teacher_cache(snapshot, out, progress=False, **BUILD)
    assert read_json(out / META_FILE)["complete"] is False
    with pytest.raises(CacheFormatError, match="INCOMPLETE"):
        DFlashCacheDataset(out)
    stats = read_json(cache / META_FILE)["feature_stats"]  # the good build's record
    assert stats["windows"] == N and [s["layer"] for s in stats["per_layer"]] == [1, 2, 3]
    # real hidden states vary: their variance is a good part of their mean square
    assert all(s["rms"] ** 2 - s["mean"] ** 2 > 0.01 * s["rms"] ** 2 for s in stats["per_layer"])


def test_a_cache_of_all_zero_features_is_refused_when_opened(tiny_teacher_dir, tmp_path) -> None:
    """A teacher whose every weight is zero gives finite, all-zero features: the build completes (nothing is
    non-finite) and records RMS 0; opening the cache for training refuses it, naming the layer."""
    from dflash_gptoss.cache_builder import build_teacher_cache

    snapshot = _damaged_teacher(tiny_teacher_dir, tmp_path / "zero_teacher", lambda name, a: np.zeros_like(a))
    out = tmp_path / "zero_cache"
    build_teacher_cache(snapshot, out, progress=False, **BUILD)
    assert read_json(out / META_FILE)["feature_stats"]["per_layer"][0] == {"layer": 1, "mean": 0.0, "rms": 0.0}
    with pytest.raises(CacheFormatError, match=r"the features of target layer 1 are all zero \(RMS 0\) over the "
                                               rf"{N} windows its build measured"):
        DFlashCacheDataset(out)


# ----------------------------------------------------------------------------------- the data a run learns from
def test_resume_onto_another_cache_is_refused_unless_allowed_and_recorded(cache, trained, teacher, tiny_teacher_dir,
                                                                          tmp_path) -> None:
    """A cache of the same teacher and geometry built with another --seed (other windows) cannot tell itself
    apart by layout, ctx_len or tokens: its manifest can. --resume onto it is refused naming both caches;
    --allow-new-cache continues and records the switch in dflash_run.json."""
    from dflash_gptoss.cache_builder import build_teacher_cache
    from dflash_gptoss.easydel_dflash_trainer import run_training

    other = tmp_path / "other_cache"
    build_teacher_cache(tiny_teacher_dir, other, teacher=teacher, progress=False, **dict(BUILD, seed=1))
    save = _copy(trained, tmp_path / "run")
    with pytest.raises(CheckpointError, match=rf"--cache-dir: the run trained on {cache} \(manifest sha256 \w{{12}}"
                                              rf"\.\.\.\), now {other} \(manifest sha256 \w{{12}}\.\.\.\) \(pass "
                                              r"--allow-new-cache to switch deliberately\)"):
        run_training(_settings(other, tiny_teacher_dir, save, resume=True, max_training_steps=3))
    summary = run_training(_settings(other, tiny_teacher_dir, save, resume=True, max_training_steps=3,
                                     allow_new_cache=True))
    assert summary["final_step"] == 3
    record = json.loads((save / "m" / "dflash_run.json").read_text())
    [switch] = record["data_switches"]
    assert (switch["at_step"], switch["flag"], switch["from"]["dir"], switch["to"]["dir"]) == (
        2, "--cache-dir", str(cache), str(other))
    assert record["data"]["cache"]["dir"] == str(other)


# ----------------------------------------------------------------------------------- signals
def _stop_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("stopped by ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _signal_midway(cmd: list[str], ready, sig: int, waiting_for: str) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; once ``ready()``, send ``sig`` to the group while it is frozen (so it
    arrives mid-run on any machine); return (exit code, stderr)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not ready():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"the job never {waiting_for}"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGSTOP)
        os.killpg(proc.pid, sig)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


def _continue(line: str) -> subprocess.CompletedProcess:
    """Run the command a stop line gives (with this interpreter)."""
    return subprocess.run([sys.executable, *shlex.split(line.split("Continue with: ")[1])[1:]], env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_trainer_cleanly_and_resume_gives_the_same_export(sig, cache, tiny_teacher_dir,
                                                                             tmp_path) -> None:
    """A real trainer CLI, signalled through its process group once its first checkpoint exists: it finishes
    the step in flight, saves it (verified), prints one line naming the step, what is kept and the command
    that continues, and exits 128 + signal. Running that command ends with the export an uninterrupted run
    makes (within the resume tolerance of test_trainer: float32 reduction order across a restart)."""
    from safetensors.numpy import load_file

    from dflash_gptoss.train_checkpoints import verify_checkpoint

    save, export = tmp_path / "ckpt", tmp_path / "draft"
    cmd = [*_train_cli(cache, tiny_teacher_dir, save, "--export-dir", str(export)), "--max-training-steps", "8"]
    code, err = _signal_midway(cmd, (save / "m" / "run-1" / MANIFEST_NAME).is_file, sig,
                               "saved its first checkpoint")
    assert code == 128 + sig, err[-3000:]
    line = _stop_line(err)
    step = int(line.split("after training step ")[1].split(" ")[0])
    assert 1 <= step < 8 and line.startswith(f"stopped by {signal.Signals(sig).name} after training step {step} of 8")
    assert f"checkpoint {save / 'm' / f'run-{step}'} is saved and verified (nothing was exported)." in line
    verify_checkpoint(save / "m" / f"run-{step}")
    assert not export.exists()
    command = line.split("Continue with: ")[1]
    assert command.endswith(" --resume")
    if sig != signal.SIGINT:
        return  # the resume is checked once
    resumed = _continue(line)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    ref = subprocess.run([*_train_cli(cache, tiny_teacher_dir, straight, "--export-dir", str(straight / "draft")),
                          "--max-training-steps", "8"], env=ENV, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = load_file(export / "model.safetensors"), load_file(straight / "draft" / "model.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_a_signal_stops_the_cache_build_cleanly_and_resume_completes_it(tiny_teacher_dir, tmp_path) -> None:
    """A real cache-builder CLI signalled mid-build: the chunks done stay written and recorded, one line says so
    and gives the command that continues (exit 130); that command completes the cache, equal to one built
    without a stop."""
    from dflash_gptoss.cache_format import read_progress

    out = tmp_path / "cache"
    build = [sys.executable, str(REPO / "scripts" / "tpu_dflash_build_teacher_cache.py"), "--model-snapshot-dir",
             str(tiny_teacher_dir), "--out-dir", str(out), "--ctx-len", str(CTX), "--block-size", str(B),
             "--num-context-features", str(K), "--num-blocks", "256", "--batch-size", "8", "--layout", "windows",
             "--dp", "2", "--tp", "4", "--no-progress"]
    code, err = _signal_midway(build, lambda: (out / "progress.json").is_file() and read_progress(out) >= 8,
                               signal.SIGINT, "wrote its first chunk")
    assert code == 130, err[-3000:]
    line = _stop_line(err)
    done = read_progress(out)
    assert line.startswith(f"stopped by SIGINT after window {done} of 256; the {done} windows done are written")
    assert 8 <= done < 256 and line.endswith(" --resume")
    resumed = _continue(line)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight"
    whole = subprocess.run([*build[:5], str(straight), *build[6:]], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    for name in ("features_u16.npy", "labels.npy", "token_ids.npy"):
        assert (out / name).read_bytes() == (straight / name).read_bytes(), name


# ----------------------------------------------------------------------------------- disk full, outside the cache
def test_a_full_disk_during_the_export_names_the_file_and_leaves_nothing(tiny_teacher_dir, tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error naming no file: the export turns it into ENOSPC naming
    the file (what the trainer prints, with "rerun with --resume"), and removes its temporary folder."""
    import torch
    from transformers import AutoConfig

    from dflash_gptoss.draft_config import make_draft_config
    from dflash_gptoss.export_draft import _flat_params, export_nnx_draft, load_nnx_draft_from_torch_folder
    from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel

    torch.manual_seed(0)
    config = make_draft_config(AutoConfig.from_pretrained(tiny_teacher_dir), num_hidden_layers=1, block_size=B,
                               mask_token_id=1, num_context_features=K)
    DFlashDraftModel(config).save_pretrained(tmp_path / "torch")
    params = _flat_params(load_nnx_draft_from_torch_folder(tmp_path / "torch", dp=2, tp=4))
    with small_fs(tmp_path / "fs", "256k") as mounted:  # the draft is ~1 MB
        if not mounted:
            def full(self, *args, **kwargs):
                raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                   '"No space left on device" })')

            monkeypatch.setattr(DFlashDraftModel, "save_pretrained", full)
        with pytest.raises(OSError) as info:
            export_nnx_draft(params, config, tmp_path / "fs" / "draft")
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename.endswith("model.safetensors") and "/fs/.draft.tmp-" in info.value.filename
        assert not list((tmp_path / "fs").iterdir())  # no draft, no temporary folder


def test_a_full_disk_during_data_generation_is_one_line_and_resumes(tiny_teacher_dir, tmp_path, capsys,
                                                                    monkeypatch):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import generate_teacher_data as cli
    finally:
        sys.path.pop(0)
    with small_fs(tmp_path / "fs", "12k") as mounted:  # a sample's line is ~1 KB
        out = tmp_path / "fs" / "data.jsonl"
        args = ["--model-snapshot-dir", str(tiny_teacher_dir), "--out", str(out), "--num-samples", "32",
                "--prompt-tokens", "32", "--max-new-tokens", "64", "--batch-size", "8"]
        if not mounted:
            import dflash_gptoss.data_generation as td

            real, calls = td.continuations, []

            def continuations(*a, **k):  # the second batch meets a full disk when it is written
                calls.append(1)
                if len(calls) > 1:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(*a, **k)

            monkeypatch.setattr(td, "continuations", continuations)
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        [line] = [ln for ln in err.splitlines() if ln.startswith("error:")]
        partial = f"{out}.partial"
        assert line.startswith(f"error: writing the teacher data failed: the disk is full ({partial}")
        assert line.endswith(" --resume") and "Every sample written before it is kept" in line
        kept = Path(partial).read_bytes().count(b"\n")
        assert kept >= 8 and not out.exists()
        for name in ("data.jsonl.partial", "data.jsonl.partial.json"):  # the same command with room continues
            shutil.copy(tmp_path / "fs" / name, tmp_path / name)
    monkeypatch.undo()
    roomy = [a if a != str(out) else str(tmp_path / "data.jsonl") for a in args]
    assert cli.main([*roomy, "--resume"]) == 0
    straight = [a if a != str(out) else str(tmp_path / "straight.jsonl") for a in args]
    assert cli.main(straight) == 0
    assert (tmp_path / "data.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()


def test_a_signal_stops_data_generation_cleanly_and_resume_completes_it(tiny_teacher_dir, tmp_path) -> None:
    """A real data-generation CLI sent SIGTERM through its process group mid-run: the batches written are kept
    (whole lines), one line gives the command that continues (exit 143), and that command ends with the file
    an uninterrupted run writes."""
    out = tmp_path / "data.jsonl"
    cmd = [sys.executable, str(REPO / "scripts" / "generate_teacher_data.py"), "--model-snapshot-dir",
           str(tiny_teacher_dir), "--out", str(out), "--num-samples", "24", "--prompt-tokens", "32",
           "--max-new-tokens", "64", "--batch-size", "4"]
    partial = Path(f"{out}.partial")
    code, err = _signal_midway(cmd, lambda: partial.is_file() and partial.read_bytes().count(b"\n") >= 4,
                               signal.SIGTERM, "wrote its first batch")
    assert code == 143, err[-3000:]
    line = _stop_line(err)
    kept = partial.read_bytes().count(b"\n")
    assert line.startswith(f"stopped by SIGTERM after sample {kept} of 24; the {kept} samples done are kept in "
                           f"{partial}.") and line.endswith(" --resume")
    assert 4 <= kept < 24 and not out.exists()
    resumed = _continue(line)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = tmp_path / "straight.jsonl"
    whole = subprocess.run([*cmd[:5], str(straight), *cmd[6:]], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert out.read_text() == straight.read_text()


def test_a_full_disk_under_the_benchmark_report_leaves_nothing_half_written(tmp_path, monkeypatch) -> None:
    from dflash_gptoss.benchmark.core import prepare_outputs, write_report
    from dflash_gptoss.run_safety.report_stem import still_ours

    report = {"settings": {"block_size": 2}, "acceptance_hist": {"1": 3}, "teacher": "t", "draft": "d",
              "device": "cpu", "dtype": "float32", "acceptance_mean": 1.0, "noisy": False, "speedup": 1.0,
              "speedup_per_prompt": None, "padding": "x" * 200_000}  # more than the disk has left
    with small_fs(tmp_path / "fs", "64k") as mounted:
        out, stem = prepare_outputs(tmp_path / "fs", "r")  # the reservation fits; the report does not
        if not mounted:
            def full(*args, **kwargs):
                raise _enospc()

            monkeypatch.setattr("dflash_gptoss.benchmark.core.plot_acceptance", full)
        with pytest.raises(OSError) as info:
            write_report(report, out, stem=stem)
        assert info.value.errno == errno.ENOSPC and str(tmp_path / "fs") in info.value.filename
        assert sorted(p.name for p in (tmp_path / "fs").iterdir()) == ["r.json"] and still_ours(stem)
