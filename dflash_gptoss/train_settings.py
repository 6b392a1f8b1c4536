"""Everything a training run needs, each setting defined once: its default, its type and its flag.

The trainer's command line (``scripts/tpu_dflash_train_with_easydel_trainer.py``) is built from
these fields (``cli_types.add_settings_arguments``) and the TPU planner builds the same dataclass
from the same parsed flags, so a plan and a run cannot disagree on a setting. Importing this module
is cheap (no jax), so a bad flag is refused before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from dflash_gptoss.cli_types import non_negative_float, non_negative_int, positive_float, positive_int, setting

LR_SCHEDULES = ("cosine", "linear", "constant")
VERIFY_CACHE_MODES = ("auto", "size", "full")


@dataclass(kw_only=True)
class DFlashTrainingSettings:
    """One training run. Fields made with ``setting`` are the trainer's flags (``--name-with-dashes``)."""

    cache_dir: str = setting(
        help="teacher cache directory written by scripts/tpu_dflash_build_teacher_cache.py (layout 'blocks' or "
             "'windows').")
    teacher_snapshot_dir: str = setting(
        help="the teacher's HF snapshot (config.json + safetensors): its frozen embed_tokens and lm_head are read "
             "from here; it must be the teacher the cache was built with.")
    save_directory: str = setting(help="checkpoints go to SAVE_DIRECTORY/MODEL_NAME/run-<step>/.")
    model_name: str = setting("dflash-draft", help="run name under --save-directory.")
    max_training_steps: int = setting(100, type=positive_int, required=True, help="optimizer steps to run.")
    total_batch_size: int = setting(
        8, type=positive_int,
        help="GLOBAL batch per step (cache rows: blocks, or windows with many anchors each); sharded over dp, so "
             "it must be divisible by --dp.")
    dp: int = setting(1, type=positive_int, help="data-parallel mesh size (batch axis).")
    tp: int = setting(
        1, type=positive_int,
        help="tensor-parallel mesh size; the lm_head vocab rows are split over it (V %% tp == 0); dp*tp must equal "
             "the number of devices (of all hosts together past one host).")
    vocab_chunk_size: int = setting(
        8192, type=positive_int,
        help="vocab rows per chunk of the online log-sum-exp (memory ~ rows x chunk per device).")
    save_steps: int | None = setting(None, type=positive_int,
                                     help="checkpoint every N steps (the last step is always saved).")
    log_steps: int = setting(
        10, type=positive_int,
        help="log loss, per-slot accuracy, expected accepted length, throughput, lr every N steps.")
    learning_rate: float = setting(3e-4, type=positive_float, help="peak AdamW learning rate.")
    lr_schedule: str = setting("cosine", choices=LR_SCHEDULES, help="decay after warmup.")
    warmup_steps: int = setting(0, type=non_negative_int, help="linear warmup steps.")
    weight_decay: float = setting(0.0, type=non_negative_float, help="AdamW weight decay.")
    num_draft_layers: int = setting(1, type=positive_int,
                                    help="draft transformer layers (the published gpt-oss drafts: 8).")
    loss_decay_gamma: float | None = setting(
        None, type=non_negative_float,
        help="slot k's loss weight is exp(-(k-1)/gamma); 0 = uniform. Default: the published recipes' 4 for block "
             "size <= 8, 7 above.")
    anchors_per_window: int = setting(
        16, type=positive_int,
        help="'windows' caches only: anchors sampled per window, afresh each step (capped at ctx_len - block_size "
             "+ 1).")
    block_size: int | None = None  # from the cache's meta.json; set here only by library callers
    mask_token_id: int | None = setting(
        None, type=int,
        help="MASK token id (default: 200000 for gpt-oss vocabularies, else the tokenizer's <|mask|>).")
    gradient_accumulation_steps: int = setting(
        1, type=positive_int,
        help="minibatches of --total-batch-size rows accumulated per optimizer step (one step reads "
             "total_batch_size * accumulation cache rows; gradients are averaged).")
    seed: int = setting(0, type=int, help="draft init, data order and anchor sampling seed.")
    resume: bool = setting(
        False,
        help="continue from the latest run-<step> under SAVE_DIRECTORY/MODEL_NAME (verified against its manifest; "
             "the draft's shape and data settings must match the run's). An error when there is no checkpoint, so "
             "a mistyped --model-name never restarts training silently.")
    resume_if_possible: bool = setting(
        False,
        help="like --resume, but start afresh when SAVE_DIRECTORY/MODEL_NAME holds no checkpoint (for scripts that "
             "rerun one command). Without either flag, a folder that already holds checkpoints is refused.")
    allow_new_cache: bool = setting(
        False,
        help="with --resume: continue although --cache-dir (or --eval-cache-dir) is not the cache the run trained "
             "on (a resume onto another cache is refused otherwise); the switch is recorded in the run's "
             "dflash_run.json.")
    export_dir: str | None = setting(
        None,
        help="after training, write the final draft as a torch/HF folder (config.json + model.safetensors + its "
             "modeling code, loadable with AutoModel and trust_remote_code) that the benchmark and serving engines "
             "load. Checked before training (a new or empty folder, or an earlier draft, which is replaced); "
             "written to a temporary folder, checked (--export-check-blocks), then renamed into place.")
    progress_bar: str = "tqdm"  # easydel's progress bar ("json" in tests)
    verify_cache: str = setting(
        "auto", choices=VERIFY_CACHE_MODES,
        help="how deeply the cache is checked against its manifest before training: 'size' (every file present at "
             "its size; instant), 'full' (every byte re-hashed, ~1.4 GB/s), 'auto' (full up to 4 GiB, else size; "
             "scripts/dflash_verify.py checks a large cache fully).")
    summary_json: str | None = setting(
        None, help="write the run summary here (per-step history, eval_history, export_check).")
    eval_cache_dir: str | None = setting(
        None,
        help="a HELD-OUT teacher cache (same teacher and geometry as --cache-dir, built from data the training "
             "cache never saw): its fixed seeded blocks are scored at the first step, every --eval-steps and the "
             "last step (loss, per-slot accuracy, teacher-forced accepted length as the benchmark counts it: mean, "
             "median, p90, histogram).")
    eval_steps: int | None = setting(
        None, type=positive_int,
        help="evaluate on --eval-cache-dir every N steps (besides the first and the last).")
    keep_best: bool = setting(
        False,
        help="export the evaluated step with the best held-out mean accepted length instead of the last (among "
             "this run's evaluations; needs --eval-cache-dir).")
    eval_temperature: float | None = setting(
        None, type=float,
        help="also report, at each evaluation, the expected accepted length when sampling at this temperature "
             "(> 0) with the draft's argmax proposals: 1 + sum_k prod_{j<=k} p_j(x_j), p the teacher's law at T, "
             "computed once at start from the teacher (needs --eval-cache-dir, windows layout).")
    eval_top_k: int = setting(
        32, type=positive_int,
        help="with --eval-temperature: teacher probabilities kept per position; a proposal outside them bounds the "
             "figure, reported as lower-upper.")
    export_check_blocks: int = setting(
        1024, type=positive_int,
        help="blocks on which the exported torch draft must reproduce the JAX draft's accepted length (within "
             "0.02) and slot accuracies (within 0.01) before the export is put in place; held-out blocks when "
             "--eval-cache-dir is given, else training-cache blocks.")
