"""Facts shared by every part of the project, each defined once.

* ``target_layer_ids``: which target layers feed the draft's context.
* :func:`make_draft_config`: the ONE place a draft config is made from a target. It returns a
  :class:`~dflash_gptoss.configuration_gptoss_dflash.DFlashDraftConfig` (a ``Qwen3Config`` with
  a ``dflash_config`` section and ``block_size`` / ``num_target_layers`` at the top level, saved
  in the layout of published DFlash drafts), so serving engines that load DFlash drafts read it
  unchanged. How that class is written, and the accessors of its DFlash fields, live in that
  self-contained module because it is copied into every exported draft folder.
* ``GPT_OSS_MASK_TOKEN_ID``: the reserved gpt-oss token the published draft uses
  as MASK.

transformers is imported lazily so ``import dflash_gptoss.draft_config`` stays cheap.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig

GPT_OSS_MASK_TOKEN_ID = 200000
"""A reserved token of the gpt-oss vocabulary (its embedding row exists)."""


def target_layer_ids(num_target_layers: int, num_context_features: int) -> list[int]:
    """Target layers whose outputs form the draft's context, spread over the depth.

    ``round(1 + i*(L-4)/(K-1))`` for ``i = 0..K-1`` (docs/design.md, "How DFlash works"). Index ``l`` is the
    OUTPUT of decoder layer ``l`` (``hidden_states[l+1]`` in transformers' terms).
    Rounding is half-up, not Python's banker's rounding, so the rule gives the same
    ids in every language that reimplements it. For gpt-oss-20b (L=24, K=5) this
    is ``[1, 6, 11, 16, 21]``.
    """
    L, K = int(num_target_layers), int(num_context_features)
    if K < 1:
        raise ValueError(f"num_context_features must be >= 1, got {K}.")
    if L < 4:
        raise ValueError(f"the target needs at least 4 layers for the layer-id rule, got {L}.")
    if K > L - 3:
        raise ValueError(
            f"num_context_features={K} is more than the {L - 3} distinct layers the rule can pick "
            f"from a {L}-layer target (layers 1..{L - 3}); use at most {L - 3}."
        )
    if K == 1:
        return [1]
    return [int(math.floor(1 + i * (L - 4) / (K - 1) + 0.5)) for i in range(K)]


def default_mask_token_id(vocab_size: int, tokenizer_or_dir: Any = None) -> int:
    """The draft's MASK when none is given: gpt-oss's reserved 200000 where the vocabulary has
    it, else the embedded tiny teacher's ``<|mask|>``. A ValueError says to pass one explicitly."""
    if int(vocab_size) > GPT_OSS_MASK_TOKEN_ID:
        return GPT_OSS_MASK_TOKEN_ID
    from dflash_gptoss.tiny_teacher import mask_token_id

    try:
        return mask_token_id(tokenizer_or_dir)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure means: ask the user
        raise ValueError(f"no MASK token found (vocabulary of {vocab_size} has no id {GPT_OSS_MASK_TOKEN_ID} "
                         f"and the tokenizer has no <|mask|>: {exc}); pass --mask-token-id.") from exc


def default_num_context_features(num_target_layers: int) -> int:
    """K when none is given: the published gpt-oss-20b draft's 5, or fewer for a shallow target."""
    return min(5, int(num_target_layers) - 3)


def _draft_config_class() -> type:
    from dflash_gptoss.configuration_gptoss_dflash import DFlashDraftConfig

    return DFlashDraftConfig


def make_draft_config(
    target_config: PretrainedConfig,
    *,
    num_hidden_layers: int,
    block_size: int,
    mask_token_id: int,
    num_context_features: int | None = None,
    layer_ids: list[int] | None = None,
    intermediate_size: int | None = None,
) -> PretrainedConfig:
    """The draft config for a given GPT-OSS target.

    The draft shares the target's hidden size, head layout and RoPE (so its
    positions mean what the target's mean), has no MoE and full attention.
    ``layer_ids`` overrides the rule; otherwise ``num_context_features`` picks them.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2 (an anchor and at least one proposal), got {block_size}.")
    L = int(target_config.num_hidden_layers)
    if layer_ids is None:
        if num_context_features is None:
            raise ValueError("give num_context_features or layer_ids")
        layer_ids = target_layer_ids(L, num_context_features)
    layer_ids = [int(i) for i in layer_ids]
    if any(i < 0 or i >= L for i in layer_ids):
        raise ValueError(f"target_layer_ids {layer_ids} must lie in [0, {L - 1}] for a {L}-layer target.")
    vocab = int(target_config.vocab_size)
    if not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the target vocabulary [0, {vocab}).")
    heads = int(target_config.num_attention_heads)
    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // heads
    rope = dict(getattr(target_config, "rope_parameters", None) or {"rope_type": "default"})
    rope.setdefault("rope_theta", getattr(target_config, "rope_theta", 10000.0))
    return _draft_config_class()(
        architectures=["DFlashDraftModel"],
        vocab_size=vocab,
        hidden_size=int(target_config.hidden_size),
        intermediate_size=int(intermediate_size or target_config.intermediate_size),
        num_hidden_layers=int(num_hidden_layers),
        num_attention_heads=int(target_config.num_attention_heads),
        num_key_value_heads=int(target_config.num_key_value_heads),
        head_dim=int(head_dim),
        hidden_act="silu",
        attention_bias=False,
        rms_norm_eps=float(target_config.rms_norm_eps),
        max_position_embeddings=int(target_config.max_position_embeddings),
        rope_parameters=rope,
        tie_word_embeddings=False,
        use_sliding_window=False,
        layer_types=["full_attention"] * int(num_hidden_layers),
        block_size=int(block_size),
        num_target_layers=L,
        dflash_config={"mask_token_id": int(mask_token_id), "target_layer_ids": layer_ids},
    )

