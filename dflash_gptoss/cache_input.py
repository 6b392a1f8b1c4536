"""The cache builder's input: ``--data`` records -> one token stream with response flags, and the windows.

Invariant: every record is checked before any teacher work, and every refusal names ``file:line`` and
the value (a float, boolean or nested list where a token id belongs is refused, never rounded). The
data is one token stream with EOS after every document; prompt tokens (``prompt_len``) are flagged
0 in ``response`` so they are context only, never anchors or labels. Windows start at seeded offsets
(``window_offsets``), so a build and its resume draw the same windows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dflash_gptoss.cache_format import trainable_blocks
from dflash_gptoss.cache_settings import DEFAULT_DATA


class CacheBuildError(ValueError):
    """Bad input to the cache build, found before (or instead of) any teacher work."""


def _eos_id(cfg: dict[str, Any], tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
    if eos is None:
        raise CacheBuildError(
            "no EOS id to join documents: the snapshot has no tokenizer with an EOS token and config.json "
            "has no eos_token_id."
        )
    return int(eos)


def _load_tokenizer(snapshot_dir: Path) -> Any:
    if not (snapshot_dir / "tokenizer.json").is_file():
        raise CacheBuildError(
            f"{snapshot_dir} has no tokenizer.json; text data (and the default corpus) needs the teacher's "
            'tokenizer. Pass --data with {"input_ids": [...]} lines instead.'
        )
    from transformers import AutoTokenizer

    from dflash_gptoss.teacher_snapshot import SnapshotError, check_tokenizer

    try:
        check_tokenizer(snapshot_dir)  # a damaged tokenizer.json is named, with the line and column
    except SnapshotError as e:
        raise CacheBuildError(str(e)) from e
    return AutoTokenizer.from_pretrained(str(snapshot_dir))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_doc(doc: Any, where: str) -> None:
    """One --data record: an object with a string ``text`` or a flat list of integer ``input_ids``,
    and an optional integer ``prompt_len``; anything else is refused, naming ``where`` (file:line)."""
    if not isinstance(doc, dict) or ("text" not in doc and "input_ids" not in doc):
        raise CacheBuildError(f'--data {where}: needs a JSON object with a "text" or an "input_ids" field.')
    if "input_ids" in doc:
        ids = doc["input_ids"]
        if not isinstance(ids, list) or not ids:
            raise CacheBuildError(f"--data {where}: input_ids must be a non-empty list of token ids, got "
                                  f"{type(ids).__name__}.")
        bad = next((i for i, v in enumerate(ids) if not _is_int(v)), None)
        if bad is not None:
            raise CacheBuildError(f"--data {where}: input_ids[{bad}] = {ids[bad]!r} is not an integer token id "
                                  "(floats, booleans and nested lists are refused, never rounded).")
    elif not isinstance(doc["text"], str):
        raise CacheBuildError(f'--data {where}: "text" must be a string, got {type(doc["text"]).__name__}.')
    if "prompt_len" in doc and not _is_int(doc["prompt_len"]):
        raise CacheBuildError(f"--data {where}: prompt_len={doc['prompt_len']!r} must be an integer.")


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every non-blank line, each checked by :func:`_check_doc`, one at a time."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CacheBuildError(f"--data {path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                      "JSONL must be UTF-8.") from e
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise CacheBuildError(f"--data {path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}).") from e
            _check_doc(doc, f"{path}:{lineno}")
            yield lineno, doc


def _check_jsonl(path: Path) -> bool:
    """Every record checked before anything is written (one pass, nothing kept): whether any is text."""
    docs, has_text = 0, False
    for _, doc in _jsonl_records(path):
        docs += 1
        has_text = has_text or "input_ids" not in doc
    if not docs:
        raise CacheBuildError(f"--data {path} holds no documents.")
    return has_text


def _token_records(data: Path, tokenizer: Any, vocab: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """The second pass: each record's token ids (range-checked) and its prompt length."""
    for lineno, doc in _jsonl_records(data):
        ids = doc["input_ids"] if "input_ids" in doc else tokenizer.encode(doc["text"], add_special_tokens=False)
        lo, hi = min(ids, default=0), max(ids, default=0)
        if lo < 0 or hi >= vocab:
            raise CacheBuildError(f"--data {data}:{lineno}: token ids must lie in [0, {vocab}) (the teacher's "
                                  f"vocabulary); found {lo}..{hi}.")
        ids = np.asarray(ids, dtype=np.int64)
        prompt_len = doc.get("prompt_len", 0)
        if not 0 <= prompt_len <= ids.size:
            raise CacheBuildError(f"--data {data}:{lineno}: prompt_len={prompt_len!r} must lie in [0, {ids.size}] "
                                  "(the document's token count).")
        yield lineno, ids, prompt_len


def load_token_stream(
    data: str | os.PathLike | None, snapshot_dir: Path, cfg: dict[str, Any], *, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The data as one int32 token stream, every document followed by EOS, and its response flags.

    ``response`` (uint8, same length) is 0 on a document's first ``prompt_len`` tokens (a JSONL
    field; the teacher-generated data writes it) and 1 elsewhere, EOS included: prompts are
    context, never anchors or labels. The default corpus is all response. A JSONL is tokenized once
    into its token file (``data_tokens``) and read back memory-mapped: later runs on the same data
    and tokenizer parse nothing.
    """
    if data is None or str(data) == DEFAULT_DATA:
        from dflash_gptoss import data_corpus

        tokens = data_corpus.token_stream(_load_tokenizer(snapshot_dir), "train")
        return np.ascontiguousarray(tokens, dtype=np.int32), np.ones(tokens.size, dtype=np.uint8)
    from dflash_gptoss.data_tokens import TokenFileError, token_file_for

    path = Path(data)
    if not path.is_file():
        raise CacheBuildError(f"--data {path} does not exist or is not a file.")
    state: dict[str, Any] = {}

    def records() -> Iterator[tuple[int, np.ndarray, int]]:
        state["tokenizer"] = _load_tokenizer(snapshot_dir) if _check_jsonl(path) else None
        return _token_records(path, state["tokenizer"], int(cfg["vocab_size"]))

    try:
        tf = token_file_for(path, snapshot_dir, cfg, records, eos_id=lambda: _eos_id(cfg, state.get("tokenizer")),
                            progress=progress)
    except TokenFileError as e:
        raise CacheBuildError(str(e)) from e
    return tf.tokens, tf.response


def window_offsets(num_tokens: int, window: int, num_windows: int, seed: int,
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """Seeded window starts, uniform over ``[0, num_tokens - window]`` (deterministic).

    ``allowed`` (bool per start) restricts the draw when some starts may not be used (a
    ``blocks`` window whose block would fall inside a prompt); all-True draws as without it.
    """
    rng = np.random.default_rng(seed)
    if allowed is None or allowed.all():
        return rng.integers(0, num_tokens - window + 1, size=num_windows, dtype=np.int64)
    starts = np.flatnonzero(allowed).astype(np.int64)
    if starts.size == 0:
        raise CacheBuildError("no window of the data has its block in response text (every block would overlap "
                              "a prompt); check the data's prompt_len fields, or use --layout windows.")
    return starts[rng.integers(0, starts.size, size=num_windows)]


def blocks_allowed_starts(response: np.ndarray, window: int, ctx_len: int, block_size: int) -> np.ndarray:
    """``blocks`` layout: window starts whose block (anchor at window position ``ctx_len``) is trainable
    by ``cache_format.trainable_blocks``, the rule the trainer applies to ``windows`` caches."""
    return trainable_blocks(response, np.arange(response.size - window + 1) + ctx_len, block_size)
