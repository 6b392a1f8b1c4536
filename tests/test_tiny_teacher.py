"""The embedded tiny teacher: corpus split, tokenizer, snapshot layout and quality.

The snapshot is built once per machine by ``ensure_tiny_teacher()`` (a few
minutes on CPU) and reused by every later run; everything else here is fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dflash_gptoss import data_corpus
from dflash_gptoss.tiny_teacher import (
    EOS_TOKEN,
    MASK_TOKEN,
    REPORT_NAME,
    ensure_tiny_teacher,
    mask_token_id,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def snapshot() -> Path:
    return ensure_tiny_teacher(progress=False)


@pytest.fixture(scope="module")
def tokenizer(snapshot: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(snapshot))


def test_split_is_disjoint_deterministic_and_nonempty() -> None:
    train, heldout = data_corpus.stdlib_files("train"), data_corpus.stdlib_files("heldout")
    assert heldout and len(train) > 5 * len(heldout)
    assert not set(train) & set(heldout)
    assert data_corpus.stdlib_files("heldout") == heldout
    root = data_corpus.stdlib_root()
    rel = [p.relative_to(root).as_posix() for p in heldout]
    assert rel == sorted(rel)
    assert all(data_corpus.is_heldout(r) for r in rel)
    excluded = {"site-packages", "test", "tests", "idlelib"}
    assert not any(excluded & set(Path(r).parts[:-1]) for r in rel)


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        data_corpus.stdlib_files("validation")


def test_tokenizer_round_trips_heldout_text(tokenizer) -> None:
    for text in data_corpus.read_texts("heldout")[:20]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text


def test_special_tokens_exist_and_are_distinct(snapshot: Path, tokenizer) -> None:
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    mask = mask_token_id(tokenizer)
    assert mask == mask_token_id(snapshot) == tokenizer.mask_token_id
    assert eos == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert eos != mask
    assert tokenizer.encode(MASK_TOKEN, add_special_tokens=False) == [mask]


def test_snapshot_loads_with_auto_classes_and_has_gptoss_structure(snapshot: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(snapshot))
    cfg = model.config
    assert cfg.model_type == "gpt_oss"
    assert cfg.num_hidden_layers == 6
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 3
    assert cfg.sliding_window == 32 < 64
    assert cfg.num_local_experts >= 4 and cfg.num_experts_per_tok == 2
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.rope_parameters["rope_type"] == "yarn"
    assert cfg.vocab_size == len(tokenizer)
    assert all(layer.self_attn.sinks.shape == (cfg.num_attention_heads,) for layer in model.model.layers)
    assert next(model.parameters()).dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.do_sample is False


def test_heldout_loss_is_well_below_uniform(snapshot: Path) -> None:
    """A uniform guess over 4096 tokens costs ln(4096) = 8.32 nats; a teacher that
    learned Python must be far below (the build reaches about 3.9)."""
    report = json.loads((snapshot / REPORT_NAME).read_text())
    vocab = report["spec"]["vocab_size"]
    assert report["held_out_loss"] < 0.6 * math.log(vocab)
    assert report["sample_output"]
    for key in ("train_steps", "seconds", "params", "seed", "python_version", "torch_version"):
        assert key in report


def test_heldout_prompts_are_exact_length_and_deterministic(tokenizer) -> None:
    prompts = data_corpus.heldout_prompts(tokenizer, num_prompts=8, prompt_tokens=64, seed=3)
    assert len(prompts) == 8 and all(len(p) == 64 for p in prompts)
    assert prompts == data_corpus.heldout_prompts(tokenizer, num_prompts=8, prompt_tokens=64, seed=3)
    assert prompts != data_corpus.heldout_prompts(tokenizer, num_prompts=8, prompt_tokens=64, seed=4)


def test_token_stream_joins_files_with_eos(tokenizer) -> None:
    stream = data_corpus.token_stream(tokenizer, "heldout")
    assert stream.dtype.name == "int32"
    assert int((stream == tokenizer.eos_token_id).sum()) == len(data_corpus.stdlib_files("heldout"))
    assert stream[-1] == tokenizer.eos_token_id


def test_tokenizer_training_is_deterministic() -> None:
    texts = data_corpus.read_texts("heldout")[:10]
    assert train_tokenizer(512, texts).to_str() == train_tokenizer(512, texts).to_str()
