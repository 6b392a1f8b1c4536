"""The corpus every machine has: the ``.py`` sources of Python's own standard library.

No machine in this project is guaranteed a model hub or a dataset download, but
every machine that runs the project runs a CPython interpreter, and that
interpreter ships a few megabytes of real, varied, well-formed Python. The tiny
teacher's tokenizer and weights are trained on it, the cache builder uses it as
its default data, and the benchmark takes its prompts from it.

The split into train / held-out is a fixed rule on each file's path relative to
the stdlib directory (``crc32(path) % 10 == 0`` is held out), so it is the same
on every machine, independent of file order or of which other files exist, and
no held-out file can leak into training. Different Python versions ship
different files; consumers that cache derived artifacts key them by the
interpreter's ``major.minor`` for that reason.
"""

from __future__ import annotations

import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "heldout")
HELDOUT_MODULUS = 10
"""A file is held out when ``crc32(relative posix path) % HELDOUT_MODULUS == 0`` (about 10%)."""

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
"""Directory names skipped anywhere in the tree.

``site-packages`` holds whatever happens to be installed (not the same on every
machine); ``test``/``tests`` (which include lib2to3's deliberately broken test
data) are huge, repetitive and partly not valid Python 3; ``idlelib`` is a GUI
application rather than library code.
"""


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def _relative_posix(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def is_heldout(relative_posix_path: str) -> bool:
    """The fixed split rule: a stable hash of the relative path, never of content or order."""
    return zlib.crc32(relative_posix_path.encode("utf-8")) % HELDOUT_MODULUS == 0


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


@lru_cache(maxsize=4)
def _all_files(root: Path) -> tuple[Path, ...]:
    """Every eligible ``.py`` file under ``root``, sorted by relative path (deterministic order)."""
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        if _is_utf8(path):
            files.append(path)
    return tuple(sorted(files, key=lambda p: _relative_posix(p, root)))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def stdlib_files(split: str) -> list[Path]:
    """The stdlib ``.py`` files of one split ("train" or "heldout"), in sorted relative-path order."""
    _check_split(split)
    root = stdlib_root()
    want_heldout = split == "heldout"
    return [p for p in _all_files(root) if is_heldout(_relative_posix(p, root)) == want_heldout]


def read_texts(split: str) -> list[str]:
    """The decoded contents of :func:`stdlib_files` for ``split``, in the same order."""
    return [p.read_text(encoding="utf-8") for p in stdlib_files(split)]


def _backend(tokenizer: Any) -> Any:
    """The raw ``tokenizers.Tokenizer`` behind an HF fast tokenizer (or the raw one itself).

    Encoding through it skips transformers' per-call checks (e.g. the warning for
    texts longer than ``model_max_length``: whole files are longer by design).
    """
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def _encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added; batched (parallel in Rust)."""
    return [enc.ids for enc in _backend(tokenizer).encode_batch(texts, add_special_tokens=False)]


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        from dflash_gptoss.tiny_teacher import EOS_TOKEN

        eos = _backend(tokenizer).token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; token_stream needs one to join files.")
    return int(eos)


def heldout_prompts(tokenizer: Any, num_prompts: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """Prompts cut from held-out files: what the benchmark and tests measure on (see :func:`split_prompts`)."""
    return split_prompts(tokenizer, "heldout", num_prompts, prompt_tokens, seed=seed)


def split_prompts(tokenizer: Any, split: str, num_prompts: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    """Deterministic prompts of exactly ``prompt_tokens`` ids, cut from the files of ``split``.

    One prompt per file while files last (so prompts are diverse), taken at a
    seeded offset inside the file; files shorter than ``prompt_tokens`` are
    skipped. When there are fewer usable files than ``num_prompts`` the files are
    visited again at new offsets. The benchmark measures on ``heldout`` prompts (text
    the teacher and the draft never trained on); the draft's training data is the
    teacher's own continuations of ``train`` prompts.
    """
    _check_split(split)
    if num_prompts < 0 or prompt_tokens < 1:
        raise ValueError(f"need num_prompts >= 0 and prompt_tokens >= 1, got {num_prompts}, {prompt_tokens}.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(stdlib_files(split)))
    texts = read_texts(split)
    encoded = _encode_all(tokenizer, [texts[i] for i in order])
    usable = [ids for ids in encoded if len(ids) >= prompt_tokens]
    if num_prompts and not usable:
        raise ValueError(f"no {split} file has {prompt_tokens} tokens; ask for shorter prompts.")
    prompts = []
    for k in range(num_prompts):
        ids = usable[k % len(usable)]
        start = int(rng.integers(0, len(ids) - prompt_tokens + 1))
        prompts.append(ids[start : start + prompt_tokens])
    return prompts


def token_stream(tokenizer: Any, split: str) -> np.ndarray:
    """All files of ``split`` tokenized and joined, each followed by the EOS id (int32).

    EOS between files marks document boundaries the way the model will see
    them at generation time.
    """
    _check_split(split)
    eos = _eos_id(tokenizer)
    pieces = []
    for ids in _encode_all(tokenizer, read_texts(split)):
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
