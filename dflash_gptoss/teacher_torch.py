"""The torch target (teacher) at inference: loading and one forward with features.

Two facts from transformers 5.5 shape this module (docs/design.md, "GPT-OSS specifics"):

* ``DynamicCache(config=...)``, which the model builds when no cache is passed,
  keeps only the window for sliding layers and cannot be cropped once the
  sequence outgrows it. ``DynamicCache()`` without a config keeps every key for
  every layer (the attention mask applies the window), so ``crop(n)`` is exact.
  Every decode loop therefore passes its own cache from prefill on, with
  explicit ``position_ids``.
* ``output_hidden_states`` would keep all L+1 hidden states (and ``[L]`` is after
  the final norm). Forward hooks on the chosen decoder layers give exactly the
  layer outputs the draft needs and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for CUDA, but torch sees no GPU here; use --device cpu.")
    return device


def check_gpt_oss_snapshot(snapshot_dir: str | Path) -> Path:
    """A clear error for a path that is not a usable GPT-OSS Hugging Face snapshot folder (``snapshot`` module)."""
    path = Path(snapshot_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"target snapshot folder {str(path)!r} does not exist; pass the folder that holds the "
            "model's config.json and *.safetensors (a Hugging Face snapshot)."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; it is not a Hugging Face snapshot folder.")
    from dflash_gptoss.teacher_snapshot import validate_snapshot

    validate_snapshot(path)  # config.json, every tensor's header, tokenizer.json: the damaged file is named
    return path


def load_target(snapshot_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The frozen GPT-OSS target in eval mode on ``device``.

    The real gpt-oss snapshots store experts in MXFP4; they are dequantized to
    ``dtype`` at load, so the benchmark measures the bf16 model of docs/design.md, "Benchmark and scale-out".
    """
    path = check_gpt_oss_snapshot(snapshot_dir)
    kwargs = {}
    quant = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if dtype == torch.float32:
        # transformers dequantizes MXFP4 experts to bf16 whatever ``dtype`` says: a float32 target would
        # silently run its experts in bf16 (and on CPU ~200x slower: bf16 grouped_mm has no fast kernel).
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    return model.to(device).eval().requires_grad_(False)


def new_target_cache() -> DynamicCache:
    """A cache that keeps every key of every layer, so ``crop`` is exact (see module doc)."""
    return DynamicCache()


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [1, T, V] (or [1, 1, V] with last_only)
    features: torch.Tensor | None  # [1, T, K*H], outputs of the chosen layers, concatenated


class TargetRunner:
    """One target forward that also returns the outputs of ``layer_ids``.

    Hooks are registered once; with ``layer_ids=[]`` (the baseline) nothing is
    captured, so the baseline pays no feature cost.
    """

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        self.model = model
        self.layer_ids = list(layer_ids)
        self._captured: dict[int, torch.Tensor] = {}
        layers = model.model.layers
        for layer_id in self.layer_ids:
            if not 0 <= layer_id < len(layers):
                raise ValueError(f"target layer id {layer_id} is outside the target's {len(layers)} layers.")
        self._hooks = [layers[i].register_forward_hook(self._hook(i)) for i in self.layer_ids]

    def close(self) -> None:
        """Remove the hooks, so a model shared by several runners pays only for live ones."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, layer_id: int):
        def capture(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return capture

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @torch.inference_mode()
    def __call__(
        self, input_ids: torch.Tensor, start: int, cache: DynamicCache, *, last_only: bool = False
    ) -> TargetOutput:
        """Forward ``input_ids`` [1, T] at absolute positions ``start..start+T-1``."""
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        self._captured.clear()
        out = self.model(
            input_ids=input_ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        features = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        self._captured.clear()
        return TargetOutput(logits=out.logits, features=features)
