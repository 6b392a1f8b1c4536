"""The mmap dataset: refusal of incomplete caches, access, shuffling, host slicing, validate.

Caches here are laid out by the builder's own planning code (``plan_teacher_cache`` +
``prepare_out_dir``, no teacher) and filled with known values, so every read can be
checked exactly. test_cache_builder.py covers a dataset over a teacher-built cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss.bf16 import to_bf16_bits
from dflash_gptoss.cache_builder import plan_teacher_cache, prepare_out_dir
from dflash_gptoss.cache_format import CacheFormatError, mark_complete
from dflash_gptoss.draft_config import make_draft_config
from dflash_gptoss.easydel_dflash_cache import (
    CacheMismatchError,
    DFlashCacheDataset,
    valid_anchor_range,
    window_block_target_ids,
)
from dflash_gptoss.tiny_teacher import tiny_gptoss_config

H, K, CTX, B, N = 32, 3, 10, 4, 24


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A config-only GPT-OSS snapshot (planning never needs weights) and an input_ids JSONL."""
    root = tmp_path_factory.mktemp("snap")
    tiny_gptoss_config(vocab_size=256, hidden_size=H, eos_token_id=0).to_json_file(root / "config.json")
    ids = np.random.default_rng(1).integers(1, 256, size=300).tolist()
    (root / "data.jsonl").write_text(json.dumps({"input_ids": ids}) + "\n")
    return root, root / "data.jsonl"


def _filled_cache(snapshot: tuple[Path, Path], out: Path, layout: str, *, complete: bool = True) -> dict:
    snap, data = snapshot
    plan = plan_teacher_cache(
        snap,
        out,
        ctx_len=CTX,
        block_size=B,
        num_context_features=K,
        num_blocks=N,
        batch_size=4,
        layout=layout,
        data=data,
    )
    arrays = prepare_out_dir(plan)
    rng = np.random.default_rng(2)
    truth = {}
    for name, spec in plan.specs.items():
        if name == "window_offsets":
            continue
        if spec.bf16_bits:
            vals = rng.standard_normal(spec.shape).astype(np.float32)
            arrays[name][:] = to_bf16_bits(vals)
        else:
            arrays[name][:] = rng.integers(0, 256, size=spec.shape)
        truth[name] = np.array(arrays[name])
        arrays[name].flush()
    if complete:
        mark_complete(out, plan.meta)
    return truth


@pytest.fixture(scope="module")
def blocks_cache(snapshot, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("blocks") / "cache"
    return out, _filled_cache(snapshot, out, "blocks")


def test_incomplete_cache_is_refused(snapshot, tmp_path: Path) -> None:
    _filled_cache(snapshot, tmp_path / "c", "blocks", complete=False)
    with pytest.raises(CacheFormatError, match="INCOMPLETE.*--resume"):
        DFlashCacheDataset(tmp_path / "c", process_index=0, process_count=1)


def test_not_a_cache_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheFormatError, match="meta.json not found"):
        DFlashCacheDataset(tmp_path, process_index=0, process_count=1)


def test_random_access_restores_float32_or_keeps_bits(blocks_cache) -> None:
    out, truth = blocks_cache
    ds = DFlashCacheDataset(out, process_index=0, process_count=1)
    assert len(ds) == N and ds.layout == "blocks"
    idx = [5, 1, 5, 20]
    batch = ds.get_batch(idx)
    assert batch["context_features"].dtype == np.float32 and batch["context_features"].shape == (4, CTX, K * H)
    np.testing.assert_array_equal(to_bf16_bits(batch["context_features"]), truth["context_features"][idx])
    np.testing.assert_array_equal(batch["target_ids"], truth["target_ids"][idx])
    bits = DFlashCacheDataset(out, bf16_as_bits=True, process_index=0, process_count=1).get_batch(idx)
    assert bits["anchor_embedding"].dtype == np.uint16
    np.testing.assert_array_equal(bits["anchor_embedding"], truth["anchor_embedding"][idx])
    one = ds[7]
    np.testing.assert_array_equal(one["target_ids"], truth["target_ids"][7])


def test_shuffled_epochs_are_deterministic_per_seed(blocks_cache) -> None:
    out, _ = blocks_cache
    a = DFlashCacheDataset(out, seed=3, process_index=0, process_count=1)
    b = DFlashCacheDataset(out, seed=3, process_index=0, process_count=1)
    np.testing.assert_array_equal(a.epoch_permutation(0), b.epoch_permutation(0))
    assert not np.array_equal(a.epoch_permutation(0), a.epoch_permutation(1))
    other = DFlashCacheDataset(out, seed=4, process_index=0, process_count=1)
    assert not np.array_equal(a.epoch_permutation(0), other.epoch_permutation(0))
    assert sorted(a.epoch_permutation(0)) == list(range(N))


def test_hosts_get_disjoint_slices_of_each_global_batch(blocks_cache) -> None:
    out, truth = blocks_cache
    G, P = 8, 2
    hosts = [DFlashCacheDataset(out, seed=5, process_index=i, process_count=P) for i in range(P)]
    single = DFlashCacheDataset(out, seed=5, process_index=0, process_count=1)
    per_host = [list(h.iter_batches(G, epoch=2)) for h in hosts]
    whole = list(single.iter_batches(G, epoch=2))
    assert len(whole) == N // G == single.batches_per_epoch(G)
    for step, full in enumerate(whole):
        parts = [per_host[i][step]["target_ids"] for i in range(P)]
        assert all(p.shape == (G // P, B) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), full["target_ids"])
    with pytest.raises(ValueError, match="multiple of process_count=2"):
        next(hosts[0].iter_batches(7))


def test_validate_names_each_mismatch(blocks_cache, snapshot) -> None:
    out, _ = blocks_cache
    ds = DFlashCacheDataset(out, process_index=0, process_count=1)
    teacher_cfg = tiny_gptoss_config(vocab_size=256, hidden_size=H)
    good = make_draft_config(teacher_cfg, num_hidden_layers=1, block_size=B, mask_token_id=255, num_context_features=K)
    ds.validate(teacher_config=teacher_cfg, draft_config=good)
    for kwargs, name in [
        (dict(hidden_size=64), "hidden_size"),
        (dict(num_context_features=2), "num_context_features"),
        (dict(block_size=8), "block_size"),
        (dict(target_layer_ids=[0, 2, 3]), "target_layer_ids"),
        (dict(vocab_size=512), "vocab_size"),
        (
            dict(teacher_config=tiny_gptoss_config(vocab_size=256, hidden_size=H, num_hidden_layers=8)),
            "num_target_layers",
        ),
    ]:
        with pytest.raises(CacheMismatchError, match=name):
            ds.validate(**kwargs)


def test_windows_layout_serves_many_anchors(snapshot, tmp_path: Path) -> None:
    truth = _filled_cache(snapshot, tmp_path / "w", "windows")
    ds = DFlashCacheDataset(tmp_path / "w", process_index=0, process_count=1)
    assert set(ds.item_arrays) == {"features", "token_ids", "labels", "response"}
    ds.validate(block_size=CTX)  # any block that fits a window
    with pytest.raises(CacheMismatchError, match="block_size"):
        ds.validate(block_size=CTX + 1)
    batch = ds.get_batch([0, 3])
    lo, hi = valid_anchor_range(CTX, B)
    assert (lo, hi) == (1, CTX - B + 1)
    anchors = np.array([[lo, hi], [4, 2]])
    tgt = window_block_target_ids(batch["token_ids"], batch["labels"], anchors, B)
    row, n = 1, 4
    assert tgt[row, 0, 0] == truth["token_ids"][3, n]
    np.testing.assert_array_equal(tgt[row, 0, 1:], truth["labels"][3, n : n + B - 1])
    with pytest.raises(ValueError, match="anchors must lie"):
        window_block_target_ids(batch["token_ids"], batch["labels"], np.array([[0], [1]]), B)
