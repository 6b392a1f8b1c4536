"""The embedded default teacher: a tiny GPT-OSS-architecture causal LM.

(Work in progress: the config is fixed first so every module agrees on the
architecture; the corpus, tokenizer and training follow.)
"""

from __future__ import annotations

from typing import Any

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"


def tiny_gptoss_config(vocab_size: int = 4096, **overrides: Any):
    """GptOssConfig of the tiny teacher: the same code paths as gpt-oss-20b.

    Alternating sliding-window / full attention with a window (32) far smaller than
    the benchmark's generation length, attention sinks, YaRN RoPE, and a MoE MLP
    with 4 experts (top-2).
    """
    from transformers import GptOssConfig

    num_layers = overrides.pop("num_hidden_layers", 6)
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=32,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 512,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        attention_bias=True,
        initializer_range=0.02,
    )
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)
