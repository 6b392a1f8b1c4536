"""The DFlash draft's configuration, in the ``config.json`` layout every DFlash loader reads.

Self-contained on purpose: this file imports only transformers, because it is copied into every
exported draft folder (with :mod:`modeling_gptoss_dflash`) so that
``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` builds this class on a machine
without dflash_gptoss.

The layout follows the published DFlash drafts and what vLLM, SGLang and z-lab's reference class
read (``docs/interop.md``, "`config.json`"):

* ``model_type`` stays ``"qwen3"`` (this is a ``Qwen3Config`` subclass), so loaders that do not
  run remote code read the folder as the ``Qwen3Config`` they expect; ``architectures`` is
  ``["DFlashDraftModel"]``, the name vLLM's registry maps to its DFlash model;
* ``block_size`` and ``num_target_layers`` at the top level (z-lab's class evaluates
  ``num_target_layers`` even when the ids are given; SGLang rejects the ids without it), and
  ``dflash_config = {"mask_token_id", "target_layer_ids"}``; id ``l`` is the OUTPUT of target
  layer ``l`` (``hidden_states[l+1]``);
* RoPE twice: ``rope_parameters`` (transformers 5) and the legacy ``rope_theta`` + ``rope_scaling``
  (transformers 4.x reads only these: a config with only ``rope_parameters`` silently loads there
  with theta 10000 and no YaRN). The legacy keys are derived from ``rope_parameters`` when the
  config is serialised, so the two can never disagree.
"""

from typing import Any

from transformers import Qwen3Config


def is_draft_config_dict(raw: dict[str, Any]) -> bool:
    """Whether a parsed ``config.json`` describes a DFlash draft (the one test every check uses)."""
    dflash = raw.get("dflash_config")
    return (isinstance(dflash, dict) and "mask_token_id" in dflash and "target_layer_ids" in dflash
            and raw.get("block_size") is not None)


def draft_block_size(config: Any) -> int:
    """B: the anchor plus ``B - 1`` proposals per block."""
    return int(config.block_size)


def draft_mask_token_id(config: Any) -> int:
    """The target-vocabulary token that fills the block's unknown slots."""
    return int(config.dflash_config["mask_token_id"])


def draft_target_layer_ids(config: Any) -> list[int]:
    """Target layers whose OUTPUTS (``hidden_states[l+1]``) form the draft's context, in order."""
    return [int(i) for i in config.dflash_config["target_layer_ids"]]


def legacy_rope_keys(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` as transformers 4.x writes them, from ``rope_parameters``.

    4.x keeps the base in ``rope_theta`` and everything else (``rope_type``, YaRN's ``factor``,
    ``beta_fast``/``beta_slow``, ``original_max_position_embeddings``, ``truncate``...) in
    ``rope_scaling``; plain RoPE is ``rope_scaling: null``.
    """
    scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default" and set(scaling) <= {"rope_type", "type"}:
        scaling = None
    return {"rope_theta": rope_parameters.get("rope_theta", 10000.0), "rope_scaling": scaling}


def rope_parameters_from_legacy(rope_theta: float | None, rope_scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The inverse of :func:`legacy_rope_keys` (for transformers 4.x, whose configs hold only these)."""
    params = {"rope_type": "default", **(rope_scaling or {})}
    if "type" in params and params.get("rope_type") == "default":
        params["rope_type"] = params["type"]
    params.pop("type", None)
    params["rope_theta"] = 10000.0 if rope_theta is None else rope_theta
    return params


class DFlashDraftConfig(Qwen3Config):
    """A ``Qwen3Config`` with the DFlash fields (``block_size``, ``num_target_layers``, ``dflash_config``).

    Made by :func:`dflash_gptoss.draft_config.make_draft_config` (the one place a draft config is built
    from a target); here it only defines the fields and how they are written.
    """

    block_size: int | None = None
    num_target_layers: int | None = None
    dflash_config: dict | None = None

    def rope_parameters_dict(self) -> dict[str, Any]:
        """The RoPE settings as one dict, whichever transformers version built this config."""
        params = getattr(self, "rope_parameters", None)
        if params:
            return dict(params)
        return rope_parameters_from_legacy(getattr(self, "rope_theta", None), getattr(self, "rope_scaling", None))

    def to_dict(self) -> dict[str, Any]:
        """transformers' dict plus the RoPE keys of both versions (see the module docstring)."""
        out = super().to_dict()
        rope = self.rope_parameters_dict()
        out["rope_parameters"] = rope
        out.update(legacy_rope_keys(rope))
        return out


__all__ = [
    "DFlashDraftConfig",
    "draft_block_size",
    "draft_mask_token_id",
    "draft_target_layer_ids",
    "is_draft_config_dict",
    "legacy_rope_keys",
    "rope_parameters_from_legacy",
]
