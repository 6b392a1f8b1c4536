"""Modal app: teacher data, teacher cache and DFlash draft training for openai/gpt-oss-20b on ONE GPU.

The GPU fallback for when no TPU is at hand. It runs the very scripts a TPU host runs
(``scripts/generate_teacher_data.py``, ``scripts/tpu_dflash_build_teacher_cache.py``,
``scripts/tpu_dflash_train_with_easydel_trainer.py``) as subprocesses inside the image, so the
GPU path and the TPU path cannot drift apart: JAX with CUDA (``jax[cuda12]``), one device,
``--dp 1 --tp 1``. Data generation is PyTorch (transformers ``generate``) in a CUDA-torch image,
like the benchmark app.

Volumes (created on first use):
  gptoss-weights        /weights  the Hugging Face snapshot cache, shared with the benchmark app
  dflash-teacher-cache  /cache    data/<name>.jsonl (teacher greedy text), caches/<name>/ (teacher
                                  cache), checkpoints/<draft>/run-<step>/ (easydel checkpoints)
  dflash-drafts         /drafts   <draft>/ (config.json + model.safetensors): the benchmark app
                                  reads it as --draft /drafts/<draft>

  modal run modal/dflash_gptoss20b_train.py                           # data -> cache -> train -> export
  modal run modal/dflash_gptoss20b_train.py --step cache,train --data-name ""   # builder's default corpus
  modal run modal/dflash_gptoss20b_train.py --step train --max-training-steps 4000 --resume
  modal run modal/dflash_gptoss20b_benchmark.py --draft /drafts/gptoss20b-dflash-draft

Sizes: gpt-oss-20b's teacher in bf16 is ~42 GB, so on an 80 GB H100 the cache is built in
bfloat16 (float32 would not fit); pass --gpu H200 for headroom. One cache position costs
K*2880*2 bytes (23 KB for K=4): the default ``windows`` layout, 256 windows of 4096 positions,
is ~24 GB in the volume and serves --anchors-per-window blocks per window and step.
The training summary lands in artifacts/dflash_train/ on the machine that ran ``modal run``.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import modal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL_ID = "openai/gpt-oss-20b"
GPU = "H100"
WEIGHTS_VOLUME, WEIGHTS_DIR = "gptoss-weights", "/weights"
CACHE_VOLUME, CACHE_DIR = "dflash-teacher-cache", "/cache"
DRAFTS_VOLUME, DRAFTS_DIR = "dflash-drafts", "/drafts"
SCRIPTS_DIR = "/root/scripts"  # the image's copy of scripts/; PYTHONPATH=/root finds /root/dflash_gptoss
STEPS = ("data", "cache", "train")
DEFAULT_DATA_NAME = "gptoss20b_greedy"
DEFAULT_DRAFT_NAME = "gptoss20b-dflash-draft"
HOUR = 3600

# The JAX side, as in pyproject's `jax` extra, with the CUDA 12 wheels of jax (tests/test_modal_apps.py checks it).
JAX_PACKAGES = ("jax[cuda12]>=0.9.2", "flax==0.12.3", "optax>=0.2.4", "easydel==0.3.0")
# What the scripts need besides JAX: configs, tokenizer, safetensors (read through torch), export.
COMMON_PACKAGES = ("transformers~=5.5.0", "safetensors>=0.4.5", "huggingface_hub>=1.0", "tokenizers>=0.22",
                   "numpy>=1.26", "ml_dtypes>=0.4", "tqdm>=4.66")
TORCH_REQUIREMENT = "torch>=2.6"
# Snapshot folders the scripts never read (the original checkpoint and Metal weights, ~26 GB).
SNAPSHOT_IGNORE = ["original/*", "metal/*"]

jax_image = (
    modal.Image.debian_slim(python_version="3.11")
    # CPU torch: the JAX side only reads safetensors and writes the export with it; CUDA torch
    # would bring a second set of CUDA libraries next to jax's.
    .pip_install(TORCH_REQUIREMENT, index_url="https://download.pytorch.org/whl/cpu")
    .pip_install(*JAX_PACKAGES, *COMMON_PACKAGES)
    .env({
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",  # the 20b teacher needs most of the GPU; default is 0.75
        "TOKENIZERS_PARALLELISM": "false",
    })
    .add_local_dir(REPO / "scripts", remote_path=SCRIPTS_DIR, ignore=["**/__pycache__", "*.sh"])
    .add_local_python_source("dflash_gptoss")
)
torch_image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(TORCH_REQUIREMENT, *COMMON_PACKAGES, "accelerate>=1.0")
    .env({"TOKENIZERS_PARALLELISM": "false"})
    .add_local_dir(REPO / "scripts", remote_path=SCRIPTS_DIR, ignore=["**/__pycache__", "*.sh"])
    .add_local_python_source("dflash_gptoss")
)

weights = modal.Volume.from_name(WEIGHTS_VOLUME, create_if_missing=True)
cache_volume = modal.Volume.from_name(CACHE_VOLUME, create_if_missing=True)
drafts = modal.Volume.from_name(DRAFTS_VOLUME, create_if_missing=True)
app = modal.App("dflash-gptoss20b-train")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(name: str, what: str) -> str:
    """A folder or file name inside a volume: one plain path component, so nothing escapes the volume."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} must be one plain name (letters, digits, '.', '_', '-'), not a path.")
    return name


def parse_steps(step: str) -> list[str]:
    """``all`` or a comma list of data/cache/train, returned in pipeline order."""
    wanted = {s.strip() for s in step.split(",") if s.strip()}
    if wanted == {"all"}:
        return list(STEPS)
    unknown = sorted(wanted - set(STEPS))
    if unknown or not wanted:
        raise ValueError(f"--step {step!r}: use 'all' or a comma list of {', '.join(STEPS)}.")
    return [s for s in STEPS if s in wanted]


def default_cache_name(layout: str, ctx_len: int, block_size: int, num_context_features: int) -> str:
    """The cache folder named after the settings that make it (as in the seed's ``gptoss20b_ctx4096_b8_k4``)."""
    return f"gptoss20b_ctx{ctx_len}_b{block_size}_k{num_context_features}_{layout}"


def data_path(data_name: str) -> str:
    return f"{CACHE_DIR}/data/{check_name(data_name, 'data name')}.jsonl"


def cache_path(cache_name: str) -> str:
    return f"{CACHE_DIR}/caches/{check_name(cache_name, 'cache name')}"


def export_path(draft_name: str) -> str:
    """Where ``train`` exports the draft; the benchmark app takes exactly this as ``--draft``."""
    return f"{DRAFTS_DIR}/{check_name(draft_name, 'draft name')}"


def _switches(**switches: bool) -> list[str]:
    """The script flags of the switches that are on: ``resume=True`` -> ``["--resume"]``."""
    return [f"--{name.replace('_', '-')}" for name, on in switches.items() if on]


# One settings class per step: built and checked on the local side, sent to the container as a
# dict, turned into the script's command line there (tests parse that with the script's parser).
@dataclass(frozen=True)
class DataSettings:
    """One run of ``scripts/generate_teacher_data.py`` writing ``/cache/data/<data_name>.jsonl``."""

    data_name: str = DEFAULT_DATA_NAME
    chat: bool = False
    num_samples: int = 512
    prompt_tokens: int = 64
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_name(self.data_name, "data name")

    @property
    def out_file(self) -> str:
        return data_path(self.data_name)

    @property
    def prompts_file(self) -> str:
        """Where an uploaded prompts file is put, next to the data it produces."""
        return f"{CACHE_DIR}/data/{self.data_name}.prompts.jsonl"

    def argv(self, snapshot: str, *, with_prompts_file: bool) -> list[str]:
        argv = ["--model-snapshot-dir", snapshot, "--out", self.out_file, "--num-samples", str(self.num_samples),
                "--prompt-tokens", str(self.prompt_tokens), "--max-new-tokens", str(self.max_new_tokens),
                "--batch-size", str(self.batch_size), "--seed", str(self.seed), "--device", "cuda",
                "--dtype", "bfloat16"]
        if with_prompts_file:
            argv += ["--prompts-file", self.prompts_file]
        return argv + _switches(chat=self.chat, resume=self.resume, overwrite=self.overwrite)


@dataclass(frozen=True)
class CacheSettings:
    """One run of ``scripts/tpu_dflash_build_teacher_cache.py`` writing ``/cache/caches/<cache_name>``.

    ``data_name`` names a JSONL written by :class:`DataSettings` (empty: the builder's default
    corpus). ``dtype`` is bfloat16 because the float32 20b teacher (~84 GB) does not fit one
    80 GB GPU. ``assume_free_gb`` stands in for the free-space measure on a volume that reports
    it wrongly (0: measure).
    """

    cache_name: str
    ctx_len: int = 4096
    block_size: int = 8
    num_context_features: int = 4
    num_blocks: int = 256
    batch_size: int = 1
    layout: str = "windows"
    data_name: str = ""
    seed: int = 0
    dtype: str = "bfloat16"
    assume_free_gb: float = 0.0
    resume: bool = False
    overwrite: bool = False
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.cache_name, "cache name")
        if self.data_name:
            check_name(self.data_name, "data name")

    @property
    def out_dir(self) -> str:
        return cache_path(self.cache_name)

    def argv(self, snapshot: str) -> list[str]:
        argv = ["--model-snapshot-dir", snapshot, "--out-dir", self.out_dir, "--ctx-len", str(self.ctx_len),
                "--block-size", str(self.block_size), "--num-context-features", str(self.num_context_features),
                "--num-blocks", str(self.num_blocks), "--batch-size", str(self.batch_size), "--layout", self.layout,
                "--seed", str(self.seed), "--dtype", self.dtype, "--dp", "1", "--tp", "1"]
        if self.data_name:
            argv += ["--data", data_path(self.data_name)]
        if self.assume_free_gb > 0:
            argv += ["--assume-free-bytes", str(int(self.assume_free_gb * 1e9))]
        return argv + _switches(resume=self.resume, overwrite=self.overwrite) + list(self.extra_args)


@dataclass(frozen=True)
class TrainSettings:
    """One run of ``scripts/tpu_dflash_train_with_easydel_trainer.py`` on one GPU (dp=1, tp=1).

    Checkpoints go to ``/cache/checkpoints/<draft_name>/run-<step>/`` (``resume`` continues the
    latest); the final draft is exported to ``/drafts/<draft_name>``, the benchmark's ``--draft``.
    """

    cache_name: str
    draft_name: str = DEFAULT_DRAFT_NAME
    max_training_steps: int = 2000
    total_batch_size: int = 8
    num_draft_layers: int = 1
    anchors_per_window: int = 16
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    vocab_chunk_size: int = 8192
    save_steps: int = 500
    log_steps: int = 10
    seed: int = 0
    resume: bool = False
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.cache_name, "cache name")
        check_name(self.draft_name, "draft name")

    @property
    def export_dir(self) -> str:
        return export_path(self.draft_name)

    @property
    def summary_file(self) -> str:
        return f"{CACHE_DIR}/checkpoints/{self.draft_name}.summary.json"

    def argv(self, snapshot: str) -> list[str]:
        argv = ["--cache-dir", cache_path(self.cache_name), "--teacher-snapshot-dir", snapshot,
                "--save-directory", f"{CACHE_DIR}/checkpoints", "--model-name", self.draft_name,
                "--max-training-steps", str(self.max_training_steps), "--total-batch-size", str(self.total_batch_size),
                "--dp", "1", "--tp", "1", "--vocab-chunk-size", str(self.vocab_chunk_size),
                "--save-steps", str(self.save_steps), "--log-steps", str(self.log_steps),
                "--learning-rate", str(self.learning_rate), "--warmup-steps", str(self.warmup_steps),
                "--num-draft-layers", str(self.num_draft_layers), "--anchors-per-window", str(self.anchors_per_window),
                "--seed", str(self.seed), "--export-dir", self.export_dir, "--summary-json", self.summary_file]
        return argv + _switches(resume=self.resume) + list(self.extra_args)


def _snapshot() -> str:
    """The gpt-oss-20b snapshot folder in the weights volume (downloaded on first use, as the benchmark does)."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(MODEL_ID, cache_dir=WEIGHTS_DIR, ignore_patterns=SNAPSHOT_IGNORE)
    weights.commit()
    return path


def _run_script(script: str, argv: list[str], *, jax_gpu: bool) -> None:
    """Run one repo script in the image, streaming its output; a non-zero exit fails the Modal call.

    ``jax_gpu``: pin JAX to CUDA, so that a CUDA plugin that failed to load is an error here and
    not a silent fall back to the CPU (where the 20b teacher would run for days).
    """
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the snapshot is local by now; scripts must not reach the hub
    env["PYTHONPATH"] = os.pathsep.join(p for p in ("/root", env.get("PYTHONPATH")) if p)  # the package's copy
    if jax_gpu:
        env["JAX_PLATFORMS"] = "cuda"
    cmd = [sys.executable, f"{SCRIPTS_DIR}/{script}", *argv]
    print("$ " + shlex.join(cmd), flush=True)
    code = subprocess.run(cmd, env=env, check=False).returncode
    if code != 0:
        hint = " (bad input: see the 'error:' line above)" if code == 2 else ""
        raise RuntimeError(f"{script} exited with code {code}{hint}")


@app.function(gpu=GPU, image=torch_image, volumes={WEIGHTS_DIR: weights, CACHE_DIR: cache_volume},
              memory=65536, timeout=12 * HOUR)
def generate_data(settings: dict[str, Any], prompts_jsonl: str | None = None) -> dict[str, Any]:
    """Prompts + gpt-oss-20b's own greedy continuations (bf16, CUDA torch) -> ``/cache/data/<name>.jsonl``.

    The cache builder reads this file through ``--data``: published drafts are trained on text
    the target regenerated, because acceptance is measured against the target's greedy output.
    ``prompts_jsonl`` is the text of a local prompts file (the entrypoint uploads it); without it
    the script draws its prompts from its default corpus. Returns the data's ``.meta.json``.
    """
    s = DataSettings(**settings)
    if prompts_jsonl:
        Path(s.prompts_file).parent.mkdir(parents=True, exist_ok=True)
        Path(s.prompts_file).write_text(prompts_jsonl)
    try:
        _run_script("generate_teacher_data.py", s.argv(_snapshot(), with_prompts_file=bool(prompts_jsonl)),
                    jax_gpu=False)
    finally:
        cache_volume.commit()  # keep a partial file too: --resume continues it
    return json.loads(Path(s.out_file + ".meta.json").read_text())


@app.function(gpu=GPU, image=jax_image, volumes={WEIGHTS_DIR: weights, CACHE_DIR: cache_volume},
              memory=131072, cpu=8.0, timeout=24 * HOUR)
def build_cache(settings: dict[str, Any]) -> dict[str, Any]:
    """Run the JAX teacher once over the data and write the teacher cache; returns its ``meta.json``."""
    s = CacheSettings(**settings)
    if s.data_name and not Path(data_path(s.data_name)).is_file():
        raise FileNotFoundError(f"{data_path(s.data_name)} is not in the {CACHE_VOLUME} volume: run --step data "
                                "first, or pass --data-name '' to build from the builder's default corpus.")
    try:
        _run_script("tpu_dflash_build_teacher_cache.py", s.argv(_snapshot()), jax_gpu=True)
    finally:
        cache_volume.commit()  # an interrupted build stays resumable
    return json.loads((Path(s.out_dir) / "meta.json").read_text())


@app.function(gpu=GPU, image=jax_image, volumes={WEIGHTS_DIR: weights, CACHE_DIR: cache_volume, DRAFTS_DIR: drafts},
              memory=65536, cpu=8.0, timeout=24 * HOUR)
def train(settings: dict[str, Any]) -> dict[str, Any]:
    """Train the draft from the cache on one GPU and export it; returns the trainer's summary."""
    s = TrainSettings(**settings)
    if not (Path(cache_path(s.cache_name)) / "meta.json").is_file():
        raise FileNotFoundError(f"{cache_path(s.cache_name)} is not in the {CACHE_VOLUME} volume: run --step "
                                "cache first.")
    Path(s.summary_file).parent.mkdir(parents=True, exist_ok=True)
    try:
        _run_script("tpu_dflash_train_with_easydel_trainer.py", s.argv(_snapshot()), jax_gpu=True)
    finally:
        cache_volume.commit()  # checkpoints, even of a run that failed later
        drafts.commit()
    return json.loads(Path(s.summary_file).read_text())


@app.local_entrypoint()
def main(step: str = "all", gpu: str = GPU, data_name: str = DEFAULT_DATA_NAME, prompts_file: str = "",
         chat: bool = False, num_samples: int = 512, max_new_tokens: int = 256, gen_batch_size: int = 64,
         cache_name: str = "", layout: str = "windows", ctx_len: int = 4096, block_size: int = 8,
         num_context_features: int = 4, num_blocks: int = 256, cache_batch_size: int = 1,
         assume_free_gb: float = 0.0, cache_extra: str = "", draft_name: str = DEFAULT_DRAFT_NAME,
         max_training_steps: int = 2000, total_batch_size: int = 8, num_draft_layers: int = 1,
         anchors_per_window: int = 16, learning_rate: float = 3e-4, warmup_steps: int = 0, save_steps: int = 500,
         train_extra: str = "", resume: bool = False, overwrite: bool = False) -> None:
    """Chain the steps (``--step all`` = data, cache, train) on one ``--gpu``; print the benchmark command.

    ``--data-name ''`` builds the cache from the builder's default corpus instead of generated
    data. ``--cache-extra`` / ``--train-extra`` pass further script flags (one shell-quoted string).
    ``--resume`` continues whatever an earlier call left (and skips finished data and caches).
    """
    steps = parse_steps(step)
    if "data" in steps and not data_name:
        raise ValueError("--step data needs a --data-name to write to.")
    # Every setting is checked here, before any GPU is asked for.
    data = DataSettings(data_name=data_name or DEFAULT_DATA_NAME, chat=chat, num_samples=num_samples,
                        max_new_tokens=max_new_tokens, batch_size=gen_batch_size, resume=resume, overwrite=overwrite)
    cache = CacheSettings(
        cache_name=cache_name or default_cache_name(layout, ctx_len, block_size, num_context_features),
        ctx_len=ctx_len, block_size=block_size, num_context_features=num_context_features, num_blocks=num_blocks,
        batch_size=cache_batch_size, layout=layout, data_name=data_name, assume_free_gb=assume_free_gb,
        resume=resume, overwrite=overwrite, extra_args=tuple(shlex.split(cache_extra)))
    training = TrainSettings(
        cache_name=cache.cache_name, draft_name=draft_name, max_training_steps=max_training_steps,
        total_batch_size=total_batch_size, num_draft_layers=num_draft_layers, anchors_per_window=anchors_per_window,
        learning_rate=learning_rate, warmup_steps=warmup_steps, save_steps=save_steps, resume=resume,
        extra_args=tuple(shlex.split(train_extra)))
    prompts_text = Path(prompts_file).read_text() if prompts_file else None

    def on_gpu(fn: modal.Function) -> modal.Function:
        return fn if gpu == GPU else fn.with_options(gpu=gpu)

    if "data" in steps:
        meta = on_gpu(generate_data).remote(asdict(data), prompts_jsonl=prompts_text)
        print(f"data: {data.out_file} in volume {CACHE_VOLUME}: {json.dumps(meta.get('summary', meta))}")
    if "cache" in steps:
        meta = on_gpu(build_cache).remote(asdict(cache))
        print(f"cache: {cache.out_dir} in volume {CACHE_VOLUME}: layout {meta.get('layout')}, "
              f"target_layer_ids {meta.get('target_layer_ids')}, complete {meta.get('complete')}")
    if "train" in steps:
        summary = on_gpu(train).remote(asdict(training))
        out_dir = REPO / "artifacts" / "dflash_train"
        out_dir.mkdir(parents=True, exist_ok=True)
        out_file = out_dir / f"train_{draft_name}_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
        out_file.write_text(json.dumps(summary, indent=1))
        history = summary.get("history") or [{}]
        print(f"train: steps {summary.get('start_step')} -> {summary.get('final_step')}, last log "
              f"{json.dumps(history[-1])}; summary written to {out_file}")
        print(f"draft exported to {training.export_dir} in volume {DRAFTS_VOLUME}; benchmark it with:\n  modal run "
              f"modal/dflash_gptoss20b_benchmark.py --draft {training.export_dir} --block-size {block_size}")
