"""The JAX teacher (easydel GPT-OSS + the corrections) equals transformers' GptOssForCausalLM.

A tiny random GPT-OSS (6 layers, sliding window 32, sinks, YaRN, 4 experts top-2) with its
router scaled so routing weights are far from uniform, float32 on a dp=2 x tp=4 CPU mesh,
T=96 > window. Each easydel correction gets one test: the model built WITHOUT it (stock
easydel for that point) is far from transformers, the model with all of them is not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("easydel")

SEED = 0
ROUTER_SCALE = 30.0
T = 96
BATCH = 4
LAYER_IDS = [1, 3, 5]  # includes the last layer, whose raw output easydel never exposes
ATOL_F32 = 1e-5  # max abs diff of the 2-layer ablation model's features (float32 noise there: 2e-7)
# Float32 parity of the deep model is judged against float64 truth (transformers in float64): the JAX
# float32 forward may be off the truth by at most NOISE_FACTOR times transformers' own float32 error.
# Two float32 implementations summing in different (equally valid) orders -- tp-sharded partial
# sums, fused vs unfused matmuls -- have rounding errors of the same size; the max over ~10^6
# elements is stable, so a factor of 8 leaves room for a different order and still fails on any
# systematic error (each easydel correction moves the outputs by > 1e-3, 100x more; measured on the
# 6-layer model: transformers float32 logits 5.7e-6 off float64, features 1.3e-6). A fixed 1e-5
# sat inside that noise: JAX-vs-transformers float32 logits differed by 1.01e-5 on one CI machine.
NOISE_FACTOR = 8.0
ABLATION_T = 64


def _write_snapshot(path: Path, num_layers: int) -> Path:
    """Seeded random tiny GPT-OSS saved as a HF snapshot, router scaled (peaked routing)."""
    from transformers import GptOssForCausalLM

    from dflash_gptoss.tiny_teacher import tiny_gptoss_config

    torch.manual_seed(SEED)
    model = GptOssForCausalLM(tiny_gptoss_config(num_hidden_layers=num_layers)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.weight.mul_(ROUTER_SCALE)
    model.save_pretrained(path)
    return path


def _input_ids(vocab: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(SEED).integers(0, vocab, (batch, length)).astype(np.int32)


def _torch_reference(snapshot: Path, ids: np.ndarray, layer_ids: list[int], dtype=torch.float32) -> dict:
    """transformers in ``dtype``: raw outputs of ``layer_ids`` (forward hooks), logits, top-k routing weights.

    float64 is the truth the float32 paths are measured against; its experts run the eager loop
    (torch's grouped matmul has no float64 kernel).
    """
    from transformers import GptOssForCausalLM

    extra = {"experts_implementation": "eager"} if dtype == torch.float64 else {}
    model = GptOssForCausalLM.from_pretrained(snapshot, dtype=dtype, **extra).to(dtype).eval()
    outs: dict[int, torch.Tensor] = {}
    routing: list[torch.Tensor] = []
    hooks = [model.model.layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: outs.__setitem__(i, out[0] if isinstance(out, tuple) else out))
        for i in layer_ids]
    hooks += [layer.mlp.router.register_forward_hook(lambda _m, _a, out: routing.append(out[1]))
              for layer in model.model.layers]
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long()).logits
    for h in hooks:
        h.remove()
    feats = np.concatenate([outs[i].numpy() for i in layer_ids], axis=-1)
    return {"features": feats, "logits": logits.numpy(), "routing": [r.numpy() for r in routing]}


def _max_err(x: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(x.astype(np.float64) - truth).max())


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    return _write_snapshot(tmp_path_factory.mktemp("tiny_gptoss") / "snap", 6)


@pytest.fixture(scope="module")
def ids(snapshot) -> np.ndarray:
    from transformers import GptOssConfig

    return _input_ids(GptOssConfig.from_pretrained(snapshot).vocab_size, BATCH, T)


@pytest.fixture(scope="module")
def reference(snapshot, ids) -> dict:
    return _torch_reference(snapshot, ids, LAYER_IDS)


@pytest.fixture(scope="module")
def truth(snapshot, ids) -> dict:
    return _torch_reference(snapshot, ids, LAYER_IDS, dtype=torch.float64)


@pytest.fixture(scope="module")
def teacher(snapshot):
    from dflash_gptoss.teacher_jax import JaxTeacher

    return JaxTeacher(snapshot, LAYER_IDS, dp=2, tp=4, dtype="float32")


def test_routing_far_from_uniform(reference):
    """The router scaling makes routing weights peaked, so a flattened routing shows up."""
    top1 = np.concatenate([np.sort(r, axis=-1)[:, -1] for r in reference["routing"]])
    assert top1.mean() > 0.7, top1.mean()


def test_float32_parity(teacher, reference, truth, ids):
    """JAX float32 (dp=2 x tp=4) is as close to float64 truth as transformers' float32 is."""
    features, labels = teacher.forward(ids)
    logits = teacher.logits(ids)
    assert features.dtype == np.float32 and labels.dtype == np.int32
    assert features.shape == (BATCH, T, len(LAYER_IDS) * teacher.config.hidden_size)
    for name, ours in (("features", features), ("logits", logits)):
        ours_err = _max_err(ours, truth[name])
        torch_err = _max_err(reference[name], truth[name])
        print(f"float32 {name} vs float64 truth: JAX dp=2 tp=4 {ours_err:.2e}, transformers {torch_err:.2e}")
        assert ours_err <= NOISE_FACTOR * torch_err, (name, ours_err, torch_err)
    agree = (labels == reference["logits"].argmax(-1)).mean()
    print(f"argmax agreement with transformers float32 {agree:.4f}")
    assert agree == 1.0
    np.testing.assert_array_equal(labels, logits.argmax(-1))


def test_embed_is_the_snapshot_table(teacher, snapshot):
    """Weights are read exactly (no float16 detour): embedding rows equal the file's."""
    from safetensors import safe_open

    with safe_open(str(snapshot / "model.safetensors"), framework="pt") as f:
        table = f.get_tensor("model.embed_tokens.weight").float().numpy()
    tok = np.array([0, 7, table.shape[0] - 1])
    np.testing.assert_array_equal(teacher.embed(tok), table[tok])


def test_bfloat16_argmax_agreement(snapshot, reference, ids):
    """bf16 teacher vs transformers float32: features close, greedy labels mostly equal."""
    import ml_dtypes

    from dflash_gptoss.teacher_jax import JaxTeacher

    features, labels = JaxTeacher(snapshot, LAYER_IDS, dp=2, tp=4, dtype="bfloat16").forward(ids)
    assert features.dtype == np.dtype(ml_dtypes.bfloat16)
    agree = (labels == reference["logits"].argmax(-1)).mean()
    diff = np.abs(features.astype(np.float32) - reference["features"]).max()
    print(f"bfloat16 vs transformers float32: argmax agreement {agree:.4f}, max|features| diff {diff:.3f}")
    assert agree > 0.9
    assert diff < 0.25


@pytest.mark.parametrize("bad, match", [
    (dict(layer_ids=[6]), "layer_ids"),
    (dict(layer_ids=[-1]), "layer_ids"),
    (dict(tp=3), "divisible by tp=3"),
    (dict(dtype="float16"), "dtype"),
    (dict(dp=2, tp=2), "device count"),
])
def test_clear_errors(snapshot, bad, match):
    from dflash_gptoss.teacher_jax import JaxTeacher

    kwargs = dict(layer_ids=[1], dp=1, tp=1, dtype="float32") | bad
    with pytest.raises(ValueError, match=match):
        JaxTeacher(snapshot, kwargs.pop("layer_ids"), **kwargs)


def test_clear_errors_snapshot(tmp_path):
    from dflash_gptoss.teacher_jax import JaxTeacher

    with pytest.raises(ValueError, match="does not exist"):
        JaxTeacher(tmp_path / "missing", [0])
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type='llama'"):
        JaxTeacher(tmp_path, [0])


def test_batch_not_divisible_by_dp(teacher, ids):
    with pytest.raises(ValueError, match="divisible by dp=2"):
        teacher.forward(ids[:3])


# --------------------------------------------------------------- one test per correction
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    """2-layer snapshot (one sliding, one full) and its transformers reference, for the ablations."""
    from transformers import GptOssConfig

    snap = _write_snapshot(tmp_path_factory.mktemp("tiny_gptoss2") / "snap", 2)
    ids = _input_ids(GptOssConfig.from_pretrained(snap).vocab_size, 2, ABLATION_T)
    return {"snapshot": snap, "ids": ids, "ref": _torch_reference(snap, ids, [0, 1])}


def _max_diff(small: dict, fixes: frozenset[str]) -> float:
    """max |output of layers 0, 1 - transformers| for an easydel model with only ``fixes`` applied."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dflash_gptoss.teacher_easydel_fixes import decoder_forward, load_easydel_gptoss

    model = load_easydel_gptoss(small["snapshot"], dp=2, tp=4, dtype="float32", fixes=fixes)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids):
        outs, _ = decoder_forward(nnx.merge(graphdef, state), ids, (0, 1))
        return jnp.concatenate(outs, axis=-1)

    with model.mesh:
        feats = np.asarray(run(state, jnp.asarray(small["ids"])))
    return float(np.abs(feats - small["ref"]["features"]).max())


@pytest.fixture(scope="module")
def fixed_diff(small) -> float:
    from dflash_gptoss.teacher_easydel_fixes import ALL_FIXES

    return _max_diff(small, ALL_FIXES)


@pytest.mark.parametrize("fix", ["attn_dtype", "moe_dtype", "sliding_window", "rope", "routing"])
def test_each_correction_is_needed(small, fixed_diff, fix):
    """Dropping one correction (stock easydel on that point) moves the layers far from transformers."""
    from dflash_gptoss.teacher_easydel_fixes import ALL_FIXES

    stock_diff = _max_diff(small, ALL_FIXES - {fix})
    print(f"without {fix}: max diff {stock_diff:.2e}; with all corrections: {fixed_diff:.2e}")
    assert fixed_diff < ATOL_F32
    assert stock_diff > 100 * ATOL_F32


def test_easydel_torch_loader_defaults_to_float16(snapshot):
    """Difference 1 (docs/design.md): easydel's torch path ("full" mode, the default) builds the model in float16."""
    from easydel.modules.gpt_oss import GptOssConfig as EdConfig
    from easydel.modules.gpt_oss import GptOssForCausalLM as EdModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    _, _, state = EdModel._load_full_torch_checkpoint(
        pretrained_model_name_or_path=str(snapshot), config_class=EdConfig, hub_kwargs={},
        torch_loader=AutoModelForCausalLM, clear_fn=lambda: None, kwargs={})
    emb = state["model.embed_tokens.weight"]
    with safe_open(str(snapshot / "model.safetensors"), framework="pt") as f:
        exact = f.get_tensor("model.embed_tokens.weight")
    assert emb.dtype == torch.float16
    assert (emb.float() - exact).abs().max() > 1e-6


def test_rope_table_stock_vs_fixed(snapshot):
    """Difference 5 in isolation: stock table is bf16 (and uses the rounded YaRN range); the corrected one is exact."""
    import jax.numpy as jnp
    from easydel.modules.gpt_oss import GptOssConfig as EdConfig

    from dflash_gptoss import teacher_easydel_fixes as fx

    fx.install_patches()
    cfg = EdConfig.from_pretrained(str(snapshot))
    cfg.add_basic_configurations(sharding_axis_dims=(2, 1, 1, 4, 1))
    fx.configure(cfg, {"rope_parameters": {"rope_theta": 10000.0}}, fx.ALL_FIXES)
    ours = np.asarray(cfg.get_basic_frequencies()[...])
    stock = np.asarray(fx._ORIGINALS["get_basic_frequencies"](cfg)[...])
    assert stock.dtype == jnp.bfloat16 and ours.dtype == np.float32
    want = fx._transformers_rope_table(cfg, ours.shape[0])
    np.testing.assert_array_equal(ours, want)
    # the bf16 cast alone is ~4e-3 at |cos| ~ 1; the rounded correction range moves angles further
    stock_diff = np.abs(stock.astype(np.float32) - want).max()
    print(f"RoPE table: stock easydel vs transformers max diff {stock_diff:.2e}; ours exact")
    assert stock_diff > 1e-3


def test_float32_parity_on_the_trained_tiny_teacher(tiny_teacher_dir):
    """The embedded default itself, on held-out stdlib text: features, logits and labels agree."""
    from transformers import AutoTokenizer

    from dflash_gptoss.data_corpus import heldout_prompts
    from dflash_gptoss.draft_config import target_layer_ids
    from dflash_gptoss.teacher_jax import JaxTeacher

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    ids = np.array(heldout_prompts(tokenizer, 2, T, seed=1), dtype=np.int32)
    layer_ids = target_layer_ids(6, 3)
    ref = _torch_reference(tiny_teacher_dir, ids, layer_ids)
    truth = _torch_reference(tiny_teacher_dir, ids, layer_ids, dtype=torch.float64)
    teacher = JaxTeacher(tiny_teacher_dir, layer_ids, dp=2, tp=4, dtype="float32")
    features, labels = teacher.forward(ids)
    top2 = np.sort(ref["logits"], axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-3  # positions without a near-tie
    ours_err, torch_err = _max_err(features, truth["features"]), _max_err(ref["features"], truth["features"])
    print(f"trained tiny teacher, float32 features vs float64: JAX {ours_err:.2e}, transformers {torch_err:.2e}")
    assert ours_err <= NOISE_FACTOR * torch_err
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(labels[clear], ref["logits"].argmax(-1)[clear])
