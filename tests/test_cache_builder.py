"""The cache builder on a real 2x4 (dp x tp) CPU mesh, checked against transformers.

The teacher here is a seeded random-init GPT-OSS (the tiny teacher's architecture with
4 kv heads so tp=4 divides them; initializer_range 0.2 so logits have real gaps),
saved as an ordinary snapshot. Every stored value is compared with a direct
transformers ``GptOssForCausalLM`` float32 forward over the same window:

* features are stored as bf16, so each is compared with the torch value within
  ``2**-7 * |ref| + 2e-5 * max|ref of its position|``: one bf16 ulp (half an ulp of
  storage rounding, plus a possible flip of a value on a rounding boundary) plus the
  JAX/torch float32 disagreement, measured at ~1e-5 of the position's largest
  feature (5e-4 absolute on features up to ~70). In addition >= 99% of them must be
  bit-identical to the bf16-rounded torch value;
* labels must equal torch's argmax exactly wherever torch's top-2 logit gap exceeds
  1e-3 (near-ties are counted and must be rare);
* anchor embeddings must be bit-identical to bf16(torch embedding row).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dflash_gptoss.bf16 import from_bf16_bits, to_bf16_bits
from dflash_gptoss.cache_builder import CacheBuildError, build_teacher_cache, plan_teacher_cache, prepare_out_dir
from dflash_gptoss.cache_format import META_FILE, PROGRESS_FILE, CacheFormatError, read_json, read_progress
from dflash_gptoss.draft_config import target_layer_ids
from dflash_gptoss.easydel_dflash_cache import DFlashCacheDataset, window_block_target_ids
from dflash_gptoss.tiny_teacher import tiny_gptoss_config

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "scripts" / "tpu_dflash_build_teacher_cache.py"
VOCAB, K, CTX, B, BATCH, DP, TP = 512, 3, 16, 4, 4, 2, 4
FEATURE_RTOL, FEATURE_F32_REL, LABEL_TIE_GAP = 2.0**-7, 2e-5, 1e-3


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GptOssForCausalLM

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    cfg = tiny_gptoss_config(vocab_size=VOCAB, initializer_range=0.2, num_key_value_heads=4, eos_token_id=0)
    GptOssForCausalLM(cfg).float().eval().save_pretrained(root)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(12):
            ids = rng.integers(1, VOCAB, size=int(rng.integers(20, 120))).tolist()
            # a prompt (context only, never an anchor or a label) on each document's first tokens
            f.write(json.dumps({"input_ids": ids, "prompt_len": int(rng.integers(0, len(ids) // 2))}) + "\n")
    return root


@pytest.fixture(scope="module")
def data(snapshot: Path) -> Path:
    return snapshot / "data.jsonl"


@pytest.fixture(scope="module")
def teacher(snapshot: Path):
    from dflash_gptoss.teacher_jax import JaxTeacher

    return JaxTeacher(snapshot, target_layer_ids(6, K), dp=DP, tp=TP)


@pytest.fixture(scope="module")
def torch_model(snapshot: Path):
    import torch
    from transformers import GptOssForCausalLM

    return GptOssForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()


def _torch_reference(model, tokens: np.ndarray, offsets: np.ndarray, wlen: int, layer_ids: list[int]):
    """(features [n, wlen, K*H], logits [n, wlen, V], embeddings table) from transformers."""
    import torch

    ids = tokens[offsets[:, None] + np.arange(wlen)[None, :]]
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    feats = torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1).numpy()
    table = model.get_input_embeddings().weight.detach().numpy()
    return ids, feats, out.logits.float().numpy(), table


def _check_features(stored_bits: np.ndarray, ref: np.ndarray) -> None:
    got = from_bf16_bits(stored_bits)
    tol = FEATURE_RTOL * np.abs(ref) + FEATURE_F32_REL * np.abs(ref).max(-1, keepdims=True)
    bad = np.abs(got - ref) > tol
    assert not bad.any(), f"{bad.sum()} features off: max excess {(np.abs(got - ref) - tol).max()}"
    assert (stored_bits == to_bf16_bits(ref)).mean() >= 0.99


def _check_labels(stored: np.ndarray, logits: np.ndarray) -> int:
    """Exact argmax where torch's top-2 gap is clear; returns the number of near-ties."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > LABEL_TIE_GAP
    np.testing.assert_array_equal(stored[clear], logits.argmax(-1)[clear])
    return int((~clear).sum())


def _tokens(snapshot: Path, data: Path) -> np.ndarray:
    return _stream(snapshot, data)[0]


def _stream(snapshot: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, response flags) of the data, as the builder joins them."""
    from dflash_gptoss.cache_builder import load_token_stream

    return load_token_stream(data, snapshot, json.loads((snapshot / "config.json").read_text()))


def _build(snapshot: Path, data: Path, teacher, out: Path, n: int, seed: int, **overrides):
    """The test suite's standard small build (dp x tp mesh, fixed shapes), in-process."""
    settings = dict(ctx_len=CTX, block_size=B, num_context_features=K, num_blocks=n, batch_size=BATCH, data=data,
                    dp=DP, tp=TP, seed=seed)
    settings.update(overrides)
    return build_teacher_cache(snapshot, out, teacher=teacher, progress=False, **settings)


def test_blocks_cache_equals_transformers(snapshot, data, teacher, torch_model, tmp_path: Path) -> None:
    n = 10  # not a multiple of BATCH: the last chunk is padded
    res = _build(snapshot, data, teacher, tmp_path / "c", n, seed=7)
    assert res.meta["complete"] and res.windows_written == n
    ds = DFlashCacheDataset(tmp_path / "c", bf16_as_bits=True, process_index=0, process_count=1)
    ds.validate(
        teacher_config=torch_model.config, num_context_features=K, block_size=B, target_layer_ids=target_layer_ids(6, K)
    )
    offsets = np.load(tmp_path / "c" / "window_offsets.npy")
    ids, feats, logits, table = _torch_reference(
        torch_model, _tokens(snapshot, data), offsets, CTX + B - 1, target_layer_ids(6, K)
    )
    got = ds.get_batch(np.arange(n))
    _check_features(got["context_features"], feats[:, :CTX])
    np.testing.assert_array_equal(got["target_ids"][:, 0], ids[:, CTX])
    ties = _check_labels(got["target_ids"][:, 1:], logits[:, CTX : CTX + B - 1])
    assert ties <= 1
    np.testing.assert_array_equal(got["anchor_embedding"], to_bf16_bits(table[ids[:, CTX]]))
    # every block (anchor and labelled positions) lies in response text, never in a prompt
    response = _stream(snapshot, data)[1]
    assert (response == 0).sum() > 100
    assert all(response[o + CTX : o + CTX + B - 1].all() for o in offsets)


def test_windows_cache_equals_transformers(snapshot, data, teacher, torch_model, tmp_path: Path) -> None:
    n = 8
    _build(snapshot, data, teacher, tmp_path / "w", n, seed=7, ctx_len=CTX + B - 1, layout="windows")
    ds = DFlashCacheDataset(tmp_path / "w", bf16_as_bits=True, process_index=0, process_count=1)
    offsets = np.load(tmp_path / "w" / "window_offsets.npy")
    ids, feats, logits, _ = _torch_reference(
        torch_model, _tokens(snapshot, data), offsets, CTX + B - 1, target_layer_ids(6, K)
    )
    got = ds.get_batch(np.arange(n))
    _check_features(got["features"], feats)
    np.testing.assert_array_equal(got["token_ids"], ids)
    response = _stream(snapshot, data)[1][offsets[:, None] + np.arange(CTX + B - 1)]
    assert 0 < response.sum() < response.size  # both prompt and response positions are stored
    np.testing.assert_array_equal(got["response"], response)
    assert _check_labels(got["labels"], logits) <= 2
    # an anchor at the window's end gives exactly what the blocks layout stores there
    tgt = window_block_target_ids(got["token_ids"], got["labels"], np.full((n, 1), CTX), B)[:, 0]
    np.testing.assert_array_equal(tgt[:, 0], ids[:, CTX])
    np.testing.assert_array_equal(tgt[:, 1:], got["labels"][:, CTX : CTX + B - 1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(CLI), *args]


def _cli_args(snapshot: Path, data: Path, out: Path, n: int) -> list[str]:
    return [
        "--model-snapshot-dir",
        str(snapshot),
        "--data",
        str(data),
        "--ctx-len",
        str(CTX),
        "--block-size",
        str(B),
        "--num-context-features",
        str(K),
        "--num-blocks",
        str(n),
        "--batch-size",
        str(BATCH),
        "--dp",
        str(DP),
        "--tp",
        str(TP),
        "--seed",
        "3",
        "--out-dir",
        str(out),
        "--no-progress",
    ]


def _array_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.npy"))}


@pytest.mark.slow  # a real builder process, killed and resumed (~50 s)
def test_sigkill_then_resume_is_byte_identical(snapshot, data, teacher, tmp_path: Path) -> None:
    n, out = 120, tmp_path / "killed"  # 30 chunks of ~50 ms after compile: room to kill mid-build
    proc = subprocess.Popen(
        _cli(*_cli_args(snapshot, data, out, n)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ)
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / PROGRESS_FILE).is_file() and read_progress(out) >= 2 * BATCH:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the build ended before it could be killed:\n" + proc.stdout.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = read_progress(out)
    assert 2 * BATCH <= done < n and not read_json(out / META_FILE)["complete"]
    with pytest.raises(CacheFormatError, match="INCOMPLETE"):
        DFlashCacheDataset(out, process_index=0, process_count=1)
    # without --resume the interrupted build is refused, with a hint
    r = subprocess.run(_cli(*_cli_args(snapshot, data, out, n)), capture_output=True, text=True)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(_cli(*_cli_args(snapshot, data, out, n), "--resume"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert read_json(out / META_FILE)["complete"]
    ref = tmp_path / "ref"
    _build(snapshot, data, teacher, ref, n, seed=3)
    resumed, uninterrupted = _array_files(out), _array_files(ref)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 4
    for name in resumed:
        assert resumed[name] == uninterrupted[name], name
    DFlashCacheDataset(out, process_index=0, process_count=1)  # complete now


# ----------------------------------------------------------------------------- bad input
def _main(*args: str) -> int:
    sys.path.insert(0, str(CLI.parent))
    try:
        import tpu_dflash_build_teacher_cache as cli
    finally:
        sys.path.pop(0)
    return cli.main(list(args))


def _base(snapshot: Path, data: Path, out: Path, **over: str) -> list[str]:
    flags = {
        "--model-snapshot-dir": str(snapshot),
        "--data": str(data),
        "--ctx-len": str(CTX),
        "--block-size": str(B),
        "--num-context-features": str(K),
        "--num-blocks": "8",
        "--batch-size": str(BATCH),
        "--dp": str(DP),
        "--tp": str(TP),
        "--out-dir": str(out),
    }
    flags.update({f"--{k.replace('_', '-')}": v for k, v in over.items()})
    return [x for kv in flags.items() for x in kv] + ["--no-progress"]


@pytest.fixture
def llama_snapshot(tmp_path: Path) -> Path:
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 100, "num_hidden_layers": 4})
    )
    return d


@pytest.mark.parametrize(
    "over, message",
    [
        (dict(model_snapshot_dir="/nonexistent/snapshot"), "does not exist"),
        (dict(num_context_features="4"), "num-context-features 4: .*at most 3"),
        (dict(num_context_features="7"), "num-context-features 7: .*6-layer target"),
        (dict(ctx_len="4096"), "max_position_embeddings=2048"),
        (dict(ctx_len="1500"), "fewer than one window of 1503"),
        (dict(batch_size="3"), "--batch-size 3 is not divisible by --dp 2"),
        (dict(assume_free_bytes="1000"), r"the cache needs .* has only .*\(1000 bytes\) free"),
        (dict(block_size="1"), "block_size must be >= 2"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(snapshot, data, tmp_path, capsys, over, message) -> None:
    assert _main(*_base(snapshot, data, tmp_path / "out", **over)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    import re

    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()


def test_non_gptoss_snapshot_is_refused(llama_snapshot, data, tmp_path, capsys) -> None:
    assert _main(*_base(llama_snapshot, data, tmp_path / "out")) == 2
    assert "model_type='llama'" in capsys.readouterr().err


def test_out_dir_with_a_different_cache_needs_overwrite(snapshot, data, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    settings = dict(
        ctx_len=CTX, block_size=B, num_context_features=K, num_blocks=8, batch_size=BATCH, data=data, dp=DP, tp=TP
    )
    prepare_out_dir(plan_teacher_cache(snapshot, out, **settings))  # an (interrupted) cache, no teacher run
    assert _main(*_base(snapshot, data, out, ctx_len="12")) == 2
    err = capsys.readouterr().err
    assert "DIFFERENT cache" in err and "ctx_len: 16 != 12" in err and "--overwrite" in err
    assert _main(*_base(snapshot, data, out, ctx_len="12"), "--resume") == 2
    assert "--resume needs the same settings" in capsys.readouterr().err
    plan = plan_teacher_cache(snapshot, out, **dict(settings, ctx_len=12), overwrite=True)
    assert plan.start_window == 0 and {p.name for p in plan.stale_files} >= {META_FILE, "target_ids.npy"}
    with pytest.raises(CacheBuildError, match="contradict"):
        plan_teacher_cache(snapshot, out, **settings, overwrite=True, resume=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(CacheBuildError, match="holds no teacher cache"):
        plan_teacher_cache(snapshot, tmp_path / "junk", **settings)


# ----------------------------------------------------------------------------- data sources
def test_default_data_is_the_corpus_and_text_lines_are_tokenized(tmp_path: Path) -> None:
    """Planning only (no JAX): the default data is the tiny teacher's train corpus; text JSONL
    goes through the snapshot's tokenizer.json; documents are joined with EOS."""
    from transformers import AutoTokenizer

    from dflash_gptoss import data_corpus
    from dflash_gptoss.tiny_teacher import ensure_tiny_teacher

    snap = ensure_tiny_teacher(progress=False)
    tok = AutoTokenizer.from_pretrained(str(snap))
    settings = dict(ctx_len=32, block_size=8, num_context_features=2, num_blocks=4, batch_size=2)
    plan = plan_teacher_cache(snap, tmp_path / "c", **settings)
    np.testing.assert_array_equal(plan.tokens, data_corpus.token_stream(tok, "train"))
    assert plan.meta["data"]["source"] == "corpus:train"
    texts = ["def f(x):\n    return x + 1\n", "import os\n" * 20]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    plan = plan_teacher_cache(snap, tmp_path / "c", data=data, **settings)
    eos = [tok.eos_token_id]
    want = [i for t in texts for i in tok.encode(t, add_special_tokens=False) + eos]
    np.testing.assert_array_equal(plan.tokens, want)
