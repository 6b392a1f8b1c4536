"""One source for every setting: the scripts' flags are their settings dataclasses' fields.

A flag that exists in a parser but not in the settings (or the reverse), a default written twice,
or a planner that builds other settings than the run would train with, fails here. No model, no
jax: quick tier.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from dflash_gptoss.cache_settings import CacheBuildSettings
from dflash_gptoss.cli_types import cli_fields, settings_from_args
from dflash_gptoss.distributed import add_distributed_args
from dflash_gptoss.planning.cli import add_plan_arguments, training_settings
from dflash_gptoss.train_settings import DFlashTrainingSettings

REPO = Path(__file__).resolve().parents[1]
LIBRARY_ONLY = {"block_size", "progress_bar"}
"""Training settings that are not flags: the block size comes from the cache's meta.json, the
progress bar is chosen by tests; each is documented at its field."""


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dests(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest != "help"}


def _shared_dests(geometry: bool) -> set[str]:
    """The flags every TPU script adds besides its settings: multi-host start-up and the plan (the
    trainer's plan also takes a cache geometry, for a cache that does not exist yet)."""
    p = argparse.ArgumentParser()
    add_distributed_args(p)
    add_plan_arguments(p, geometry=geometry)
    return _dests(p)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("script,settings", [("tpu_dflash_train_with_easydel_trainer", DFlashTrainingSettings),
                                             ("tpu_dflash_build_teacher_cache", CacheBuildSettings)])
def test_each_flag_is_a_setting_and_each_setting_a_flag(script: str, settings: type) -> None:
    parser = _script(script).build_parser()
    own = _dests(parser) - _shared_dests(geometry=settings is DFlashTrainingSettings)
    flags = {f.name for f in cli_fields(settings)}
    assert own == flags, f"flags without a setting: {own - flags}; settings without a flag: {flags - own}"
    not_flags = {f.name for f in fields(settings)} - flags
    assert not_flags <= LIBRARY_ONLY, not_flags


@pytest.mark.parametrize("script,settings", [("tpu_dflash_train_with_easydel_trainer", DFlashTrainingSettings),
                                             ("tpu_dflash_build_teacher_cache", CacheBuildSettings)])
def test_every_default_and_type_is_the_dataclass_own(script: str, settings: type) -> None:
    actions = _actions(_script(script).build_parser())
    for f in cli_fields(settings):
        a = actions[f.name]
        default = None if f.default is MISSING else f.default
        assert a.default == default, (f.name, a.default, default)
        assert a.help == f.metadata["help"], f.name
        if f.metadata["type"] is not None:
            assert a.type is f.metadata["type"], f.name


def test_the_planner_builds_the_settings_the_trainer_would_train_with(tmp_path: Path) -> None:
    argv = ["--cache-dir", str(tmp_path / "c"), "--teacher-snapshot-dir", str(tmp_path / "t"),
            "--save-directory", str(tmp_path / "s"), "--max-training-steps", "7", "--total-batch-size", "16",
            "--dp", "2", "--tp", "4", "--num-draft-layers", "3", "--anchors-per-window", "5", "--seed", "9",
            "--lr-schedule", "linear", "--eval-temperature", "1.0", "--plan-tpu", "v5e-8"]
    args = _script("tpu_dflash_train_with_easydel_trainer").build_parser().parse_args(argv)
    run = settings_from_args(DFlashTrainingSettings, args)
    assert training_settings(args, run.total_batch_size) == run
    assert training_settings(args, 32) == settings_from_args(DFlashTrainingSettings, args, total_batch_size=32)


def test_plan_tpu_run_takes_the_real_scripts_flags_with_their_defaults() -> None:
    plan = _script("plan_tpu_run")
    actions = _actions(plan.build_parser())
    for settings, names in ((CacheBuildSettings, plan.CACHE_FLAGS), (DFlashTrainingSettings, plan.TRAIN_FLAGS)):
        real = {f.name: f for f in cli_fields(settings)}
        for name in names:
            f, a = real[name], actions[name]
            want = None if f.default is MISSING or name in plan.LEFT_OUT else f.default
            assert a.default == want, name
            assert a.help == f.metadata["help"] and a.type == f.metadata["type"], name


# Every training setting is either planned (it shapes the compiled step or the estimate) or named
# here as not shaping it: a new setting cannot silently stay out of the plan.
NOT_PLANNED = {"teacher_snapshot_dir", "save_directory", "model_name", "dp", "tp", "save_steps", "log_steps",
               "summary_json",
               "resume", "resume_if_possible", "allow_new_cache", "export_dir", "verify_cache", "eval_cache_dir",
               "eval_steps", "keep_best", "eval_temperature", "eval_top_k", "export_check_blocks"}
"""``dp``/``tp`` are planned too: plan_tpu_run.py adds them once, for both steps."""


def test_every_training_setting_is_planned_or_named_as_not_shaping_the_step() -> None:
    plan = _script("plan_tpu_run")
    flags = {f.name for f in cli_fields(DFlashTrainingSettings)}
    planned = set(plan.TRAIN_FLAGS)
    assert planned | NOT_PLANNED == flags, f"unclassified: {flags - planned - NOT_PLANNED}"
    assert not planned & NOT_PLANNED
    assert {"dp", "tp"} <= _dests(plan.build_parser())
