"""The cache build's settings, each defined once: default, type and flag.

``scripts/tpu_dflash_build_teacher_cache.py`` builds its parser from these fields and
``scripts/plan_tpu_run.py`` its cache flags from the same ones, so the planner and the builder
cannot disagree on a flag or a default. Cheap to import (no jax, no numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

from dflash_gptoss.cli_types import positive_int, setting

LAYOUTS = ("blocks", "windows")
DTYPES = ("float32", "bfloat16")
DEFAULT_DATA = "corpus:train"
"""``data=None`` means the tiny teacher's training corpus (``data_corpus.token_stream(tok, "train")``)."""


@dataclass(kw_only=True)
class CacheBuildSettings:
    """One cache build. Every field is a flag of the builder (``--name-with-dashes``)."""

    model_snapshot_dir: str = setting(
        help="Hugging Face snapshot folder of the GPT-OSS teacher (config.json, *.safetensors, tokenizer.json).")
    ctx_len: int = setting(
        type=positive_int,
        help="context positions per block (blocks layout: the anchor sits at position ctx_len); window length per "
             "window in windows layout.")
    block_size: int = setting(8, type=int, help="block size B: the anchor plus B-1 proposals (>= 2).")
    num_context_features: int = setting(
        4, type=positive_int,
        help="K: number of teacher layers whose outputs form the context features; the layer ids follow "
             "round(1 + i*(L-4)/(K-1)).")
    num_blocks: int = setting(
        type=positive_int,
        help="number of windows to run through the teacher: blocks in 'blocks' layout, windows in 'windows' layout.")
    batch_size: int = setting(4, type=positive_int, help="windows per teacher forward; must be divisible by --dp.")
    out_dir: str = setting(help="cache directory to create (or resume / overwrite).")
    data: str | None = setting(
        None,
        help='JSONL of {"text": ...} (tokenized with the snapshot\'s tokenizer.json) or {"input_ids": [...]} '
             "documents, joined with EOS into one stream. Default: the tiny teacher's training corpus "
             f"({DEFAULT_DATA}: the stdlib .py train split).")
    layout: str = setting("blocks", choices=LAYOUTS, help="cache layout (see below).")
    seed: int = setting(0, type=int, help="seed of the window offsets in the token stream.")
    dp: int = setting(1, type=positive_int, help="data-parallel mesh size (batch axis).")
    tp: int = setting(1, type=positive_int, help="tensor-parallel mesh size.")
    dtype: str = setting("float32", choices=DTYPES,
                         help="teacher compute dtype (features are stored as bf16 either way).")
    resume: bool = setting(False, help="continue an interrupted build in --out-dir (same settings required).")
    overwrite: bool = setting(False, help="replace a cache already in --out-dir.")
    assume_free_bytes: int | None = setting(
        None, type=int,
        help="use this many free bytes for the size check instead of measuring --out-dir's filesystem (for "
             "filesystems that misreport, and to test the check).")
    no_progress: bool = setting(False, help="disable the progress bar.")
