"""The torch DFlash draft: shapes at gpt-oss-20b size, persistence, cache exactness, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GptOssConfig, Qwen3Config

from dflash_gptoss.decoding import DFlashDrafter
from dflash_gptoss.draft_config import GPT_OSS_MASK_TOKEN_ID, make_draft_config, target_layer_ids
from dflash_gptoss.modeling_gptoss_dflash import DFlashDraftModel, check_draft_matches_target
from dflash_gptoss.teacher_torch import load_target
from dflash_gptoss.tiny_teacher import tiny_gptoss_config


def gpt_oss_20b_config() -> GptOssConfig:
    """openai/gpt-oss-20b's published architecture (no weights needed)."""
    return GptOssConfig(
        num_hidden_layers=24, hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, vocab_size=201088, num_local_experts=32, num_experts_per_tok=4,
        sliding_window=128, max_position_embeddings=131072,
    )


def test_layer_id_rule():
    assert target_layer_ids(24, 5) == [1, 6, 11, 16, 21]  # gpt-oss-20b's published draft
    assert target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert target_layer_ids(6, 3) == [1, 2, 3]
    with pytest.raises(ValueError, match="num_context_features=4"):
        target_layer_ids(6, 4)


def test_draft_at_gpt_oss_20b_shapes(tmp_path):
    config = make_draft_config(gpt_oss_20b_config(), num_hidden_layers=8, block_size=8,
                               mask_token_id=GPT_OSS_MASK_TOKEN_ID, num_context_features=5, intermediate_size=7680)
    with torch.device("meta"):
        draft = DFlashDraftModel(config)
    # per layer: q 2880*4096 + k,v 2*2880*512 + o 4096*2880 + q/k norms 2*64 + layer norms 2*2880
    #            + SiLU MLP 3*2880*7680 = 92,903,168; 8 layers; fc 5*2880*2880; hidden_norm + norm 2*2880.
    assert sum(p.numel() for p in draft.parameters()) == 8 * 92_903_168 + 5 * 2880 * 2880 + 2 * 2880 == 784_703_104
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["dflash_config"] == {"mask_token_id": 200000, "target_layer_ids": [1, 6, 11, 16, 21]}
    assert saved["block_size"] == 8 and saved["num_target_layers"] == 24
    assert saved["hidden_act"] == "silu" and saved["attention_bias"] is False


@pytest.fixture(scope="module")
def tiny_draft():
    torch.manual_seed(0)
    config = make_draft_config(tiny_gptoss_config(), num_hidden_layers=2, block_size=8, mask_token_id=3,
                               num_context_features=3)
    return DFlashDraftModel(config).eval()


def test_save_load_round_trip(tmp_path, tiny_draft):
    tiny_draft.save_pretrained(tmp_path)
    loaded = DFlashDraftModel.from_pretrained(tmp_path).eval()
    for name, tensor in tiny_draft.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.target_layer_ids == tiny_draft.target_layer_ids and loaded.block_size == 8
    hidden = tiny_draft.config.hidden_size
    x = torch.randn(1, 8, hidden)
    feats = torch.randn(1, 5, 3 * hidden)
    pos = torch.arange(13)[None]
    assert torch.equal(tiny_draft(x, feats, pos), loaded(x, feats, pos))


def test_wrong_shape_checkpoint_is_refused(tmp_path, tiny_draft):
    tiny_draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight.*another draft shape"):
        DFlashDraftModel.from_pretrained(tmp_path)


def test_missing_or_unexpected_tensors_are_refused_not_reinitialised(tmp_path, tiny_draft):
    """transformers only warns about these (and would re-initialise the weight); the draft loader refuses."""
    from safetensors.torch import load_file, save_file

    tiny_draft.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "norm.weight"}, str(weights))
    with pytest.raises(ValueError, match=r"do not match the draft config: missing \['norm.weight'\]"):
        DFlashDraftModel.from_pretrained(tmp_path)
    save_file({**state, "lm_head.weight": torch.zeros(3, 3)}, str(weights))
    with pytest.raises(ValueError, match=r"unexpected \['lm_head.weight'\]"):
        DFlashDraftModel.from_pretrained(tmp_path)
    save_file({f"model.{k}": v for k, v in state.items()}, str(weights))  # SGLang's accepted prefixed form
    loaded = DFlashDraftModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())


def test_a_config_without_dflash_fields_is_not_a_draft(tmp_path, tiny_draft):
    tiny_draft.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["dflash_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="is not a DFlash draft config"):
        DFlashDraftModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a DFlash draft config"):
        DFlashDraftModel(Qwen3Config(hidden_size=96, num_attention_heads=4, head_dim=24))


def test_draft_for_another_target_is_refused(tiny_draft):
    hidden = tiny_draft.config.hidden_size
    other = tiny_gptoss_config(hidden_size=2 * hidden)
    with pytest.raises(ValueError, match=f"hidden_size={hidden} does not match the target's {2 * hidden}"):
        check_draft_matches_target(tiny_draft.config, other)


def test_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        DFlashDraftModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not GPT-OSS"):
        load_target(tmp_path)


def test_block_size_below_two_is_refused():
    with pytest.raises(ValueError, match="block_size must be >= 2"):
        make_draft_config(tiny_gptoss_config(), num_hidden_layers=1, block_size=1, mask_token_id=3,
                          num_context_features=3)


def test_incremental_draft_cache_equals_full_recompute(tiny_teacher_dir):
    """Feeding the context in accepted pieces through the draft's K/V cache == one forward over all of it."""
    torch.manual_seed(0)
    target = load_target(tiny_teacher_dir)
    config = make_draft_config(target.config, num_hidden_layers=2, block_size=8, mask_token_id=3,
                               num_context_features=3)
    draft = DFlashDraftModel(config).eval()
    hidden = target.config.hidden_size
    features = torch.randn(1, 30, 3 * hidden)
    drafter = DFlashDrafter(draft, target)
    drafter.begin(features[:, :20])
    drafter.propose(anchor=5, position=20, num=7)
    for start, stop in [(20, 23), (23, 24), (24, 30)]:
        drafter.accept(features[:, start:stop])
        incremental = drafter.propose(anchor=7, position=stop, num=7)
    with torch.inference_mode():
        block = torch.tensor([[7] + [3] * 7])
        full = draft(target.get_input_embeddings()(block), features, torch.arange(38)[None])
        expected = target.lm_head(full[:, 1:]).argmax(-1)[0].tolist()
    assert incremental == expected
    assert drafter.cache.get_seq_length() == 30


def test_default_mask_token_rule(tiny_teacher_dir, tmp_path):
    from dflash_gptoss.draft_config import default_mask_token_id

    assert default_mask_token_id(201088) == GPT_OSS_MASK_TOKEN_ID  # gpt-oss: the reserved id, no tokenizer needed
    assert default_mask_token_id(4096, tiny_teacher_dir) == 1  # the tiny teacher's <|mask|>
    with pytest.raises(ValueError, match="pass --mask-token-id"):
        default_mask_token_id(4096, tmp_path)
