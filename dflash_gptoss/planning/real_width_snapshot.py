"""A random-weight GPT-OSS snapshot with gpt-oss-20b's exact widths, for rehearsing the real scripts on CPU.

Everything that sizes a program is gpt-oss-20b's (``planning/model_presets``): hidden 2880, vocabulary
201088, 64 query / 8 key-value heads of dim 64, sliding window 128, YaRN, attention sinks, MoE
with 4 experts per token, expert weights stored in MXFP4 under the real tensor names
(``*_blocks`` / ``*_scales``, written by :func:`dflash_gptoss.teacher_mxfp4.checkpoint_tensors`), every
other tensor in bf16. Only depth and breadth shrink: ``num_layers`` decoder layers and
``num_experts`` experts. The default 7 layers is the fewest the project's layer-id rule allows
for the seed's ``--num-context-features 4`` (it needs L >= K + 3), so the cache holds the real
23 KB per position. The weights are random (N(0, initializer_range), norms 1, biases 0): a
rehearsal measures the programs, never acceptance.

The tokenizer is the embedded tiny teacher's (ids below 4096, all inside the real vocabulary),
since no machine here can download gpt-oss's; the scripts need one for prompts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def real_width_config(num_layers: int, num_experts: int) -> dict:
    """gpt-oss-20b's config.json with ``num_layers`` layers and ``num_experts`` experts."""
    from dflash_gptoss.planning.model_presets import preset_dir

    cfg = json.loads((preset_dir("gpt-oss-20b") / "config.json").read_text())
    if not 1 <= num_layers <= cfg["num_hidden_layers"]:
        raise ValueError(f"num_layers={num_layers} must lie in [1, {cfg['num_hidden_layers']}]")
    if not cfg["num_experts_per_tok"] <= num_experts <= cfg["num_local_experts"]:
        raise ValueError(f"num_experts={num_experts} must lie in [{cfg['num_experts_per_tok']} (experts per token), "
                         f"{cfg['num_local_experts']}]")
    cfg["num_hidden_layers"] = num_layers
    cfg["layer_types"] = cfg["layer_types"][:num_layers]
    cfg["num_local_experts"] = num_experts
    cfg["dtype"] = "bfloat16"
    return cfg


def _random_parameter(name: str, shape: tuple[int, ...], std: float, rng: np.random.Generator) -> np.ndarray:
    """float32 values for one parameter, by transformers' GPT-OSS initialisation rule."""
    leaf = name.split(".")[-1]
    if "norm" in name and leaf == "weight":
        return np.ones(shape, np.float32)
    if leaf == "bias" or leaf.endswith("_bias"):
        return np.zeros(shape, np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)


def write_real_width_snapshot(out_dir: str | Path, *, tokenizer_dir: str | Path, num_layers: int = 7,
                              num_experts: int = 4, seed: int = 0) -> Path:
    """Write the snapshot (config.json, model.safetensors, tokenizer) to ``out_dir``; returns it.

    Parameter names and shapes come from transformers' own ``GptOssForCausalLM`` built on the
    meta device (no memory), so the file is what ``from_pretrained`` and the JAX loader expect.
    Written to a temporary folder first and renamed: a killed write leaves no half snapshot.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    from dflash_gptoss.teacher_mxfp4 import QUANTIZATION_CONFIG, checkpoint_tensors

    out = Path(out_dir)
    cfg = real_width_config(num_layers, num_experts)
    cfg["quantization_config"] = dict(QUANTIZATION_CONFIG)
    hf_cfg = GptOssConfig(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in GptOssForCausalLM(hf_cfg).state_dict().items()}
    rng = np.random.default_rng(seed)
    tensors: dict = {}
    for name, shape in shapes.items():
        values = torch.from_numpy(_random_parameter(name, shape, float(cfg["initializer_range"]), rng))
        tensors.update(checkpoint_tensors(name, values))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / f).is_file():
            shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


__all__ = ["real_width_config", "write_real_width_snapshot"]
