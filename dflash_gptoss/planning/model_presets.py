"""gpt-oss-20b and gpt-oss-120b without their weights: their public ``config.json``, shipped here.

The TPU planner needs a model's shapes, never its weights, so a folder holding only a
``config.json`` is enough. These two folders (``dflash_gptoss/planning/presets/<name>/config.json``)
hold the values published with the models (https://huggingface.co/openai/gpt-oss-20b and
https://huggingface.co/openai/gpt-oss-120b, ``config.json``), so a plan for the real teacher
needs no download: pass the preset name where a snapshot folder is expected.
"""

from __future__ import annotations

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS: tuple[str, ...] = ("gpt-oss-20b", "gpt-oss-120b")


def preset_dir(name: str) -> Path:
    """The packaged config folder of a preset (ValueError names the presets)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS_DIR / name


def resolve_config_dir(value: str | Path) -> Path:
    """A folder holding ``config.json``: ``value`` itself when it is a folder, else the preset of that name.

    An existing folder always wins (a path is never reinterpreted); a value that is neither a
    folder nor a preset name is an error that names both options.
    """
    path = Path(value)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; pass a model snapshot folder (config.json is enough "
                             f"for a plan) or a preset name ({', '.join(PRESETS)})")
        return path
    if str(value) in PRESETS:
        return preset_dir(str(value))
    raise ValueError(f"{value!r} is neither a folder nor a model preset; pass a snapshot folder holding "
                     f"config.json or one of: {', '.join(PRESETS)}")


__all__ = ["PRESETS", "PRESETS_DIR", "preset_dir", "resolve_config_dir"]
