"""The token file: a ``--data`` JSONL tokenized once into memory-mapped arrays, beside the JSONL.

Invariant: a token file is read only when its manifest verifies and names the JSONL (its size and
sha256) and the tokenizer it was made with. One made from an older JSONL (more samples appended,
say) is made again; a damaged one is refused, naming the file; neither is ever read as it is.
It is written in one streaming pass (one record in memory at a time, so 800K samples of 3072
tokens never sit in Python lists), into a temporary folder whose files move into place before the
manifest is written, last: a killed or failed tokenization leaves nothing that looks finished.

Layout of ``<data>.tokens/``: ``tokens.i32`` (the stream, every document followed by EOS),
``response.u8`` (0 on a document's ``prompt_len`` prompt tokens, 1 elsewhere), ``doc_starts.i64``
(each document's first position), ``token_file.json`` (counts and provenance), and
``dflash_manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KIND = "dflash-gptoss-token-file"
VERSION = 1
INFO_FILE = "token_file.json"
ARRAYS = {"tokens": ("tokens.i32", np.int32), "response": ("response.u8", np.uint8),
          "doc_starts": ("doc_starts.i64", np.int64)}


class TokenFileError(ValueError):
    """A token file that does not match its JSONL or tokenizer, or is damaged (the message names both)."""


@dataclass
class TokenFile:
    """A verified token file, its arrays memory-mapped (read-only)."""

    path: Path
    info: dict[str, Any]
    tokens: np.ndarray
    response: np.ndarray
    doc_starts: np.ndarray


def token_file_dir(data: str | os.PathLike) -> Path:
    """Where the token file of ``data`` lives: ``<data>.tokens`` beside it."""
    data = Path(data).absolute()
    return data.with_name(data.name + ".tokens")


def _tokenizer_id(snapshot_dir: Path) -> str | None:
    """sha256 of the snapshot's ``tokenizer.json`` (text records are tokenized with it), None when absent."""
    from dflash_gptoss.run_safety.integrity import file_sha256

    path = snapshot_dir / "tokenizer.json"
    return file_sha256(path) if path.is_file() else None


def _source(data: Path, snapshot_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """What the token file is made from: a token file is valid only for exactly this."""
    from dflash_gptoss.run_safety.integrity import file_sha256

    return {"data": str(data), "data_bytes": data.stat().st_size, "data_sha256": file_sha256(data),
            "tokenizer_sha256": _tokenizer_id(snapshot_dir), "vocab_size": int(cfg["vocab_size"])}


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k} {have.get(k)!r} -> {want[k]!r}" for k in want if k != "data" and have.get(k) != want[k]]


def open_token_file(path: Path, want: dict[str, Any] | None = None) -> TokenFile:
    """The verified token file at ``path`` (TokenFileError naming what differs from ``want``)."""
    from dflash_gptoss.run_safety.integrity import IntegrityError, verify_manifest

    try:
        verify_manifest(path, what="token file", check="size")
    except IntegrityError as e:
        raise TokenFileError(f"{e} Remove {path} and run again to tokenize the data afresh.") from e
    info = json.loads((path / INFO_FILE).read_text())
    if info.get("kind") != KIND or info.get("version") != VERSION:
        raise TokenFileError(f"{path / INFO_FILE} is not a version-{VERSION} {KIND}; remove {path} and run again.")
    if want is not None and (diff := _differences(info["source"], want)):
        raise TokenFileError(f"the token file {path} was made from other data or another tokenizer ("
                             + "; ".join(diff) + f"); remove {path} and run again to tokenize the data afresh.")
    arrays = {name: np.memmap(path / file, dtype=dtype, mode="r") for name, (file, dtype) in ARRAYS.items()}
    if arrays["tokens"].size != info["num_tokens"] or arrays["response"].size != info["num_tokens"]:
        raise TokenFileError(f"the token file {path} holds {arrays['tokens'].size} tokens, its {INFO_FILE} says "
                             f"{info['num_tokens']}; remove {path} and run again.")
    return TokenFile(path, info, arrays["tokens"], arrays["response"], arrays["doc_starts"])


Records = Iterator[tuple[int, np.ndarray, int]]
"""``(line number, token ids, prompt_len)`` per document, each already checked."""


def write_token_file(path: Path, records: Records, *, eos_id: int, source: dict[str, Any],
                     progress: Callable[[int], None] | None = None) -> None:
    """Stream ``records`` into a new token file at ``path`` (temporary folder, then rename, manifest last)."""
    from dflash_gptoss.run_safety.integrity import write_manifest

    tmp = path / f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = {name: open(tmp / file, "wb") for name, (file, _) in ARRAYS.items()}
        num_tokens = num_docs = 0
        digest = hashlib.sha256()
        try:
            for _, ids, prompt_len in records:
                doc = np.concatenate([ids.astype(np.int32), np.asarray([eos_id], np.int32)])
                flags = np.ones(doc.size, np.uint8)
                flags[:prompt_len] = 0
                raw = doc.tobytes()
                files["tokens"].write(raw)
                files["response"].write(flags.tobytes())
                files["doc_starts"].write(np.int64(num_tokens).tobytes())
                digest.update(raw)
                num_tokens, num_docs = num_tokens + doc.size, num_docs + 1
                if progress is not None:
                    progress(doc.size)
            for f in files.values():
                f.flush()
                os.fsync(f.fileno())
        finally:
            for f in files.values():
                f.close()
        info = {"kind": KIND, "version": VERSION, "num_tokens": num_tokens, "num_docs": num_docs,
                "eos_id": int(eos_id), "tokens_sha256": digest.hexdigest(), "source": source}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        for name in [file for file, _ in ARRAYS.values()] + [INFO_FILE]:
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(path, kind=KIND)  # last: only a finished token file has one


def _remove_if_empty(path: Path) -> None:
    """A refused or failed first tokenization leaves no trace: the folder goes if it holds only its lock."""
    from dflash_gptoss.run_safety.job_lock import LOCK_NAME

    if path.is_dir() and {p.name for p in path.iterdir()} <= {LOCK_NAME}:
        shutil.rmtree(path, ignore_errors=True)


def token_file_for(data: str | os.PathLike, snapshot_dir: Path, cfg: dict[str, Any], records: Callable[[], Records],
                   *, eos_id: Callable[[], int], progress: bool = False) -> TokenFile:
    """The token file of ``data``: opened when it is there and matches; else made once from ``records()``.

    ``records()`` checks every record before it returns (bad input is refused before anything is
    written) and then yields them; ``eos_id()`` is asked after it. Two jobs on one JSONL: the second
    waits on the lock, then reads what the first wrote.
    """
    from dflash_gptoss.run_safety.integrity import MANIFEST_NAME
    from dflash_gptoss.run_safety.job_lock import acquire

    data = Path(data).absolute()
    path = token_file_dir(data)
    want = _source(data, snapshot_dir, cfg)

    def current() -> TokenFile | None:
        """The finished token file when it was made from exactly ``want`` (a damaged one is an error)."""
        if not (path / MANIFEST_NAME).is_file():
            return None
        tf = open_token_file(path)
        return None if _differences(tf.info["source"], want) else tf

    if (tf := current()) is not None:
        return tf
    stream = records()  # every record checked here, before anything is written
    eos = eos_id()
    with acquire(path, "tokenizing --data", wait=True):
        try:
            if current() is None:  # not made by another job while this one waited
                (path / MANIFEST_NAME).unlink(missing_ok=True)  # a stale one (the JSONL changed) is unfinished now
                for leftover in path.glob(".tmp-*"):  # a killed tokenization's
                    shutil.rmtree(leftover, ignore_errors=True)
                from tqdm.auto import tqdm

                # disable=None: tqdm draws only on a terminal, so a log or a refusal's one error line stays clean
                with tqdm(unit="tok", unit_scale=True, desc=f"tokenizing {data.name}",
                          disable=None if progress else True) as bar:
                    write_token_file(path, stream, eos_id=eos, source=want, progress=bar.update)
        except OSError as e:  # a full disk, above all: one line naming the folder; the JSONL is untouched
            from dflash_gptoss.run_safety.preflight import write_failure_message

            if e.filename is None:
                e.filename = str(path)
            _remove_if_empty(path)
            raise TokenFileError(write_failure_message(e, f"tokenizing --data {data}") + " Free space and run "
                                 "again: the token file is made afresh.") from e
        except BaseException:
            _remove_if_empty(path)
            raise
    return open_token_file(path, want)
