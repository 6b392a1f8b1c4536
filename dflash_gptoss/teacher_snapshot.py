"""One validator for a GPT-OSS teacher snapshot folder, run before any expensive work.

Invariant: a snapshot that reaches a model load has a ``config.json`` that parses and describes a
GPT-OSS model, a ``tokenizer.json`` that loads (when the caller needs one), and safetensors files
whose headers hold every tensor the architecture needs, with the shape and dtype ``config.json``
implies, and whose data is all on disk. So a damaged snapshot is named (the file, and the line and
column of a JSON error, or the tensor) in one error instead of failing deep inside a loader, and no
model is ever run with a parameter the loader had to initialise because the file lacked it.

Only headers are read (a safetensors file starts with an 8-byte length and a JSON header), so the
check costs milliseconds even for gpt-oss-20b. Expert weights may be dense (``gate_up_proj``,
``down_proj``) or MXFP4 (``<proj>_blocks`` / ``<proj>_scales``, uint8), as the real snapshots ship.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

FLOAT_DTYPES = ("F32", "BF16", "F16")


class SnapshotError(ValueError):
    """A snapshot folder that cannot be used; the message names the file and what is wrong with it."""


def read_json_file(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SnapshotError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start}); the file is "
                            "damaged: write or download it again.") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path}:{e.lineno}:{e.colno}: {what} is not valid JSON ({e.msg}); the snapshot is "
                            "damaged or was edited by hand: write or download it again.") from e


def read_config(snapshot_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a GPT-OSS snapshot folder, parsed and checked for the sizes the project reads."""
    path = Path(snapshot_dir).expanduser()
    if not path.is_dir():
        raise SnapshotError(f"snapshot folder {str(path)!r} does not exist; pass the folder that holds the model's "
                            "config.json, tokenizer.json and *.safetensors (a Hugging Face snapshot).")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SnapshotError(f"{str(path)!r} has no config.json; it is not a Hugging Face snapshot folder.")
    cfg = read_json_file(config_file, "config.json")
    if not isinstance(cfg, dict):
        raise SnapshotError(f"{config_file}: config.json holds a {type(cfg).__name__}, not an object.")
    if cfg.get("model_type") != "gpt_oss":
        raise SnapshotError(f"{config_file}: model_type={cfg.get('model_type')!r}, not GPT-OSS ('gpt_oss'); pass a "
                            "GPT-OSS snapshot (e.g. openai/gpt-oss-20b or the tiny teacher).")
    for key in ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "num_local_experts", "intermediate_size"):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SnapshotError(f"{config_file}: {key} must be a positive integer, got {value!r}.")
    return cfg


def expected_tensors(cfg: dict[str, Any], mxfp4: bool) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Every tensor a GPT-OSS checkpoint of this config holds: name -> (shape, allowed safetensors dtypes)."""
    h, v, e, i = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    f = FLOAT_DTYPES
    want: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "model.embed_tokens.weight": ((v, h), f),
        "model.norm.weight": ((h,), f),
    }
    if not cfg.get("tie_word_embeddings", False):
        want["lm_head.weight"] = ((v, h), f)
    bias = cfg.get("attention_bias", True)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        want[p + "input_layernorm.weight"] = ((h,), f)
        want[p + "post_attention_layernorm.weight"] = ((h,), f)
        for name, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            want[p + f"self_attn.{name}.weight"] = ((rows, h), f)
            if bias:
                want[p + f"self_attn.{name}.bias"] = ((rows,), f)
        want[p + "self_attn.o_proj.weight"] = ((h, heads * hd), f)
        if bias:
            want[p + "self_attn.o_proj.bias"] = ((h,), f)
        want[p + "self_attn.sinks"] = ((heads,), f)
        want[p + "mlp.router.weight"] = ((e, h), f)
        want[p + "mlp.router.bias"] = ((e,), f)
        want[p + "mlp.experts.gate_up_proj_bias"] = ((e, 2 * i), f)
        want[p + "mlp.experts.down_proj_bias"] = ((e, h), f)
        if mxfp4:  # blocks [E, out, in/32, 16] and scales [E, out, in/32], uint8 (dflash_gptoss.teacher_mxfp4)
            for name, out, inner in (("gate_up_proj", 2 * i, h), ("down_proj", h, i)):
                want[p + f"mlp.experts.{name}_blocks"] = ((e, out, inner // 32, 16), ("U8",))
                want[p + f"mlp.experts.{name}_scales"] = ((e, out, inner // 32), ("U8",))
        else:
            want[p + "mlp.experts.gate_up_proj"] = ((e, h, 2 * i), f)
            want[p + "mlp.experts.down_proj"] = ((e, i, h), f)
    return want


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in one safetensors file, checking its data is all on disk."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SnapshotError(f"{path}: {size} bytes, too short for a safetensors file; the file is truncated: "
                                "write or download it again.")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise SnapshotError(f"{path}: its header claims {n} bytes but the file has {size}; the file is truncated: "
                                "write or download it again.")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{path}: the safetensors header is not valid JSON ({e}); the file is damaged: write "
                            "or download it again.") from e
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end > size:
        raise SnapshotError(f"{path}: its tensors need {8 + n + end} bytes but the file has {size}; the file is "
                            "truncated: write or download it again.")
    return out


def check_weights(snapshot_dir: str | Path, cfg: dict[str, Any]) -> None:
    """Every tensor the config implies is in the snapshot's safetensors headers, with its shape and dtype."""
    path = Path(snapshot_dir).expanduser()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SnapshotError(f"{path} holds no *.safetensors weights; the snapshot is incomplete: download it again.")
    found: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    for file in files:
        for name, (dtype, shape) in read_safetensors_header(file).items():
            found[name] = (dtype, shape, file)
    mxfp4 = (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4"
    want = expected_tensors(cfg, mxfp4)
    missing = [name for name in want if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SnapshotError(f"{path}: tensor {missing[0]!r}{more} is missing from {', '.join(f.name for f in files)}; "
                            "the snapshot is incomplete or from another model: download it again.")
    for name, (shape, dtypes) in want.items():
        dtype, have, file = found[name]
        if have != shape or dtype not in dtypes:
            raise SnapshotError(f"{file}: tensor {name!r} is {dtype} {list(have)}, but {path / 'config.json'} implies "
                                f"{'/'.join(dtypes)} {list(shape)}; the weights and config.json disagree.")


def check_tokenizer(snapshot_dir: str | Path) -> None:
    """``tokenizer.json`` parses and loads as a tokenizer."""
    path = Path(snapshot_dir).expanduser() / "tokenizer.json"
    if not path.is_file():
        raise SnapshotError(f"{path} does not exist; the snapshot needs its tokenizer (tokenizer.json).")
    read_json_file(path, "tokenizer.json")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise SnapshotError(f"{path}: the tokenizer does not load ({e}); the snapshot is damaged: download it "
                            "again.") from e


def validate_snapshot(snapshot_dir: str | Path, *, tokenizer: bool = True) -> dict[str, Any]:
    """The whole check: ``config.json``, the weights' headers and (unless ``tokenizer=False``) the tokenizer.

    Returns the parsed ``config.json``. Raises :class:`SnapshotError` naming the damaged file.
    """
    cfg = read_config(snapshot_dir)
    check_weights(snapshot_dir, cfg)
    if tokenizer:
        check_tokenizer(snapshot_dir)
    return cfg
