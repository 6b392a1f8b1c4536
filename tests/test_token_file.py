"""The token file: a ``--data`` JSONL tokenized once, read back memory-mapped, never trusted stale or damaged.

``input_ids`` records need no tokenizer, so these run without a model (quick tier); the builder's
tests cover text records through the tiny teacher's tokenizer.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss import cache_input
from dflash_gptoss.cache_input import CacheBuildError, load_token_stream
from dflash_gptoss.data_tokens import token_file_dir

CFG = {"vocab_size": 50, "eos_token_id": 0}
DOCS = [{"input_ids": [5, 6, 7], "prompt_len": 2}, {"input_ids": [9, 10]}, {"input_ids": [11, 12, 13, 14],
                                                                                "prompt_len": 1}]


def _write(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def _expected(docs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The stream as the builder defines it: every document followed by EOS, prompts flagged 0."""
    tokens, response = [], []
    for d in docs:
        ids = d["input_ids"] + [CFG["eos_token_id"]]
        tokens += ids
        response += [0] * d.get("prompt_len", 0) + [1] * (len(ids) - d.get("prompt_len", 0))
    return np.asarray(tokens, np.int32), np.asarray(response, np.uint8)


def test_the_token_file_is_the_stream_and_a_second_run_parses_nothing(tmp_path: Path, monkeypatch) -> None:
    data = _write(tmp_path / "d.jsonl", DOCS)
    tokens, response = load_token_stream(data, tmp_path, CFG)
    want_tokens, want_response = _expected(DOCS)
    assert np.array_equal(tokens, want_tokens) and np.array_equal(response, want_response)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.int32
    info = json.loads((token_file_dir(data) / "token_file.json").read_text())
    assert info["num_docs"] == 3 and info["num_tokens"] == want_tokens.size
    assert np.array_equal(np.fromfile(token_file_dir(data) / "doc_starts.i64", np.int64), [0, 4, 7])

    def no_parsing(*a, **k):
        raise AssertionError("the JSONL was parsed again")

    monkeypatch.setattr(cache_input, "_jsonl_records", no_parsing)
    again, _ = load_token_stream(data, tmp_path, CFG)
    assert np.array_equal(again, want_tokens)


def test_a_changed_jsonl_is_tokenized_again(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", DOCS)
    load_token_stream(data, tmp_path, CFG)
    more = [*DOCS, {"input_ids": [20, 21]}]
    _write(data, more)  # e.g. data generation resumed and appended samples
    tokens, response = load_token_stream(data, tmp_path, CFG)
    assert np.array_equal(tokens, _expected(more)[0]) and np.array_equal(response, _expected(more)[1])


def test_a_damaged_token_file_is_refused_naming_the_file_and_the_fix(tmp_path: Path) -> None:
    data = _write(tmp_path / "d.jsonl", DOCS)
    load_token_stream(data, tmp_path, CFG)
    path = token_file_dir(data)
    with open(path / "tokens.i32", "r+b") as f:
        f.truncate(8)
    with pytest.raises(CacheBuildError, match=r"tokens\.i32 has 8 bytes.*Remove .*d\.jsonl\.tokens and run again"):
        load_token_stream(data, tmp_path, CFG)


@pytest.mark.parametrize("bad,message", [
    ({"input_ids": [1, 2.5]}, r"d\.jsonl:2: input_ids\[1\] = 2\.5 is not an integer"),
    ({"input_ids": [1, 99]}, r"d\.jsonl:2: token ids must lie in \[0, 50\)"),
    ({"input_ids": [1, 2], "prompt_len": 5}, r"d\.jsonl:2: prompt_len=5 must lie in \[0, 2\]"),
])
def test_bad_records_are_refused_and_leave_nothing(tmp_path: Path, bad: dict, message: str) -> None:
    data = _write(tmp_path / "d.jsonl", [DOCS[0], bad])
    with pytest.raises(CacheBuildError, match=message):
        load_token_stream(data, tmp_path, CFG)
    assert not token_file_dir(data).exists()


def test_a_killed_tokenization_is_not_read_and_the_next_run_makes_it(tmp_path: Path, monkeypatch) -> None:
    data = _write(tmp_path / "d.jsonl", DOCS)
    real = cache_input._token_records

    def killed_after_one(*args):
        for i, record in enumerate(real(*args)):
            if i == 1:
                raise KeyboardInterrupt
            yield record

    monkeypatch.setattr(cache_input, "_token_records", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        load_token_stream(data, tmp_path, CFG)
    assert not (token_file_dir(data) / "dflash_manifest.json").exists()
    monkeypatch.setattr(cache_input, "_token_records", real)
    tokens, _ = load_token_stream(data, tmp_path, CFG)
    assert np.array_equal(tokens, _expected(DOCS)[0])
    assert not list(token_file_dir(data).glob(".tmp-*"))


def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    from dflash_gptoss import data_tokens

    data = _write(tmp_path / "d.jsonl", DOCS)

    real_fsync = data_tokens.os.fsync

    def full(fd: int) -> None:  # the disk fills under the token file's own writes (not the lock's)
        if ".tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(data_tokens.os, "fsync", full)
    with pytest.raises(CacheBuildError) as caught:
        load_token_stream(data, tmp_path, CFG)
    message = str(caught.value)
    assert "\n" not in message and "the disk is full" in message and str(token_file_dir(data)) in message, message
    assert "Free space and run again" in message
    assert not token_file_dir(data).exists()
    monkeypatch.undo()
    assert np.array_equal(load_token_stream(data, tmp_path, CFG)[0], _expected(DOCS)[0])
