"""The TPU planner: real AOT compiles for a TPU topology (libtpu, no chip), at tiny shapes.

What is checked, and why:
* the builder's and the trainer's ``--plan-tpu`` compile their own step for ``v5litepod-8`` from a
  folder holding only ``config.json`` (no weights), report the JSON keys of ``REQUIRED_KEYS``, and write
  nothing but the plan;
* the compiler's per-chip argument bytes equal the arithmetic of the draft's parameters, AdamW's
  two moments, the dp-shard of the batch and the tp-shards of the two frozen tables (within 1%:
  the rest is a handful of scalars: the step, Adam's counts, the RNG key and count);
* the same training step with a batch that cannot fit gets ``fits: false`` and the compiler's own
  message (from ``scripts/plan_tpu_run.py``, which also shows it plans the trainer's settings);
* the planner's abstract shardings equal those of a real run: the teacher as ``JaxTeacher`` loads
  it and the draft state as a real ``DFlashTrainer`` shards it (same leaves, shapes and specs);
* the topology table agrees with libtpu's device counts, the presets are gpt-oss-20b/120b, the
  batch search finds the largest fitting multiple of dp, and bad input is one ``error:`` line with
  exit code 2 before jax is imported.

Three compiles in all (~25-50 s each on a 2-core machine), shared through module fixtures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("easydel")
if importlib.util.find_spec("libtpu") is None:  # pragma: no cover - a broken set-up, not a reason to skip
    pytest.fail("libtpu is not installed: bash scripts/setup_env.sh installs it (extra 'tpu-plan')", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def _quiet_libtpu():
    """Silence libtpu's "no TPU here" notices in this module's compiles only: set at import time these
    variables leaked into the whole session, where a cluster check (test_multihost) reads them."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_ACCELERATOR_TYPE", "v5litepod-8")):
            if name not in os.environ:
                mp.setenv(name, value)
        yield

REPO = Path(__file__).resolve().parents[1]
TOPOLOGY = "v5litepod-8"
CTX, B, K, ANCHORS, BATCH, DP, TP = 64, 8, 3, 4, 8, 2, 4
HUGE_BATCH = 2**18  # 2^17 rows per chip x 64 x 1536 bf16 features = 24 GiB of batch alone: over v5e's 15.75 GiB


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    rc = _script(script).main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


# A small GPT-OSS whose every sharded dimension is a multiple of the TPU's (8, 128) tiles on each of the
# tp=4 shards (hidden 512, 4 heads of 128, intermediate 1024), so the compiler's argument bytes are the
# plain arithmetic: at the tiny teacher's widths (96, 24, ...) tile padding adds ~15%, at gpt-oss's ~0.
ALIGNED = {"hidden_size": 512, "head_dim": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
           "intermediate_size": 1024}


@pytest.fixture(scope="module")
def config_only(tiny_teacher_dir: Path, tmp_path_factory) -> Path:
    """A folder holding only a config.json (the tiny teacher's, widened to ALIGNED): no weights exist."""
    folder = tmp_path_factory.mktemp("config_only")
    cfg = json.loads((tiny_teacher_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **ALIGNED}))
    return folder


def _train_flags(config_only: Path, root: Path, batch: int) -> list[str]:
    return ["--teacher-snapshot-dir", str(config_only), "--cache-dir", str(root / "no_cache_yet"),
            "--save-directory", str(root / "no_checkpoints"), "--max-training-steps", "100",
            "--total-batch-size", str(batch), "--dp", str(DP), "--tp", str(TP), "--num-draft-layers", "1",
            "--vocab-chunk-size", "1024", "--anchors-per-window", str(ANCHORS), "--mask-token-id", "1",
            "--layout", "windows", "--ctx-len", str(CTX), "--block-size", str(B), "--num-context-features", str(K)]


@pytest.fixture(scope="module")
def cache_plan(config_only: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache_plan")
    argv = ["--model-snapshot-dir", str(config_only), "--ctx-len", str(CTX), "--block-size", str(B),
            "--num-context-features", str(K), "--num-blocks", "64", "--batch-size", "8", "--layout", "windows",
            "--dp", str(DP), "--tp", str(TP), "--out-dir", str(root / "no_cache"), "--plan-tpu", TOPOLOGY,
            "--plan-json", str(root / "plan.json")]
    rc = _script("tpu_dflash_build_teacher_cache").main(argv)
    return {"rc": rc, "root": root, "plan": json.loads((root / "plan.json").read_text())}


@pytest.fixture(scope="module")
def train_plans(config_only: Path, tmp_path_factory) -> dict:
    """The trainer's own --plan-tpu (fits) and plan_tpu_run.py's train step at a batch that cannot fit.

    plan_tpu_run.py runs as a real subprocess at the same time (each compile is single-threaded: on a
    2-core CI machine the two overlap instead of adding up).
    """
    root = tmp_path_factory.mktemp("train_plan")
    flags = _train_flags(config_only, root, HUGE_BATCH)
    flags[flags.index("--teacher-snapshot-dir")] = "--model-snapshot-dir"
    for plan_only in ("--save-directory",):
        i = flags.index(plan_only)
        del flags[i:i + 2]
    huge = subprocess.Popen([sys.executable, str(REPO / "scripts" / "plan_tpu_run.py"), *flags, "--steps", "train",
                             "--topology", TOPOLOGY, "--plan-json", str(root / "huge.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
    rc = _script("tpu_dflash_train_with_easydel_trainer").main(
        [*_train_flags(config_only, root, BATCH), "--plan-tpu", TOPOLOGY, "--plan-json", str(root / "fit.json")])
    out, _ = huge.communicate(timeout=900)
    assert huge.returncode == 0, out
    return {"rc": rc, "rc_huge": huge.returncode, "root": root, "fit": json.loads((root / "fit.json").read_text()),
            "huge": json.loads((root / "huge.json").read_text())}


REQUIRED_KEYS = {"topology", "chips", "mesh", "step", "per_chip_bytes", "hbm_bytes_per_chip", "fits",
                 "flops_per_step_per_chip", "estimated_seconds"}


def test_cache_plan_compiles_the_builders_forward(cache_plan) -> None:
    p = cache_plan["plan"]
    assert cache_plan["rc"] == 0
    assert REQUIRED_KEYS <= p.keys()
    assert (p["topology"], p["chips"], p["mesh"], p["step"], p["fits"]) == (TOPOLOGY, 8, {"dp": DP, "tp": TP},
                                                                           "cache", True)
    m = p["per_chip_bytes"]
    # the plan's peak: the compiler's, and never below the arguments and outputs resident at the end
    assert m["peak"] == max(m["compiler_peak"], m["arguments"] + m["outputs"] - m["aliased"]) > 0
    assert p["hbm_bytes_per_chip"] == int(15.75 * 2**30)
    assert p["flops_per_step_per_chip"] > 0 and p["estimated_seconds"] > 0 and p["steps"] == 64 // 8
    # the float32 teacher runs at Precision.HIGHEST: six bf16 passes per product in the time estimate
    assert p["matmul_passes"] == 6 and np.isclose(
        p["estimated_seconds"], 8 * 6 * p["flops_per_step_per_chip"] / (p["mfu"] * p["peak_flops_per_chip"]))
    # scripts/tpu_plan_table.py recomputes the hours from the JSON with the same rule (also for plans without the field)
    from dflash_gptoss.planning.cli import estimated_hours

    old_plan = {k: v for k, v in p.items() if k != "matmul_passes"}
    assert np.isclose(estimated_hours(p), p["estimated_seconds"] / 3600)
    assert np.isclose(estimated_hours(old_plan), p["estimated_seconds"] / 3600)
    # the window's token ids (int32 [8, 64]) over dp: 4 rows x 64 x 4 bytes on each chip
    assert m["arguments_breakdown"]["batch"] == 4 * CTX * 4
    assert p["io"]["cache_bytes_on_disk"] > 0 and p["settings"]["target_layer_ids"] == [1, 2, 3]
    assert sorted(x.name for x in cache_plan["root"].iterdir()) == ["plan.json"]  # nothing else written


def _draft_param_bytes_per_chip(h: int, heads: int, kv: int, d: int, inter: int, layers: int, k: int) -> int:
    """float32 bytes of one chip's share of the draft's parameters under its Megatron rules (tp=4)."""
    col = lambda din, dout: din * dout // TP  # noqa: E731 - [in, out] split on out (q/k/v/gate/up/fc)
    row = lambda din, dout: din * dout // TP  # noqa: E731 - [in, out] split on in (o/down)
    per_layer = (col(h, heads * d) + 2 * col(h, kv * d) + row(heads * d, h) + 2 * d  # attention + q/k norms
                 + 2 * col(h, inter) + row(inter, h) + 2 * h)  # MLP + the two layer norms
    return 4 * (col(k * h, h) + 2 * h + layers * per_layer)  # fc, hidden_norm + final norm


def test_train_plan_argument_bytes_are_the_arithmetic(train_plans, config_only: Path) -> None:
    """Within 1%: what the arithmetic leaves out is a few scalars (step, Adam's count, the RNG key and
    count) and the small int32 block arrays ([rows, 4, 8]), each padded to one tile: < 0.1 MB of ~15 MB."""
    p = train_plans["fit"]
    assert train_plans["rc"] == 0 and p["fits"] and p["step"] == "train" and REQUIRED_KEYS <= p.keys()
    cfg = json.loads((config_only / "config.json").read_text())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    params = _draft_param_bytes_per_chip(h, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                                         cfg["intermediate_size"], 1, K)
    adam = 2 * params  # AdamW's mu and nu, sharded like their parameters
    rows = BATCH // DP
    batch = rows * (CTX * K * h * 2 + ANCHORS * B * 4 + ANCHORS * 4 + ANCHORS * 4)  # features bf16 bits + ids/pos/w
    tables = 2 * v * h * 4 // TP  # embed_tokens and lm_head, float32, vocab rows over tp
    expected = params + adam + batch + tables
    got = p["per_chip_bytes"]["arguments"]
    assert abs(got - expected) <= 0.01 * expected, (got, expected, p["per_chip_bytes"]["arguments_breakdown"])
    parts = p["per_chip_bytes"]["arguments_breakdown"]
    assert (parts["parameters"], parts["batch"], parts["frozen_tables"]) == (params, batch, tables)
    assert p["flops_per_step_per_chip"] > 0 and p["steps"] == 100 and p["estimated_seconds"] > 0
    # a windows row: features (bf16 bits), token ids and labels (int32), response flags (uint8)
    assert p["io"]["cache_bytes_read_per_step"] == BATCH * (CTX * K * h * 2 + 2 * CTX * 4 + CTX)
    root = train_plans["root"]
    assert not (root / "no_checkpoints").exists() and not (root / "no_cache_yet").exists()


def test_batch_that_cannot_fit_gets_the_compilers_message(train_plans) -> None:
    fit, huge = train_plans["fit"], train_plans["huge"]
    assert train_plans["rc_huge"] == 0 and REQUIRED_KEYS <= huge.keys()
    assert huge["fits"] is False and huge["estimated_seconds"] is None and huge["flops_per_step_per_chip"] is None
    msg = huge["compiler_message"]
    assert "RESOURCE_EXHAUSTED" in msg or "hbm" in msg.lower(), msg
    assert "Traceback" not in msg
    assert huge["per_chip_bytes"]["arguments"] > huge["hbm_bytes_per_chip"]  # the batch alone exceeds HBM
    # plan_tpu_run.py planned the trainer's own settings: everything but the batch agrees
    drop = ("total_batch_size",)
    assert {k: v for k, v in fit["settings"].items() if k not in drop} == \
        {k: v for k, v in huge["settings"].items() if k not in drop}


@pytest.fixture(scope="module")
def real_teacher(tiny_teacher_dir: Path):
    from dflash_gptoss.teacher_jax import JaxTeacher

    return JaxTeacher(tiny_teacher_dir, [1, 2, 3], dp=DP, tp=TP)


def _placement(spec) -> tuple:
    """A PartitionSpec without trailing Nones: P(None,) and P() place an array the same way."""
    axes = list(spec)
    while axes and axes[-1] is None:
        axes.pop()
    return tuple(axes)


def _spec_tree(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype), _placement(leaf.sharding.spec))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_teacher_shardings_are_the_real_loads(real_teacher, tiny_teacher_dir: Path) -> None:
    """The planner's abstract teacher state on the same (CPU) mesh: same parameters, shapes, specs."""
    from flax import nnx

    from dflash_gptoss.planning.tpu_plan import teacher_state_shardings, with_shardings
    from dflash_gptoss.teacher_easydel_fixes import lazy_easydel_gptoss

    lazy = lazy_easydel_gptoss(tiny_teacher_dir, dp=DP, tp=TP, dtype="float32", mesh=real_teacher.mesh)
    _, state, _ = nnx.split(lazy, nnx.Param, ...)
    planned = _spec_tree(with_shardings(state, teacher_state_shardings(lazy, state, real_teacher.mesh)))
    real = _spec_tree(nnx.state(real_teacher.model, nnx.Param))
    assert planned == real
    assert sum("tp" in str(spec) for _, _, spec in real.values()) > len(real) // 3  # really sharded over tp


def test_draft_state_shardings_are_a_real_trainers(real_teacher, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """The planner's abstract optimizer state equals a real DFlashTrainer's: leaves, shapes, dtypes, specs."""
    import jax
    import jax.numpy as jnp
    from easydel.infra.base_state import EasyDeLState

    from dflash_gptoss.cache_builder import build_teacher_cache
    from dflash_gptoss.easydel_dflash_draft_model import lazy_draft_model
    from dflash_gptoss.easydel_dflash_trainer import DFlashTrainingSettings, build_trainer, training_arguments
    from dflash_gptoss.planning.tpu_plan import easydel_state_shardings, with_shardings

    build_teacher_cache(tiny_teacher_dir, tmp_path / "cache", teacher=real_teacher, progress=False, ctx_len=32,
                        block_size=B, num_context_features=K, num_blocks=16, batch_size=16, layout="windows",
                        dp=DP, tp=TP, seed=0)
    s = DFlashTrainingSettings(cache_dir=str(tmp_path / "cache"), teacher_snapshot_dir=str(tiny_teacher_dir),
                               save_directory=str(tmp_path / "ckpt"), total_batch_size=BATCH, dp=DP, tp=TP,
                               num_draft_layers=2, mask_token_id=1, progress_bar="json", max_training_steps=10)
    trainer, draft_config = build_trainer(s)
    model = lazy_draft_model(draft_config, dp=DP, tp=TP, mesh=trainer.model.mesh, seed=s.seed)
    tx, _ = training_arguments(s, anchors=ANCHORS, block_size=B).get_optimizer_and_scheduler(10)
    gdef, gs, go = model.split_module()
    shapes = jax.eval_shape(lambda a, b: EasyDeLState.create(step=jnp.zeros((), jnp.int32), graphdef=gdef,
                                                             graphstate=a, graphother=b, tx=tx, init_opt_state=True),
                            gs, go)
    planned = with_shardings(shapes, easydel_state_shardings(shapes, model._get_partition_rules(None),
                                                             trainer.model.mesh))
    real = trainer.model_state
    for part in ("graphstate", "opt_state"):
        assert _spec_tree(getattr(planned, part)) == _spec_tree(getattr(real, part)), part
    assert trainer.state_shardings.graphstate is not None


KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}  # libtpu's device_kind


def test_topology_table_matches_libtpu() -> None:
    from dflash_gptoss.planning.topologies import TOPOLOGIES, find_topology, topology_description

    for t in TOPOLOGIES:
        devices = topology_description(t).devices
        assert len(devices) == t.devices and len({d.process_index for d in devices}) == t.hosts, t
        assert {d.device_kind for d in devices} == {KINDS[t.chip.name]}, t
    assert find_topology("v5e-8") is find_topology("v5litepod-8")
    assert {t.accelerator_type for t in TOPOLOGIES} >= {"v4-8", "v4-16", "v5litepod-8", "v5p-8", "v5p-16", "v6e-8"}


def test_presets_are_the_published_configs() -> None:
    from dflash_gptoss.planning.model_presets import PRESETS, preset_dir, resolve_config_dir

    def params(c: dict) -> int:  # every tensor of the checkpoint, dequantized
        h, v, i, e = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_local_experts"]
        q, kv = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        attn = h * q + q + 2 * (h * kv + kv) + q * h + h + c["num_attention_heads"]
        moe = h * e + e + e * (h * 2 * i + 2 * i + i * h + h)
        return 2 * v * h + h + c["num_hidden_layers"] * (attn + moe + 2 * h)

    cfgs = {n: json.loads((preset_dir(n) / "config.json").read_text()) for n in PRESETS}
    for c in cfgs.values():
        assert (c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["num_key_value_heads"],
                c["head_dim"], c["sliding_window"]) == (2880, 201088, 64, 8, 64, 128)
        assert len(c["layer_types"]) == c["num_hidden_layers"] and c["rope_scaling"]["rope_type"] == "yarn"
    assert (cfgs["gpt-oss-20b"]["num_hidden_layers"], cfgs["gpt-oss-20b"]["num_local_experts"]) == (24, 32)
    assert (cfgs["gpt-oss-120b"]["num_hidden_layers"], cfgs["gpt-oss-120b"]["num_local_experts"]) == (36, 128)
    # the model cards' totals: 21B and 117B parameters (rounded)
    assert round(params(cfgs["gpt-oss-20b"]) / 1e9) == 21 and round(params(cfgs["gpt-oss-120b"]) / 1e9) == 117
    assert resolve_config_dir("gpt-oss-20b") == preset_dir("gpt-oss-20b")


def test_auto_batch_finds_the_largest_fitting_multiple_of_dp() -> None:
    """The search alone: a batch fits iff <= the limit; every try is logged, each batch compiled once."""
    from dflash_gptoss.planning.cli import largest_fitting_batch
    from dflash_gptoss.planning.tpu_plan import StepPlan

    def plan_at(limit: int):
        calls: list[int] = []

        def at(b: int) -> StepPlan:
            calls.append(b)
            return StepPlan(step="train", topology="t", topology_name="t", chips=8, hosts=1, mesh={}, settings={},
                            per_chip_bytes={"peak": b}, hbm_bytes_per_chip=limit, chip_nominal_hbm="", fits=b <= limit,
                            flops_per_step_per_chip=None, steps=1, mfu=0.4, matmul_passes=1, peak_flops_per_chip=1.0,
                            peak_flops_source="", estimated_seconds_per_step=None, estimated_seconds=None,
                            compile_seconds=0.0)
        return at, calls

    for start, limit, dp, want in ((4, 100, 2, 100), (64, 100, 2, 100), (64, 37, 2, 36), (8, 8, 4, 8),
                                   (2, 3000, 2, 3000), (6, 1, 2, 2)):
        at, calls = plan_at(limit)
        best = largest_fitting_batch(at, start, dp, limit=4096, log=lambda _m: None)
        assert best.per_chip_bytes["peak"] == want and len(calls) == len(set(calls)), (start, limit, dp, calls)
        assert best.fits == (want <= limit)


BAD = [
    (["--plan-tpu", "v9-8"], "unknown TPU topology 'v9-8'; known: v4-8, v4-16, v5litepod-8, v5e-8, v5p-8"),
    (["--plan-tpu", "v4-8"], "--dp 2 x --tp 4 = 8 but v4-8 has 4 devices (megacore: one device per chip); "
                             "use one of: dp=4 tp=1, dp=2 tp=2, dp=1 tp=4"),
    (["--plan-tpu", "v5e-8", "--batch-size", "3"], "--batch-size 3 is not divisible by --dp 2"),
    (["--plan-tpu", "v5e-8", "--mfu", "0"], "--mfu 0.0 must lie in (0, 1]"),
    (["--plan-tpu", "v5e-8", "--mfu", "1.5"], "--mfu 1.5 must lie in (0, 1]"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_is_one_error_line(extra: list[str], message: str, config_only: Path, tmp_path: Path,
                                     capsys) -> None:
    argv = ["--model-snapshot-dir", str(config_only), "--ctx-len", "64", "--num-blocks", "64", "--dp", "2", "--tp",
            "4", "--out-dir", str(tmp_path / "o"), *extra]
    rc, out, err = _run("tpu_dflash_build_teacher_cache", argv, capsys)
    assert rc == 2 and err.strip().splitlines() == [err.strip()] and err.startswith("error: "), err
    assert message in err, err
    assert not (tmp_path / "o").exists()


def test_folder_without_config_and_jax_never_imported(tmp_path: Path) -> None:
    """A real subprocess of plan_tpu_run.py: one error line, exit code 2, jax not even imported."""
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print('JAX_IMPORTED' if 'jax' in sys.modules else 'NO_JAX', file=sys.stderr); raise\n")
    (tmp_path / "weights_only").mkdir()
    for folder, message in ((tmp_path / "weights_only", "has no config.json"),
                            ("gpt-oss-7b", "is neither a folder nor a model preset")):
        r = subprocess.run([sys.executable, "-c", probe, str(REPO / "scripts" / "plan_tpu_run.py"), "--topology",
                            "v6e-8", "--model-snapshot-dir", str(folder), "--ctx-len", "64", "--num-blocks", "64",
                            "--max-training-steps", "10", "--dp", "2", "--tp", "4"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 2, r.stderr
        assert lines[0].startswith("error: ") and message in lines[0] and lines[1] == "NO_JAX", r.stderr


def test_train_plan_refuses_geometry_it_cannot_know(config_only: Path, tmp_path: Path, capsys) -> None:
    flags = _train_flags(config_only, tmp_path, BATCH)
    i = flags.index("--ctx-len")
    del flags[i:i + 2]
    rc, _, err = _run("tpu_dflash_train_with_easydel_trainer", [*flags, "--plan-tpu", "v5e-8"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "give the cache geometry with --ctx-len" in err, err


def test_plan_numbers_are_consistent(train_plans) -> None:
    """Time = FLOPs / (MFU x peak) x steps; the read rate = bytes per step / that time (per host)."""
    p = train_plans["fit"]
    assert p["matmul_passes"] == 1  # the trainer's matmuls run at DEFAULT precision (one bf16 pass)
    per_step = p["flops_per_step_per_chip"] / (p["mfu"] * p["peak_flops_per_chip"])
    assert np.isclose(p["estimated_seconds_per_step"], per_step) and np.isclose(p["estimated_seconds"],
                                                                               per_step * p["steps"])
    assert np.isclose(p["io"]["read_bytes_per_second_per_host"], p["io"]["cache_bytes_read_per_step"] / per_step)
    assert p["peak_flops_per_chip"] == 197e12 and "compile-time plan" in p["kind"]
