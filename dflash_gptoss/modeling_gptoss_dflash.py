"""The DFlash draft for GPT-OSS in PyTorch (DESIGN.md, "How DFlash works").

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
Qwen3-style layer: q/k RMSNorm, no bias, SiLU MLP), so serving engines that load
DFlash drafts can load an exported draft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, rotate_half

from dflash_gptoss.config import draft_block_size, draft_mask_token_id, draft_target_layer_ids

WEIGHTS_NAME = "model.safetensors"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for ``x`` [b, heads, T, d] with ``cos``/``sin`` [b, T, d] of the same positions."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class DFlashAttention(nn.Module):
    """Block queries attend, non-causally, to ``[context || block]`` keys and values."""

    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
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
    def __init__(self, config: Qwen3Config, layer_idx: int):
        super().__init__()
        self.self_attn = DFlashAttention(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, context, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), context, cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DFlashDraftModel(nn.Module):
    """The draft's own parameters: ``fc``, ``hidden_norm``, the layers and ``norm``.

    The target's embedding and lm_head are arguments of the forward / logits
    calls, never parameters here: they stay frozen and are not saved twice.
    """

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.block_size = draft_block_size(config)
        self.mask_token_id = draft_mask_token_id(config)
        self.target_layer_ids = draft_target_layer_ids(config)
        hidden = config.hidden_size
        self.fc = nn.Linear(len(self.target_layer_ids) * hidden, hidden, bias=False)
        self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)

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

    # -- persistence -------------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (draft parameters only), like published drafts."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return out

    @classmethod
    def from_pretrained(cls, draft_dir: str | Path, *, dtype: torch.dtype | None = None) -> DFlashDraftModel:
        """Load a draft folder; a missing file or a tensor of the wrong shape is a clear error."""
        path = Path(draft_dir).expanduser()
        for name in ("config.json", WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"draft folder {str(path)!r} has no {name}; export a draft there first.")
        raw = json.loads((path / "config.json").read_text())
        if "dflash_config" not in raw or "block_size" not in raw:
            raise ValueError(f"{str(path / 'config.json')!r} is not a DFlash draft config (no dflash_config).")
        model = cls(Qwen3Config.from_pretrained(path))
        load_checked_state_dict(model, load_file(str(path / WEIGHTS_NAME)), source=str(path))
        return model.to(dtype) if dtype is not None else model


def load_checked_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict`` with errors that name the tensor, both shapes and the source."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"draft weights in {source} do not match the draft config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"draft weight {name!r} in {source} has shape {tuple(tensor.shape)}, but the config "
                             f"expects {tuple(own[name].shape)}; the checkpoint belongs to another draft shape.")
    model.load_state_dict(state, strict=True)


def check_draft_matches_target(draft_config: Qwen3Config, target_config) -> None:
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
