"""Command-line settings: argparse value types, and parsers built from settings dataclasses.

A setting that a script exposes is written once, as a dataclass field made by :func:`setting`
(its default, type, choices and help); :func:`add_settings_arguments` turns the fields into
flags and :func:`settings_from_args` turns parsed flags back into the dataclass. So a flag cannot
exist without its setting, nor a setting without its flag, and a default is never written twice.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def check_positive_int(name: str, value: Any, error: type[Exception] = ValueError) -> int:
    """``value`` as an integer >= 1, or ``error`` naming the setting (bools are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(f"{name}={value!r} must be an integer >= 1.")
    return value


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def setting(default: Any = MISSING, *, help: str, type: Callable[[str], Any] | None = None,
            choices: Iterable[str] | None = None, metavar: str | None = None, required: bool = False) -> Any:
    """A dataclass field that is also a command-line flag ``--name-with-dashes``.

    ``default`` is the one default (``False`` makes a switch); a field without a default is a
    required flag, and ``required=True`` makes the command line ask for a value the library
    API defaults (e.g. how many steps to train).
    """
    return field(default=default, metadata={"help": help, "type": type, "metavar": metavar,
                                            "choices": tuple(choices) if choices else None,
                                            "required": required or default is MISSING})


def setting_default(cls: type, name: str) -> Any:
    """The default of ``cls``'s field ``name``: library functions take their defaults from the settings
    dataclass instead of writing them a second time."""
    return cls.__dataclass_fields__[name].default


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def cli_fields(cls: type) -> list[Any]:
    """The fields of ``cls`` that are flags (made by :func:`setting`), in order."""
    return [f for f in fields(cls) if "help" in f.metadata]


def add_settings_arguments(parser: argparse.ArgumentParser | Any, cls: type, *,
                           only: Iterable[str] | None = None, optional: Iterable[str] = ()) -> None:
    """One flag per :func:`setting` field of ``cls`` (``only`` selects; ``optional``
    names required fields that this parser lets the user leave out: they parse as ``None``)."""
    only = set(only) if only is not None else None
    optional = set(optional)
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        meta, flag = f.metadata, flag_name(f.name)
        default = None if f.default is MISSING or f.name in optional else f.default
        if f.default is False:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"default": default, "help": meta["help"],
                                  "required": meta["required"] and f.name not in optional}
        for key in ("type", "choices", "metavar"):
            if meta[key] is not None:
                kwargs[key] = meta[key]
        parser.add_argument(flag, **kwargs)


def settings_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """``cls`` from parsed flags: every field whose name was parsed takes its value."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
