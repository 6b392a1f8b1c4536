"""The Modal apps (benchmark, GPU training) and the TPU setup script, checked offline and fast.

The Modal files live in ``modal/``, a folder that is not a package and whose name is the Modal
library's: they are loaded by file path under distinct module names, never imported as
``modal.x``. Everything here runs without Modal credentials and with network access blocked.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

modal = pytest.importorskip("modal")

REPO = Path(__file__).resolve().parents[1]
BENCH_FILE = REPO / "modal" / "dflash_gptoss20b_benchmark.py"
TRAIN_FILE = REPO / "modal" / "dflash_gptoss20b_train.py"
SETUP_SCRIPT = REPO / "scripts" / "setup_tpu_easydel_env.sh"


def _load(path: Path, name: str) -> ModuleType:
    """Import ``path`` as module ``name`` (registered in sys.modules, which dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@dataclass
class Apps:
    bench: ModuleType
    train: ModuleType
    info: dict[str, Any]  # function name -> modal's FunctionInfo (gpus, volumes, ...)


@pytest.fixture(scope="module")
def apps() -> Apps:
    """Both app modules, imported while every outgoing connection raises (import must stay offline)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access while importing a Modal app: {args!r}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        bench = _load(BENCH_FILE, "dflash_modal_benchmark_app")
        train = _load(TRAIN_FILE, "dflash_modal_train_app")
        # info() of a locally defined function is built from its definition: no server either.
        info = {name: fn.info() for module in (bench, train) for name, fn in _functions(module).items()}
    yield Apps(bench, train, info)
    for name in ("dflash_modal_benchmark_app", "dflash_modal_train_app"):
        sys.modules.pop(name, None)


def _functions(module: ModuleType) -> dict[str, object]:
    """The module's Modal functions that belong to its app."""
    found = {name: obj for name, obj in vars(module).items() if isinstance(obj, modal.Function)}
    assert all(fn.app is module.app for fn in found.values())
    return found


def _load_script(name: str) -> ModuleType:
    return _load(REPO / "scripts" / f"{name}.py", f"dflash_test_script_{name}")


# --------------------------------------------------------------------------- the two apps
def test_apps_and_their_functions(apps):
    bench, train = apps.bench, apps.train
    assert isinstance(bench.app, modal.App) and bench.app.name == "dflash-gptoss20b-benchmark"
    assert isinstance(train.app, modal.App) and train.app.name == "dflash-gptoss20b-train"
    assert set(_functions(bench)) == {"benchmark"}
    assert set(_functions(train)) == {"generate_data", "build_cache", "train"}
    assert isinstance(bench.main, modal.app.LocalEntrypoint) and isinstance(train.main, modal.app.LocalEntrypoint)
    assert bench.MODEL_ID == train.MODEL_ID == "openai/gpt-oss-20b"


def test_gpus_one_h100_each(apps):
    train = apps.train
    assert apps.info["benchmark"].gpus == [("H100", 1)]
    for fn in ("generate_data", "build_cache", "train"):
        assert apps.info[fn].gpus == [(train.GPU, 1)] == [("H100", 1)]


def test_volumes_connect_training_to_the_benchmark(apps):
    bench, train = apps.bench, apps.train
    bench_vols = apps.info["benchmark"].volumes
    train_vols = apps.info["train"].volumes
    # The draft the trainer exports is where the benchmark reads drafts from.
    assert train_vols[train.DRAFTS_DIR].name == bench_vols[bench.DRAFTS_DIR].name == train.DRAFTS_VOLUME
    assert train.DRAFTS_DIR == bench.DRAFTS_DIR
    # One weights volume: the snapshot downloaded for training is the one benchmarked.
    assert train_vols[train.WEIGHTS_DIR].name == bench_vols[bench.WEIGHTS_DIR].name == train.WEIGHTS_VOLUME
    assert train.WEIGHTS_DIR == bench.WEIGHTS_DIR
    # Data and caches share one volume; only `train` writes drafts.
    for fn in ("generate_data", "build_cache", "train"):
        assert apps.info[fn].volumes[train.CACHE_DIR].name == train.CACHE_VOLUME
    assert train.DRAFTS_DIR not in apps.info["build_cache"].volumes


def test_step_argv_parse_with_the_real_scripts(apps):
    """Every command line the app builds is accepted by the script it runs, with the intended values."""
    train = apps.train
    data = train.DataSettings(data_name="d1", chat=True, resume=True)
    cache = train.CacheSettings(cache_name="c1", data_name="d1", num_blocks=32, assume_free_gb=2.5,
                                extra_args=("--no-progress",))
    training = train.TrainSettings(cache_name="c1", draft_name="my-draft", max_training_steps=7, resume=True)

    gen = _load_script("generate_teacher_data").build_parser().parse_args(data.argv("/snap", with_prompts_file=True))
    assert (gen.model_snapshot_dir, gen.device, gen.dtype, gen.chat, gen.resume, gen.overwrite) == (
        "/snap", "cuda", "bfloat16", True, True, False)
    assert gen.prompts_file == data.prompts_file and gen.out == "/cache/data/d1.jsonl"

    built = _load_script("tpu_dflash_build_teacher_cache").build_parser().parse_args(cache.argv("/snap"))
    assert (built.dp, built.tp, built.dtype, built.layout, built.num_blocks) == (1, 1, "bfloat16", "windows", 32)
    assert built.data == gen.out  # the cache reads what generate_data wrote
    assert built.out_dir == cache.out_dir == "/cache/caches/c1"
    assert built.assume_free_bytes == 2_500_000_000 and built.no_progress

    tr = _load_script("tpu_dflash_train_with_easydel_trainer").build_parser().parse_args(training.argv("/snap"))
    assert (tr.dp, tr.tp, tr.max_training_steps, tr.resume) == (1, 1, 7, True)
    assert tr.cache_dir == built.out_dir and tr.teacher_snapshot_dir == built.model_snapshot_dir
    assert tr.export_dir == f"{train.DRAFTS_DIR}/my-draft" and tr.model_name == "my-draft"


def test_jax_image_packages_follow_pyproject(apps):
    train = apps.train
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    jax_extra = pyproject["project"]["optional-dependencies"]["jax"]
    expected = tuple(req.replace("jax", "jax[cuda12]", 1) if req.startswith("jax") else req for req in jax_extra)
    assert train.JAX_PACKAGES == expected
    torch_extra = pyproject["project"]["optional-dependencies"]["torch"]
    assert train.TORCH_REQUIREMENT in torch_extra
    assert set(train.COMMON_PACKAGES) >= set(torch_extra) - {train.TORCH_REQUIREMENT, "matplotlib>=3.8"}


def test_names_and_steps_are_checked(apps):
    train = apps.train
    assert train.parse_steps("all") == ["data", "cache", "train"]
    assert train.parse_steps("train, cache") == ["cache", "train"]
    for bad in ("", "bench", "all,train"):
        with pytest.raises(ValueError, match="--step"):
            train.parse_steps(bad)
    for bad in ("../x", "a/b", "", ".hidden", "x..y"):
        with pytest.raises(ValueError, match="one plain name"):
            train.TrainSettings(cache_name="c", draft_name=bad)
    assert train.default_cache_name("windows", 4096, 8, 4) == "gptoss20b_ctx4096_b8_k4_windows"


@pytest.mark.parametrize("path,options", [
    (TRAIN_FILE, ["--step", "--gpu", "--data-name", "--cache-name", "--draft-name", "--resume / --no-resume"]),
    (BENCH_FILE, ["--draft", "--max-new-tokens", "--block-size", "--repeats", "--out-dir", "--report-name"]),
])
def test_modal_cli_parses_the_entrypoint(path, options):
    """``modal run FILE --help`` builds the entrypoint's CLI locally (no server, no credentials)."""
    out = subprocess.run([sys.executable, "-m", "modal", "run", str(path), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout


# --------------------------------------------------------------------------- TPU setup script
def test_setup_script_syntax():
    subprocess.run(["bash", "-n", str(SETUP_SCRIPT)], check=True)


def test_setup_script_help_creates_nothing(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "VENV_DIR": str(venv)}
    out = subprocess.run(["bash", str(SETUP_SCRIPT), "--help"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: ") and "--cpu" in out.stdout and "--worker=all" in out.stdout
    assert not venv.exists()


def test_setup_script_rejects_bad_input_before_creating_anything(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "VENV_DIR": str(venv)}
    bad = subprocess.run(["bash", str(SETUP_SCRIPT), "--bogus"], capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    missing = subprocess.run(["bash", str(SETUP_SCRIPT), "--cpu", "--python", "no-such-python3.99"],
                             capture_output=True, text=True, env=env, timeout=30)
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert not venv.exists()
