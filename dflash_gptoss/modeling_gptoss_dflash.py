"""The DFlash draft for GPT-OSS in PyTorch (docs/design.md, "How DFlash works").

The draft drafts a whole block at once:

* context: the outputs of K target layers, concatenated (K*H), projected by
  ``fc`` (no bias) and RMS-normed by ``hidden_norm``;
* block: ``[x_n, MASK, ..., MASK]`` at positions ``n..n+B-1``, embedded with the
  TARGET's frozen embedding table (passed in; not a draft parameter);
* attention in every layer: queries from the block, keys/values from
  ``[context || block]`` through the same projections, RoPE at absolute
  positions, non-causal (every block slot sees every context position < n and
  every block slot);
* output: final RMSNorm, then the TARGET's frozen lm_head. Slot k proposes the
  token AT position n+k (no causal shift).

Parameter names and ``config.json`` follow the published DFlash drafts (a
Qwen3-style layer: q/k RMSNorm, SiLU MLP without bias, q/k/v/o biases only when
``attention_bias`` is set, as in one published gpt-oss draft), so serving engines
that load DFlash drafts can load an exported draft.

Why a transformers ``PreTrainedModel``: ``save_pretrained``, ``from_pretrained`` and
``push_to_hub`` are transformers', and the class registers itself for ``AutoModel`` /
``AutoConfig``, so every folder it saves carries ``auto_map`` and this file (plus the
configuration file). That is why this module imports only torch and transformers (and its
sibling configuration file, relatively): it must run inside a folder loaded with
``AutoModel.from_pretrained(folder, trust_remote_code=True)`` where dflash_gptoss is absent.
``from_pretrained`` is strict: a missing file, a tensor of another shape, a missing or an
unexpected tensor is an error naming it, never a silently re-initialised weight.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from .configuration_gptoss_dflash import (
    DFlashDraftConfig,
    draft_block_size,
    draft_mask_token_id,
    draft_target_layer_ids,
    is_draft_config_dict,
)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for ``x`` [b, heads, T, d] with ``cos``/``sin`` [b, T, d] of the same positions."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DFlashAttention(nn.Module):
    """Block queries attend, non-causally, to ``[context || block]`` keys and values."""

    def __init__(self, config: DFlashDraftConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = bool(config.attention_bias)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], n, self.head_dim)

    def forward(
        self,
        block: torch.Tensor,
        context: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        bsz, q_len, _ = block.shape
        kv_in = torch.cat([context, block], dim=1)
        q = self.q_norm(self._heads(self.q_proj(block), self.num_heads)).transpose(1, 2)
        k = self.k_norm(self._heads(self.k_proj(kv_in), self.num_kv_heads)).transpose(1, 2)
        v = self._heads(self.v_proj(kv_in), self.num_kv_heads).transpose(1, 2)
        q = apply_rope(q, cos[:, -q_len:], sin[:, -q_len:])
        k = apply_rope(k, cos, sin)
        if cache is not None:  # prepend the cached context K/V of earlier steps
            k, v = cache.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashDraftConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, context, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), context, cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(PreTrainedModel):
    """The draft's own parameters: ``fc``, ``hidden_norm``, the layers and ``norm``.

    The target's embedding and lm_head are arguments of the forward / logits
    calls, never parameters here: they stay frozen and are not saved twice.
    """

    config_class = DFlashDraftConfig
    base_model_prefix = "model"  # names carry no prefix; a checkpoint with "model." (SGLang's form) loads too
    _no_split_modules = ["DFlashDecoderLayer"]

    def __init__(self, config: DFlashDraftConfig):
        if not isinstance(config, DFlashDraftConfig):  # e.g. a plain Qwen3Config: keep what it says, write this class's
            config = DFlashDraftConfig.from_dict(config.to_dict())
        if not is_draft_config_dict(config.to_dict()):
            raise ValueError("this config is not a DFlash draft config (it needs block_size and a dflash_config "
                             "with mask_token_id and target_layer_ids); build it with make_draft_config.")
        super().__init__(config)
        self.block_size = draft_block_size(config)
        self.mask_token_id = draft_mask_token_id(config)
        self.target_layer_ids = draft_target_layer_ids(config)
        hidden = config.hidden_size
        self.fc = nn.Linear(len(self.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        block_embeddings: torch.Tensor,
        target_features: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Normed hidden states of the block slots, [b, B, H].

        ``target_features`` [b, c, K*H] are the context positions not yet in
        ``cache``; ``position_ids`` [b, c+B] are the absolute positions of those
        context positions followed by the block's. With a cache, the context AND
        block K/V are appended; the caller crops the block back off.
        """
        context = self.hidden_norm(self.fc(target_features))
        cos, sin = self.rotary_emb(block_embeddings, position_ids)
        x = block_embeddings
        for layer in self.layers:
            x = layer(x, context, cos, sin, cache)
        return self.norm(x)

    # -- persistence: transformers' save_pretrained / push_to_hub; a strict from_pretrained ---------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any,
                        **kwargs: Any) -> DFlashDraftModel:
        """transformers' ``from_pretrained``, refusing what it would only warn about.

        A local folder is checked first (``config.json``, a DFlash ``dflash_config``, the weights
        file); then every tensor must be present, expected and of the config's shape. ``dtype``
        defaults to float32 (the weights are cast, as before transformers 5's ``"auto"``).
        """
        source = str(pretrained_model_name_or_path)
        local = Path(source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
            check_draft_folder(local)
            pretrained_model_name_or_path = local
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            kwargs["dtype"] = torch.float32
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.pop("ignore_mismatched_sizes", None)  # mismatches are reported below, by name
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
        raise_on_bad_weights(info, source)
        return (model, info) if want_info else model


DFlashDraftConfig.register_for_auto_class()  # saved folders carry auto_map + the code (AutoConfig)
DFlashDraftModel.register_for_auto_class("AutoModel")


def check_draft_folder(path: Path) -> None:
    """A local draft folder has ``config.json`` with a ``dflash_config`` and a safetensors weights file."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"draft folder {str(path)!r} has no config.json; export a draft there first.")
    if not is_draft_config_dict(json.loads(config_file.read_text())):
        raise ValueError(f"{str(config_file)!r} is not a DFlash draft config (no dflash_config with mask_token_id "
                         "and target_layer_ids, or no block_size).")
    if not ((path / WEIGHTS_NAME).is_file() or (path / WEIGHTS_INDEX_NAME).is_file()):
        raise FileNotFoundError(f"draft folder {str(path)!r} has no {WEIGHTS_NAME}; export a draft there first.")


def raise_on_bad_weights(info: dict[str, Any], source: str) -> None:
    """Errors that name the tensor (and both shapes) for what transformers would re-initialise."""
    mismatched = sorted(info.get("mismatched_keys") or [])
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ValueError(f"draft weight {name!r} in {source} has shape {tuple(stored)}, but the config expects "
                         f"{tuple(expected)}; the checkpoint belongs to another draft shape.")
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    if missing or unexpected:
        raise ValueError(f"draft weights in {source} do not match the draft config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")


def check_draft_matches_target(draft_config: DFlashDraftConfig, target_config: Any) -> None:
    """The draft must be built for THIS target: same hidden size, vocab and depth."""
    pairs = {
        "hidden_size": (draft_config.hidden_size, target_config.hidden_size),
        "vocab_size": (draft_config.vocab_size, target_config.vocab_size),
        "num_target_layers": (draft_config.num_target_layers, target_config.num_hidden_layers),
    }
    for name, (d, t) in pairs.items():
        if int(d) != int(t):
            raise ValueError(f"draft {name}={d} does not match the target's {t}: this draft was trained for "
                             "another target model.")
    ids = draft_target_layer_ids(draft_config)
    if max(ids) >= target_config.num_hidden_layers:
        raise ValueError(f"draft target_layer_ids {ids} exceed the target's {target_config.num_hidden_layers} layers.")


__all__ = ["DFlashDraftConfig", "DFlashDraftModel", "check_draft_folder", "check_draft_matches_target"]
