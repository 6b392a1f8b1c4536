"""The JAX (nnx / EasyDeL) draft equals the torch draft, is really sharded, and exports exactly.

Parity is checked against the torch draft loaded from the EXPORTED folder (so the export's
names, transposes and config are covered too), float32, ``atol = rtol = 1e-5``:

* nb=1 is the inference case: the whole context precedes the anchor;
* nb=3 blocks with different anchors in one window, each compared with its own torch forward
  that is given only the context before its anchor: any leakage across blocks or past the
  anchor would show. A negative control shows the check is sensitive to exactly that.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors import safe_open

from dflash_gptoss.draft_config import make_draft_config
from dflash_gptoss.easydel_dflash_draft_model import (
    COLUMN,
    ROW,
    DFlashDraftNNX,
    create_draft_model,
    load_draft_state,
    param_arrays,
    param_variables,
)
from dflash_gptoss.export_draft import export_nnx_draft, load_nnx_draft_from_torch_folder
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel
from dflash_gptoss.tiny_teacher import tiny_gptoss_config

ATOL = RTOL = 1e-5
BLOCK = 8
HIDDEN = 96


@pytest.fixture(scope="module")
def draft_config():
    return make_draft_config(tiny_gptoss_config(), num_hidden_layers=2, block_size=BLOCK, mask_token_id=1,
                             num_context_features=3)


def _randomize_norms(model: DFlashDraftNNX, seed: int) -> None:
    """Non-trivial norm weights, so a swapped or dropped norm cannot hide behind all-ones."""
    rng = np.random.default_rng(seed)
    for path, var in param_variables(model):
        if path[-1] == "weight":
            old = var[...]
            new = 1.0 + 0.2 * rng.standard_normal(old.shape).astype(np.float32)
            var[...] = jax.device_put(jnp.asarray(new), old.sharding)


@pytest.fixture(scope="module")
def nnx_draft(draft_config) -> DFlashDraftNNX:
    model = create_draft_model(draft_config, dp=2, tp=4, seed=3)
    _randomize_norms(model, seed=4)
    assert not np.allclose(np.asarray(model.norm.weight[...]), 1.0)  # the assignment reached the model
    return model


@pytest.fixture(scope="module")
def exported(nnx_draft, draft_config, tmp_path_factory) -> Path:
    return export_nnx_draft(nnx_draft, draft_config, tmp_path_factory.mktemp("nnx_draft_export"))


@pytest.fixture(scope="module")
def torch_draft(exported) -> DFlashDraftModel:
    return DFlashDraftModel.from_pretrained(exported).eval()


def _run_nnx(model: DFlashDraftNNX, ctx, ctx_pos, blocks, blk_pos, anchors) -> np.ndarray:
    """The jitted nnx forward on the model's 2x4 mesh (tp-sharded weights, as in training)."""
    with model.mesh:
        out = nnx.jit(lambda m, *a: m(*a))(model, *(jnp.asarray(a) for a in (ctx, ctx_pos, blocks, blk_pos, anchors)))
    return np.asarray(out)


def _run_torch(model: DFlashDraftModel, ctx: np.ndarray, ctx_pos: np.ndarray, block: np.ndarray,
               blk_pos: np.ndarray) -> np.ndarray:
    """One torch inference forward for one row: ``ctx`` [c, K*H] before the anchor, ``block`` [B, H]."""
    positions = np.concatenate([ctx_pos, blk_pos])[None].astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(block[None]), torch.from_numpy(ctx[None]), torch.from_numpy(positions))
    return out[0].numpy()


def _inputs(rng: np.random.Generator, b: int, c: int, anchors: np.ndarray, offset: int):
    """Random features/embeddings; context at ``offset + arange(c)``; block j at anchor_j + arange(B)."""
    ctx = rng.standard_normal((b, c, 3 * HIDDEN)).astype(np.float32)
    ctx_pos = np.tile(offset + np.arange(c, dtype=np.int32), (b, 1))
    nb = anchors.shape[1]
    blocks = rng.standard_normal((b, nb, BLOCK, HIDDEN)).astype(np.float32)
    anchor_pos = (offset + anchors).astype(np.int32)
    blk_pos = (anchor_pos[:, :, None] + np.arange(BLOCK, dtype=np.int32)).astype(np.int32)
    return ctx, ctx_pos, blocks, blk_pos, anchor_pos


def test_single_block_matches_torch(nnx_draft, torch_draft):
    """nb=1, the inference case: every context position precedes the anchor."""
    rng = np.random.default_rng(0)
    c = 13
    ctx, ctx_pos, blocks, blk_pos, anchors = _inputs(rng, 2, c, np.full((2, 1), c), offset=300)
    got = _run_nnx(nnx_draft, ctx, ctx_pos, blocks, blk_pos, anchors)
    assert got.shape == (2, 1, BLOCK, HIDDEN)
    with torch.no_grad():
        want = torch_draft(torch.from_numpy(blocks[:, 0]), torch.from_numpy(ctx),
                           torch.from_numpy(np.concatenate([ctx_pos, blk_pos[:, 0]], axis=1).astype(np.int64)))
    np.testing.assert_allclose(got[:, 0], want.numpy(), atol=ATOL, rtol=RTOL)
    print(f"max |nnx - torch|, nb=1: {np.abs(got[:, 0] - want.numpy()).max():.2e}")


def test_many_blocks_match_separate_torch_forwards(nnx_draft, torch_draft):
    """nb=3 blocks per row with different anchors (incl. 0 and the window end) = 6 torch forwards."""
    rng = np.random.default_rng(1)
    c = 24
    anchors = np.array([[5, 12, 20], [0, 9, 24]])
    ctx, ctx_pos, blocks, blk_pos, anchor_pos = _inputs(rng, 2, c, anchors, offset=0)
    got = _run_nnx(nnx_draft, ctx, ctx_pos, blocks, blk_pos, anchor_pos)
    worst = 0.0
    for i in range(2):
        for j in range(3):
            n = anchors[i, j]
            want = _run_torch(torch_draft, ctx[i, :n], ctx_pos[i, :n], blocks[i, j], blk_pos[i, j])
            np.testing.assert_allclose(got[i, j], want, atol=ATOL, rtol=RTOL)
            worst = max(worst, float(np.abs(got[i, j] - want).max()))
            if n < c:  # negative control: the same block given the context past its anchor differs
                leaked = _run_torch(torch_draft, ctx[i], ctx_pos[i], blocks[i, j], blk_pos[i, j])
                assert np.abs(leaked - want).max() > 1e-3
    print(f"max |nnx - torch| over 6 blocks: {worst:.2e}")


def _axes(spec: PartitionSpec, ndim: int) -> tuple:
    """A spec padded to ``ndim`` entries (jax drops trailing ``None``s: P('tp', None) == P('tp'))."""
    return (*spec, *[None] * (ndim - len(spec)))


def _expected_spec(path: tuple[str, ...]) -> PartitionSpec:
    name = "/".join(path)
    if path[-1] == "weight":
        return PartitionSpec()
    if any(p in name for p in ("o_proj", "down_proj")):
        return ROW
    return COLUMN


def test_parameters_are_sharded_by_the_rules(nnx_draft):
    """On dp=2 x tp=4 every kernel is split 4 ways over tp; norms are replicated on the mesh."""
    assert nnx_draft.config.get_partition_rules() is not None  # easydel's __init_subclass__ would null it
    mesh = nnx_draft.mesh
    assert dict(mesh.shape)["dp"] == 2 and dict(mesh.shape)["tp"] == 4
    arrays = param_arrays(nnx_draft)
    assert len(arrays) == 2 + 2 * 11 + 1
    for path, array in arrays.items():
        spec = _expected_spec(path)
        assert array.sharding.mesh == mesh, path
        axes = _axes(spec, array.ndim)
        assert _axes(array.sharding.spec, array.ndim) == axes, (path, array.sharding.spec)
        shard = array.addressable_shards[0].data.shape
        split = [4 if axis == "tp" else 1 for axis in axes]
        assert shard == tuple(s // k for s, k in zip(array.shape, split, strict=True)), (path, shard)


def _assert_same_sharded_params(expected, got) -> None:
    """Same parameter paths, bit-identical values, same partition specs."""
    before, after = param_arrays(expected), param_arrays(got)
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]), err_msg=str(path))
        ndim = before[path].ndim
        assert _axes(after[path].sharding.spec, ndim) == _axes(before[path].sharding.spec, ndim), path


def test_export_round_trip_is_exact(nnx_draft, exported):
    loaded = load_nnx_draft_from_torch_folder(exported, dp=2, tp=4)
    _assert_same_sharded_params(nnx_draft, loaded)


def test_bf16_export_loads_in_torch(nnx_draft, draft_config, tmp_path):
    """A bf16 export is stored as bf16, loads in torch, and is the bf16 rounding of the weights."""
    out = export_nnx_draft(nnx_draft, draft_config, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        q = f.get_tensor("layers.1.self_attn.q_proj.weight")
    assert q.dtype == torch.bfloat16
    want = torch.from_numpy(np.array(param_arrays(nnx_draft)[("layers", "1", "self_attn", "q_proj", "kernel")]).T)
    assert torch.equal(q, want.to(torch.bfloat16))
    loaded = DFlashDraftModel.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(loaded.state_dict()["layers.1.self_attn.q_proj.weight"], q)


def test_easydel_checkpoint_round_trip(nnx_draft, tmp_path):
    """The Trainer's checkpoint path: to_state -> save_state -> load_state gives the same sharded draft."""
    nnx_draft.to_state().save_state(str(tmp_path / "run-0"))
    loaded = load_draft_state(tmp_path / "run-0", dp=2, tp=4).model
    assert isinstance(loaded, DFlashDraftNNX)
    assert loaded.rope_inv_freq == nnx_draft.rope_inv_freq and loaded.block_size == BLOCK
    _assert_same_sharded_params(nnx_draft, loaded)
    assert nnx_draft.flops_per_token(sequence_length=64) > 1  # easydel returns 1 when its estimate fails


def test_gradients_reach_every_parameter(nnx_draft):
    """Training differentiates through the masked attention: finite, non-zero grads for all params."""
    rng = np.random.default_rng(2)
    ctx, ctx_pos, blocks, blk_pos, anchors = _inputs(rng, 2, 16, np.array([[0, 7], [4, 16]]), offset=0)
    graphdef, params, rest = nnx.split(nnx_draft, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(*(jnp.asarray(a) for a in (ctx, ctx_pos, blocks, blk_pos, anchors)))
        return jnp.mean(out[:, :, 1:] ** 3)

    with nnx_draft.mesh:
        grads = jax.jit(jax.grad(loss))(params)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g[...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, path
