"""The trainer's run folder (``save_directory/model_name``): which checkpoint to resume, and whether it may be.

Invariants:

* a ``run-<step>`` checkpoint is usable only when its manifest (``integrity``) verifies in full; a
  checkpoint whose save was cut short (killed, disk full) has none, and one damaged later fails its
  checksums. Resume and export refuse both, naming the file and the newest checkpoint that IS good;
* a run folder belongs to ONE run: ``dflash_run.json`` (written when the run starts) records what a
  resumed run must keep (the draft's shape, the data stream, the cache and teacher it reads), and
  ``--resume`` with anything else is refused before any compilation, listing the differences;
* without ``--resume`` a folder that already holds checkpoints is refused (easydel would silently
  write new checkpoints among the old ones); ``--resume`` without a checkpoint is refused too (a
  mistyped ``--model-name`` must not restart training from scratch), while ``--resume-if-possible``
  starts afresh there, for scripts that run the same command again and again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dflash_gptoss.run_safety.integrity import IntegrityError, verify_manifest

RUN_FILE = "dflash_run.json"
CHECKPOINT_KIND = "draft-checkpoint"
ARCHITECTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "block_size", "dflash_config")
"""Draft config entries a checkpoint's weights are tied to (compared with its ``config.json``)."""
FLAG_OF = {"num_hidden_layers": "--num-draft-layers", "block_size": "--block-size",
           "dflash_config": "--mask-token-id / the cache's target_layer_ids", "intermediate_size": "the teacher",
           "hidden_size": "the teacher", "vocab_size": "the teacher"}


class CheckpointError(ValueError):
    """A run folder or checkpoint that cannot be used as asked (the message names the file and the fix)."""


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``run-<step>`` folder under ``run_dir``, oldest first."""
    runs = [p for p in Path(run_dir).glob("run-*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(runs, key=lambda p: int(p.name[4:]))


def verify_checkpoint(path: str | os.PathLike, *, check: str = "full") -> None:
    """IntegrityError unless ``path`` matches its manifest (full checksums by default)."""
    verify_manifest(path, what="checkpoint", check=check)


def newest_good(run_dir: str | os.PathLike, before: Path | None = None) -> Path | None:
    """The newest checkpoint (older than ``before``) whose manifest verifies in full, if any."""
    for p in reversed(checkpoints(run_dir)):
        if before is not None and int(p.name[4:]) >= int(before.name[4:]):
            continue
        try:
            verify_checkpoint(p)
            return p
        except IntegrityError:
            continue
    return None


def damaged_message(path: Path, err: Exception) -> str:
    """What is wrong with ``path`` and how to go on from the newest good checkpoint before it."""
    good = newest_good(path.parent, before=path)
    fix = (f"The newest good checkpoint is {good.name}: move {path.name} out of the way "
           f"(mv {path} {path.parent / ('damaged-' + path.name)}) and rerun with --resume to continue from "
           f"{good.name}." if good is not None else
           "No older checkpoint of this run verifies either: start afresh with another --model-name.")
    return f"checkpoint {path} cannot be used: {err} {fix}"


def require_good(path: Path) -> Path:
    """``path`` if it verifies in full, else CheckpointError with :func:`damaged_message`."""
    try:
        verify_checkpoint(path)
    except IntegrityError as e:
        raise CheckpointError(damaged_message(path, e)) from e
    return path


def checkpoint_to_resume(run_dir: Path, *, resume: bool, resume_if_possible: bool) -> Path | None:
    """The verified checkpoint a run starts from (None: start afresh), or CheckpointError (module doc)."""
    found = checkpoints(run_dir)
    if resume and resume_if_possible:
        raise CheckpointError("--resume and --resume-if-possible: pass one (--resume refuses a run folder "
                              "without checkpoints, --resume-if-possible starts afresh there).")
    if not found:
        if resume:
            raise CheckpointError(f"--resume: {run_dir} holds no run-<step> checkpoint to continue (check "
                                  "--save-directory and --model-name); pass --resume-if-possible to start "
                                  "afresh when there is none.")
        return None
    if not (resume or resume_if_possible):
        raise CheckpointError(f"{run_dir} already holds checkpoints ({', '.join(p.name for p in found[-3:])}); "
                              "pass --resume to continue that run, or choose another --model-name (or "
                              "--save-directory) to start a new one.")
    return require_good(found[-1])


def run_record(draft_config: Any, fixed: dict[str, Any]) -> dict[str, Any]:
    """What ``dflash_run.json`` holds: the draft's architecture and the settings a resume must keep."""
    cfg = draft_config.to_dict()
    return {"architecture": {k: cfg.get(k) for k in ARCHITECTURE_KEYS}, "fixed": fixed}


def write_run_record(run_dir: Path, record: dict[str, Any]) -> None:
    from dflash_gptoss.cache_format import write_json_atomic

    write_json_atomic(run_dir / RUN_FILE, record)


def _data_switches(before: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, dict, dict]]:
    """The caches (training, eval) whose manifest differs from the one the run recorded: (flag, before, now)."""
    switched = []
    for key, flag in (("cache", "--cache-dir"), ("eval_cache", "--eval-cache-dir")):
        old, new = before.get(key), now.get(key)
        if old is None and new is None:
            continue
        if (old or {}).get("manifest_sha256") != (new or {}).get("manifest_sha256"):
            switched.append((flag, old or {}, new or {}))
    return switched


def _describe(cache: dict[str, Any]) -> str:
    if not cache:
        return "none"
    digest = cache.get("manifest_sha256")
    return f"{cache.get('dir')} (manifest sha256 {digest[:12] if digest else 'none'}...)"


def check_resume_matches(checkpoint: Path, record: dict[str, Any], *, allow_new_cache: bool = False) -> None:
    """CheckpointError listing every setting that differs from the run's (its ``dflash_run.json`` and the
    checkpoint's own ``config.json``).

    The data a run learns from is pinned: a cache (or eval cache) whose manifest is not the one the run
    recorded is refused naming both, unless ``allow_new_cache``, which records the switch in the run file.
    Settings a run record predates (keys it does not hold) are not compared."""
    problems = []
    cfg_path = checkpoint / "config.json"
    try:
        saved = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(damaged_message(checkpoint, e)) from e
    for key, want in record["architecture"].items():
        if saved.get(key) != want:
            problems.append(f"{key}: checkpoint {saved.get(key)!r}, now {want!r} ({FLAG_OF.get(key, key)})")
    run_file = checkpoint.parent / RUN_FILE
    switches: list[tuple[str, dict, dict]] = []
    saved_record: dict[str, Any] = {}
    if run_file.is_file():
        saved_record = json.loads(run_file.read_text())
        before = saved_record.get("fixed", {})
        problems += [f"{key}: the run started with {before.get(key)!r}, now {value!r}"
                     for key, value in record["fixed"].items() if key in before and before[key] != value]
        if "data" in saved_record and "data" in record:
            switches = _data_switches(saved_record["data"], record["data"])
    if switches and not allow_new_cache:
        problems += [f"{flag}: the run trained on {_describe(old)}, now {_describe(new)} (pass --allow-new-cache to "
                     "switch deliberately)" for flag, old, new in switches]
    if problems:
        raise CheckpointError(f"--resume from {checkpoint}: " + "; ".join(problems) + ". A resumed run must keep "
                              "the draft's shape and its data stream; start a new run with another --model-name "
                              "to change them.")
    from dflash_gptoss.distributed import is_main_process

    if switches and is_main_process():  # allowed: record what the run learns from from this step on
        step = int(checkpoint.name[4:])
        history = saved_record.setdefault("data_switches", [])
        history += [{"at_step": step, "flag": flag, "from": old, "to": new} for flag, old, new in switches]
        saved_record["data"] = record["data"]
        write_run_record(checkpoint.parent, saved_record)
