"""Know before you rent: compile a real run's own step for a named TPU, on a CPU, and read the bill.

The invariant: a plan compiles **what the run executes**, never a model of it. The cache step is
the builder's jitted teacher forward (:func:`dflash_gptoss.teacher_jax.teacher_forward_fn`), the
training step is the trainer's jitted optimizer step (:func:`dflash_gptoss.train_step.make_train_step`),
both with the run's shardings on a mesh over the devices of a TPU topology from
``jax.experimental.topologies`` (libtpu compiles for it; no chip is needed). Parameters, optimizer
state, batch and frozen tables are abstract (``jax.ShapeDtypeStruct`` with a ``NamedSharding``):
no weight is read, ``config.json`` alone is enough, and nothing is written but the plan.

From the compiled program come the per-chip figures the compiler itself computed:
``memory_analysis()`` (arguments, outputs, temporaries, peak) and ``cost_analysis()["flops"]``.
A program that does not fit does not compile (``RESOURCE_EXHAUSTED`` / ``CompileTimeHbmOom``);
the plan then says ``fits: false`` and keeps the compiler's own lines. The time of the whole run
is an ESTIMATE: FLOPs per step / (MFU x the chip's documented peak bf16 FLOP/s), times the steps.
It is a compile-time plan, not a run.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dflash_gptoss.planning.topologies import GIB, TpuTopology, check_mesh, find_topology

DEFAULT_MFU = 0.4
"""Assumed model FLOPs utilisation for the time estimate (a flag; not measured here)."""
HIGHEST_PRECISION_PASSES = 6
"""bfloat16 MXU passes per float32 product at ``Precision.HIGHEST`` on TPU (``jax.lax.Precision``'s
docstring). The float32 teacher runs at HIGHEST (``easydel_gptoss_fixes.lazy_easydel_gptoss``), so its
time estimate counts each FLOP six times; bf16 and DEFAULT-precision programs count it once."""


def matmul_passes(step: str, dtype: str) -> int:
    """bf16 MXU passes per FLOP a step's time estimate counts: 6 for the float32 teacher (HIGHEST), else 1.

    The trainer's draft runs at the default precision (``easydel_dflash_draft_model``: ``precision=None``).
    """
    return HIGHEST_PRECISION_PASSES if step == "cache" and dtype == "float32" else 1


# Documented throughput limits of Compute Engine zonal persistent disks per VM instance, MiB/s:
# (balanced or SSD, extreme on large N2 VMs). Source: https://cloud.google.com/compute/docs/disks/performance
# ("Throughput limits for zonal Persistent Disk").
PD_LIMITS_MIBPS = {"read": (1200, 4000), "write": (1200, 3000)}
MIB = 1024**2

_OOM_PATTERNS = ("RESOURCE_EXHAUSTED", "CompileTimeHbmOom", "Ran out of memory", "would exceed memory",
                 "allocation_size_words")


class PlanInputError(ValueError):
    """A plan request that cannot be planned (the message names the value and the fix)."""


class PlanCompileError(RuntimeError):
    """The compiler refused the program for a reason other than memory (not a fit verdict)."""


@dataclass
class StepPlan:
    """Everything one plan reports; ``to_json`` is the ``--plan-json`` document."""

    step: str  # "cache" or "train"
    topology: str
    topology_name: str  # what get_topology_desc was given, e.g. "v5e:2x4"
    chips: int
    hosts: int
    mesh: dict[str, int]
    settings: dict[str, Any]
    per_chip_bytes: dict[str, Any]
    hbm_bytes_per_chip: int
    chip_nominal_hbm: str
    fits: bool
    flops_per_step_per_chip: float | None
    steps: int
    mfu: float
    matmul_passes: int  # bf16 MXU passes per FLOP in the estimate (6: float32 at Precision.HIGHEST)
    peak_flops_per_chip: float
    peak_flops_source: str
    estimated_seconds_per_step: float | None
    estimated_seconds: float | None
    compile_seconds: float
    io: dict[str, Any] = field(default_factory=dict)
    compiler_message: str | None = None
    verdict: str = ""

    @property
    def headroom_bytes(self) -> int | None:
        peak = self.per_chip_bytes.get("peak")
        return None if peak is None else self.hbm_bytes_per_chip - int(peak)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["headroom_bytes"] = self.headroom_bytes
        doc["estimated_hours"] = None if self.estimated_seconds is None else self.estimated_seconds / 3600
        doc["kind"] = "compile-time plan (AOT compilation for the TPU topology), not a run"
        return doc


# ------------------------------------------------------------------------------ validation (no jax)
def validate_plan_request(topology: str, *, dp: int, tp: int, mfu: float, batch: int, batch_flag: str,
                          model: str | Path) -> tuple[TpuTopology, Path]:
    """Every cheap check, before anything heavy: (topology, config folder) or PlanInputError."""
    from dflash_gptoss.planning.model_presets import resolve_config_dir

    try:
        topo = find_topology(topology)
        check_mesh(topo, dp, tp)
        config_dir = resolve_config_dir(model)
    except ValueError as exc:
        raise PlanInputError(str(exc)) from exc
    if not (isinstance(mfu, float | int) and 0 < mfu <= 1):
        raise PlanInputError(f"--mfu {mfu} must lie in (0, 1] (a fraction of the chip's peak bf16 FLOP/s, "
                             f"e.g. {DEFAULT_MFU})")
    if batch % dp:
        raise PlanInputError(f"{batch_flag} {batch} is not divisible by --dp {dp}: the batch is sharded over dp; "
                             f"use a multiple of {dp}")
    from dflash_gptoss.teacher_snapshot import SnapshotError, read_config

    try:
        read_config(config_dir)  # parses, GPT-OSS, the sizes a plan reads (config.json alone is enough here)
    except SnapshotError as exc:
        raise PlanInputError(f"{exc} (or name a preset: gpt-oss-20b, gpt-oss-120b)") from exc
    return topo, config_dir


# ------------------------------------------------------------------------------ abstract arguments
def _leaf_key(k: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def with_shardings(tree: Any, shardings: Any) -> Any:
    """``tree`` of shaped leaves -> the same tree of ``ShapeDtypeStruct`` carrying ``shardings`` (None: keep)."""
    import jax

    def one(leaf: Any, sharding: Any) -> Any:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map(one, tree, shardings)


def per_chip_nbytes(abstract: Any) -> int:
    """Bytes one device holds of an abstract tree: each leaf's shard shape times its item size."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * int(leaf.dtype.itemsize)
    return total


def easydel_state_shardings(tree: Any, rules: Any, mesh: Any) -> Any:
    """The shardings easydel gives ``tree`` (``EasyDeLState.shard_state``'s rule, without placing arrays).

    Partition rules matched on the leaf paths, sanitised against each leaf's shape, then
    corrected to a ``NamedSharding`` on ``mesh``, exactly the three calls ``shard_state`` makes
    (``tests/test_tpu_plan.py`` checks the result equals a real trainer's ``state_shardings``).
    """
    import jax
    from easydel.infra.base_state import _sanitize_partition_specs_for_shape_tree
    from eformer import escale as es
    from eformer.escale import match_partition_rules
    from jax.sharding import PartitionSpec

    specs = match_partition_rules(rules, tree)
    specs, _ = _sanitize_partition_specs_for_shape_tree(partition_specs=specs, shape_tree=tree, mesh=mesh)
    with mesh:
        return jax.tree_util.tree_map(
            lambda spec, leaf: es.get_corrected_named_sharding(tuple(leaf.shape), spec)
            if isinstance(spec, PartitionSpec) and hasattr(leaf, "shape") else None,
            specs, tree)


def teacher_state_shardings(model: Any, state: Any, mesh: Any) -> Any:
    """Shardings of the teacher's ``nnx.split`` state as the real load places it.

    Parameters: easydel's own shard functions' specs (``match_partition_rules`` on the parameter
    shape tree, then ``sanitize_partition_specs_for_shape_tree``, as ``_make_shard_fns``);
    the non-parameter leaves (the rngs' key and count) have no rule and are replicated.
    """
    import jax
    from easydel.infra.base_state import _sanitize_partition_specs_for_shape_tree
    from easydel.utils.traversals import flatten_dict
    from eformer.escale import match_partition_rules
    from jax.sharding import NamedSharding, PartitionSpec

    shape_tree = model.graphtree_params_shape
    specs = match_partition_rules(model._get_partition_rules(None), shape_tree)
    specs, _ = _sanitize_partition_specs_for_shape_tree(partition_specs=specs, shape_tree=shape_tree, mesh=mesh)
    flat = flatten_dict(specs)

    def one(path: Any, _leaf: Any) -> Any:
        names = tuple(_leaf_key(k) for k in path)
        if names and names[-1] == "value":
            names = names[:-1]
        return NamedSharding(mesh, flat.get(names, PartitionSpec()))

    return jax.tree_util.tree_map_with_path(one, state)


# ------------------------------------------------------------------------------ compile and measure
def _compiler_lines(message: str, limit: int = 40) -> str:
    """The compiler's own lines (first ``limit``), without Python's traceback framing."""
    lines = [ln.rstrip() for ln in message.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:limit])


def _is_out_of_memory(message: str) -> bool:
    return any(p in message for p in _OOM_PATTERNS)


def _reported_bytes(message: str, pattern: str) -> int | None:
    """A size the compiler printed (``24.27G``: its G is GiB), after ``pattern``; None if it did not."""
    m = re.search(pattern + r"\s+([0-9.]+)([KMGT])\b", message)
    if not m:
        return None
    return int(float(m.group(1)) * {"K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}[m.group(2)])


def _reported_memory(message: str) -> dict[str, int | None]:
    """What an out-of-memory compile says: ``Used X of Y hbm``, ``arguments X``, ``HLO temp X`` (a
    CompileTimeHbmOom), or ``Allocation (size=N) would exceed memory`` (one buffer too large)."""
    memory = {"peak": _reported_bytes(message, r"Used"), "arguments": _reported_bytes(message, r"\barguments"),
              "temporaries": _reported_bytes(message, r"HLO temp")}
    one_buffer = re.search(r"Allocation \(size=(\d+)\) would exceed memory", message)
    if memory["peak"] is None and one_buffer:  # one buffer alone is too large: a lower bound of the peak
        memory["peak"] = int(one_buffer.group(1))
    return {k: v for k, v in memory.items() if v is not None}


@dataclass
class Compiled:
    """What the compiler said about one program for one topology."""

    fits: bool
    memory: dict[str, int | None]
    flops: float | None
    seconds: float
    message: str | None = None


def compile_for_topology(jitted: Any, args: tuple, mesh: Any) -> Compiled:
    """Lower and compile ``jitted(*args)`` (abstract, sharded args) for the mesh's TPU; never runs it."""
    t0 = time.perf_counter()
    with mesh:
        lowered = jitted.lower(*args)
    try:
        compiled = lowered.compile()
    except Exception as exc:  # noqa: BLE001 - jax raises JaxRuntimeError; classified below
        message = str(exc)
        if not _is_out_of_memory(message):
            raise PlanCompileError(f"the compiler refused the program: {_compiler_lines(message, 8)}") from exc
        return Compiled(False, _reported_memory(message), None, time.perf_counter() - t0, _compiler_lines(message))
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    memory = {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temporaries": int(mem.temp_size_in_bytes),
        "generated_code": int(mem.generated_code_size_in_bytes),
    }
    # "peak": the compiler's live-range peak, but never below what is surely resident at the end (the
    # arguments and the outputs not aliased to them; for a few tiny programs the compiler's figure is
    # lower). The sum of all buffers is larger: temporaries are not all live at once.
    memory["compiler_peak"] = int(getattr(mem, "peak_memory_in_bytes", 0))
    memory["buffers_total"] = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"]
    memory["peak"] = max(memory["compiler_peak"], memory["arguments"] + memory["outputs"] - memory["aliased"])
    return Compiled(True, memory, float(cost.get("flops", 0.0)), time.perf_counter() - t0)


def _assemble(step: str, topo: TpuTopology, dp: int, tp: int, settings: dict[str, Any], breakdown: dict[str, int],
              result: Compiled, steps: int, mfu: float, io: dict[str, Any], passes: int = 1) -> StepPlan:
    """One :class:`StepPlan` from a compile result: memory, time estimate, verdict.

    Time per step = FLOPs x ``passes`` / (MFU x the chip's peak bf16 FLOP/s): every FLOP is
    counted as a matmul FLOP (they dominate both steps).
    """
    memory: dict[str, Any] = {"peak": None, "temporaries": None, **result.memory}
    if not result.fits:
        memory.setdefault("arguments", sum(breakdown.values()))  # the planner's sum where the compiler did not say
    memory["arguments_breakdown"] = breakdown
    per_step = None if result.flops is None else result.flops * passes / (mfu * topo.chip.peak_bf16_flops)
    plan = StepPlan(
        step=step, topology=topo.accelerator_type, topology_name=topo.topology, chips=topo.devices,
        hosts=topo.hosts, mesh={"dp": dp, "tp": tp}, settings=settings, per_chip_bytes=memory,
        hbm_bytes_per_chip=topo.chip.usable_hbm_bytes, chip_nominal_hbm=topo.chip.nominal_hbm, fits=result.fits,
        flops_per_step_per_chip=result.flops,
        steps=steps, mfu=mfu, matmul_passes=passes, peak_flops_per_chip=topo.chip.peak_bf16_flops,
        peak_flops_source=topo.chip.source, estimated_seconds_per_step=per_step,
        estimated_seconds=None if per_step is None else per_step * steps, compile_seconds=result.seconds,
        io=io, compiler_message=result.message)
    plan.verdict = _verdict(plan)
    return plan


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


def rate_verdict(bytes_per_second: float, direction: str, cache_bytes: int | None) -> str:
    """Which storage sustains a cache ``direction`` ("read"/"write") rate per host.

    Compared with the documented per-VM limits of persistent disks (:data:`PD_LIMITS_MIBPS`);
    above them only RAM (/dev/shm, or the page cache) or a local SSD keeps up.
    """
    pd, extreme = PD_LIMITS_MIBPS[direction]
    mibps = bytes_per_second / MIB
    if mibps <= pd:
        where = f"a balanced/SSD persistent disk sustains it (documented {direction} limit {pd} MiB/s per VM)"
    elif mibps <= extreme:
        where = (f"above a balanced/SSD persistent disk ({pd} MiB/s per VM): an extreme persistent disk ({extreme} "
                 "MiB/s on large VMs), a local SSD or RAM (/dev/shm) sustains it")
    else:
        size = "" if cache_bytes is None else f" (the cache is {cache_bytes / 1e9:,.0f} GB)"
        where = (f"above every persistent disk (<= {extreme} MiB/s per VM): only RAM (/dev/shm, or the page "
                 f"cache) keeps up, so the cache must fit the host's memory{size}")
    return f"the cache {direction} rate needed is {mibps:,.0f} MiB/s per host at the estimated step time: {where}"


def _verdict(p: StepPlan) -> str:
    if not p.fits:
        used = p.per_chip_bytes.get("peak")
        said = f" (the compiler: {used / GIB:.2f} GiB needed)" if used else ""
        return (f"does NOT fit {p.topology} ({_gib(p.hbm_bytes_per_chip)} usable HBM per chip){said}; see "
                "compiler_message for the largest allocations")
    head = f"fits {p.topology}: peak {_gib(p.per_chip_bytes['peak'])} of {_gib(p.hbm_bytes_per_chip)} per chip " \
           f"(headroom {_gib(p.headroom_bytes)})"
    if p.estimated_seconds is not None:
        head += f"; ~{p.estimated_seconds / 3600:.2f} h for {p.steps} steps at MFU {p.mfu:g}"
    if p.io.get("rate_verdict"):
        head += f"; {p.io['rate_verdict']}"
    return head


# ------------------------------------------------------------------------------ the cache step
def check_cache_request(model: str | Path, topology: str, *, ctx_len: int, block_size: int,
                        num_context_features: int, num_blocks: int, batch_size: int, layout: str, dp: int, tp: int,
                        dtype: str, mfu: float) -> tuple[TpuTopology, Path, dict[str, Any], list[int]]:
    """Every cheap check of a cache plan (no jax): (topology, config folder, config, layer ids)."""
    from dflash_gptoss.cache_builder import CacheBuildError, check_build_geometry

    topo, config_dir = validate_plan_request(topology, dp=dp, tp=tp, mfu=mfu, batch=batch_size,
                                             batch_flag="--batch-size", model=model)
    try:
        cfg, layer_ids = check_build_geometry(config_dir, layout=layout, ctx_len=ctx_len, block_size=block_size,
                                              num_context_features=num_context_features, num_blocks=num_blocks,
                                              batch_size=batch_size, dp=dp, tp=tp, dtype=dtype)
    except CacheBuildError as exc:
        raise PlanInputError(str(exc)) from exc
    for name in ("num_attention_heads", "vocab_size"):
        if int(cfg[name]) % tp:
            raise PlanInputError(f"{name}={cfg[name]} is not divisible by --tp {tp}; easydel shards it over tp")
    return topo, config_dir, cfg, layer_ids


def plan_cache_step(model: str | Path, topology: str, *, ctx_len: int, block_size: int, num_context_features: int,
                    num_blocks: int, batch_size: int, layout: str, dp: int, tp: int, dtype: str,
                    mfu: float = DEFAULT_MFU) -> StepPlan:
    """Plan the cache build: compile the builder's teacher forward at its batch and window length."""
    from dflash_gptoss.cache_format import array_specs, cache_nbytes, window_len

    topo, config_dir, cfg, layer_ids = check_cache_request(
        model, topology, ctx_len=ctx_len, block_size=block_size, num_context_features=num_context_features,
        num_blocks=num_blocks, batch_size=batch_size, layout=layout, dp=dp, tp=tp, dtype=dtype, mfu=mfu)

    import jax
    from flax import nnx

    from dflash_gptoss.planning.topologies import topology_mesh
    from dflash_gptoss.teacher_easydel_fixes import EASYDEL_MESH_AXES, lazy_easydel_gptoss
    from dflash_gptoss.teacher_jax import teacher_forward_fn

    mesh = topology_mesh(topo, (dp, 1, 1, tp, 1), EASYDEL_MESH_AXES)
    model_ = lazy_easydel_gptoss(config_dir, dp=dp, tp=tp, dtype=dtype, mesh=mesh)
    graphdef, state = nnx.split(model_)
    abstract_state = with_shardings(state, teacher_state_shardings(model_, state, mesh))
    fwd, ids_sharding = teacher_forward_fn(graphdef, layer_ids, dtype, mesh)
    wlen = window_len(layout, ctx_len, block_size)
    ids = jax.ShapeDtypeStruct((batch_size, wlen), jax.numpy.int32, sharding=ids_sharding)
    result = compile_for_topology(fwd, (abstract_state, ids), mesh)

    hidden = int(cfg["hidden_size"])
    dims = dict(num_windows=num_blocks, ctx_len=ctx_len, block_size=block_size,
                num_context_features=len(layer_ids), hidden_size=hidden)
    disk = cache_nbytes(layout, **dims)
    forwards = math.ceil(num_blocks / batch_size)
    per_forward = sum(s.nbytes for s in array_specs(layout, **{**dims, "num_windows": batch_size}).values())
    io: dict[str, Any] = {"cache_bytes_on_disk": disk, "cache_bytes_written_per_step": per_forward,
                          "tokens_per_step": batch_size * wlen}
    settings = dict(model=str(config_dir), layout=layout, ctx_len=ctx_len, block_size=block_size,
                    num_context_features=num_context_features, target_layer_ids=layer_ids, num_blocks=num_blocks,
                    batch_size=batch_size, window_len=wlen, dtype=dtype, attention="vanilla")
    breakdown = {"parameters": per_chip_nbytes(abstract_state), "batch": per_chip_nbytes(ids)}
    passes = matmul_passes("cache", dtype)
    plan = _assemble("cache", topo, dp, tp, settings, breakdown, result, forwards, mfu, io, passes)
    plan.io["hours_if_written_at_pd_limit"] = disk / (PD_LIMITS_MIBPS["write"][0] * MIB * topo.hosts) / 3600
    if plan.estimated_seconds_per_step:
        rate = per_forward / plan.estimated_seconds_per_step / topo.hosts
        plan.io["write_bytes_per_second_per_host"] = rate
        plan.io["rate_verdict"] = rate_verdict(rate, "write", disk)
        plan.verdict = _verdict(plan)
    return plan


# ------------------------------------------------------------------------------ the training step
@dataclass
class CacheGeometry:
    """What the trainer takes from a cache: from its ``meta.json``, or given in plan mode."""

    layout: str
    ctx_len: int
    block_size: int
    target_layer_ids: list[int]
    source: str
    cache_bytes: int | None = None  # the whole cache, when a meta.json says


def cache_geometry(cache_dir: str | Path | None, teacher_cfg: dict[str, Any], *, layout: str | None,
                   ctx_len: int | None, block_size: int | None, num_context_features: int | None) -> CacheGeometry:
    """The cache's geometry from ``cache_dir/meta.json`` when it exists, else from the plan flags.

    Flags given next to a ``meta.json`` must agree with it (a plan of another cache is a mistake).
    """
    from dflash_gptoss.cache_format import LAYOUTS, CacheFormatError, read_meta
    from dflash_gptoss.draft_config import target_layer_ids

    given = {"layout": layout, "ctx_len": ctx_len, "block_size": block_size,
             "num_context_features": num_context_features}
    if cache_dir is not None and (Path(cache_dir) / "meta.json").is_file():
        try:
            meta = read_meta(cache_dir)
        except CacheFormatError as exc:
            raise PlanInputError(str(exc)) from exc
        have = {"layout": meta["layout"], "ctx_len": int(meta["ctx_len"]), "block_size": int(meta["block_size"]),
                "num_context_features": len(meta["target_layer_ids"])}
        bad = [f"--{k.replace('_', '-')} {v} (the cache has {have[k]})" for k, v in given.items()
               if v is not None and v != have[k]]
        if bad:
            raise PlanInputError(f"{cache_dir}/meta.json disagrees with " + ", ".join(bad) + "; drop those flags")
        teacher = meta.get("teacher", {})
        for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
            if key in teacher and int(teacher[key]) != int(teacher_cfg[key]):
                raise PlanInputError(f"{cache_dir} was built with {key}={teacher[key]}, the teacher config has "
                                     f"{teacher_cfg[key]}; plan with the teacher the cache was built with")
        return CacheGeometry(have["layout"], have["ctx_len"], have["block_size"],
                             [int(i) for i in meta["target_layer_ids"]], f"{cache_dir}/meta.json",
                             int(meta["nbytes"]) if meta.get("nbytes") is not None else None)
    missing = [f"--{k.replace('_', '-')}" for k in ("ctx_len", "block_size", "num_context_features")
               if given[k] is None]
    if missing:
        where = f"{cache_dir} holds no meta.json" if cache_dir is not None else "no cache dir"
        raise PlanInputError(f"{where}: give the cache geometry with {' '.join(missing)} (and --layout, "
                             "--anchors-per-window for a 'windows' cache)")
    lay = layout or "blocks"
    if lay not in LAYOUTS:
        raise PlanInputError(f"--layout {lay!r}: choose one of {LAYOUTS}")
    if block_size < 2:
        raise PlanInputError(f"--block-size {block_size} must be >= 2 (an anchor and at least one proposal)")
    try:
        ids = target_layer_ids(int(teacher_cfg["num_hidden_layers"]), int(num_context_features))
    except ValueError as exc:
        raise PlanInputError(f"--num-context-features {num_context_features}: {exc}") from exc
    return CacheGeometry(lay, int(ctx_len), int(block_size), ids, "plan flags")


def check_train_request(model: str | Path, topology: str, *, dp: int, tp: int, mfu: float, counts: dict[str, Any],
                        warmup_steps: int, cache_dir: str | Path | None,
                        geometry: dict[str, Any] | None) -> tuple[TpuTopology, Path, dict[str, Any], CacheGeometry]:
    """Every cheap check of a training plan (no jax): (topology, config folder, teacher config, geometry).

    ``counts`` maps flag names (``total_batch_size``, ``max_training_steps``, ...) to values that
    must be integers >= 1.
    """
    topo, config_dir = validate_plan_request(topology, dp=dp, tp=tp, mfu=mfu, batch=counts["total_batch_size"],
                                             batch_flag="--total-batch-size", model=model)
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlanInputError(f"--{name.replace('_', '-')} {value!r} must be an integer >= 1")
    if warmup_steps < 0:
        raise PlanInputError(f"--warmup-steps {warmup_steps} must be >= 0")
    teacher_cfg = json.loads((config_dir / "config.json").read_text())
    vocab = int(teacher_cfg["vocab_size"])
    if vocab % tp:
        raise PlanInputError(f"vocab_size={vocab} is not divisible by --tp {tp}: lm_head rows are sharded over tp")
    geo = cache_geometry(cache_dir or None, teacher_cfg, **(geometry or {}))
    return topo, config_dir, teacher_cfg, geo


TRAIN_COUNTS = ("total_batch_size", "max_training_steps", "vocab_chunk_size", "num_draft_layers",
                "anchors_per_window", "gradient_accumulation_steps")
"""Training settings that must be integers >= 1 (checked by :func:`check_train_request`)."""


def plan_train_step(settings: Any, topology: str, *, geometry: dict[str, Any] | None = None,
                    mfu: float = DEFAULT_MFU) -> StepPlan:
    """Plan training: compile the trainer's whole jitted optimizer step for ``settings`` on ``topology``.

    ``settings`` is the run's ``DFlashTrainingSettings`` (``teacher_snapshot_dir`` may be a folder
    holding only ``config.json`` or a preset name; ``cache_dir`` need not exist); ``geometry``
    holds the plan flags ``layout``, ``ctx_len``, ``block_size``, ``num_context_features`` used
    when the cache has no ``meta.json`` yet.
    """
    s = settings
    topo, config_dir, teacher_cfg, geo = check_train_request(
        s.teacher_snapshot_dir, topology, dp=s.dp, tp=s.tp, mfu=mfu,
        counts={k: getattr(s, k) for k in TRAIN_COUNTS}, warmup_steps=s.warmup_steps, cache_dir=s.cache_dir,
        geometry=geometry)
    vocab, hidden = int(teacher_cfg["vocab_size"]), int(teacher_cfg["hidden_size"])

    import jax
    import jax.numpy as jnp
    import numpy as np
    from easydel.infra.base_state import EasyDeLState
    from jax.sharding import NamedSharding
    from transformers import AutoConfig

    from dflash_gptoss.cache_format import array_specs
    from dflash_gptoss.draft_config import default_mask_token_id, make_draft_config
    from dflash_gptoss.easydel_dflash_draft_model import lazy_draft_model
    from dflash_gptoss.easydel_dflash_trainer import training_arguments
    from dflash_gptoss.planning.topologies import topology_mesh
    from dflash_gptoss.teacher_easydel_fixes import EASYDEL_MESH_AXES
    from dflash_gptoss.train_batches import anchors_per_row, step_batch_shapes
    from dflash_gptoss.train_step import (
        BATCH_SPEC,
        FROZEN_TABLE_SPEC,
        make_train_step,
        resolve_loss_decay_gamma,
        slot_weights,
    )

    try:
        mask_id = s.mask_token_id if s.mask_token_id is not None else default_mask_token_id(vocab, config_dir)
    except ValueError as exc:
        raise PlanInputError(str(exc)) from exc
    hf_cfg = AutoConfig.from_pretrained(str(config_dir))
    draft_config = make_draft_config(hf_cfg, num_hidden_layers=s.num_draft_layers, block_size=geo.block_size,
                                     mask_token_id=mask_id, layer_ids=geo.target_layer_ids)
    nb = anchors_per_row(geo.layout, geo.ctx_len, geo.block_size, s.anchors_per_window)
    args = training_arguments(s, anchors=nb, block_size=geo.block_size)
    tx, scheduler = args.get_optimizer_and_scheduler(s.max_training_steps)
    mesh = topology_mesh(topo, (s.dp, 1, 1, s.tp, 1), EASYDEL_MESH_AXES)
    model = lazy_draft_model(draft_config, dp=s.dp, tp=s.tp, mesh=mesh, seed=s.seed)
    graphdef, graphstate, graphother = model.split_module()
    shapes = jax.eval_shape(
        lambda gs, go: EasyDeLState.create(step=jnp.zeros((), jnp.int32), graphdef=graphdef, graphstate=gs,
                                           graphother=go, tx=tx, init_opt_state=True), graphstate, graphother)
    shardings = easydel_state_shardings(shapes, model._get_partition_rules(None), mesh)
    state = with_shardings(shapes, shardings)
    gamma = resolve_loss_decay_gamma(s.loss_decay_gamma, geo.block_size)
    fn = make_train_step(mesh, shardings, mask_token_id=mask_id,
                         weights=tuple(float(w) for w in slot_weights(geo.block_size, gamma)),
                         vocab_chunk_size=s.vocab_chunk_size,
                         gradient_accumulation_steps=s.gradient_accumulation_steps, scheduler=scheduler)
    rows = s.total_batch_size * s.gradient_accumulation_steps
    kh = len(geo.target_layer_ids) * hidden
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, BATCH_SPEC))
             for k, (shape, dt) in step_batch_shapes(rows, ctx_len=geo.ctx_len, features_width=kh, anchors=nb,
                                                     block_size=geo.block_size).items()}
    table = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32, sharding=NamedSharding(mesh, FROZEN_TABLE_SPEC))
    result = compile_for_topology(fn, (state, batch, table, table), mesh)

    specs = array_specs(geo.layout, num_windows=1, ctx_len=geo.ctx_len, block_size=geo.block_size,
                        num_context_features=len(geo.target_layer_ids), hidden_size=hidden)
    row_bytes = sum(sp.nbytes for name, sp in specs.items() if name != "window_offsets")  # what get_batch reads
    io: dict[str, Any] = {"cache_bytes_read_per_step": rows * row_bytes, "cache_bytes_per_row": row_bytes,
                          "rows_per_step": rows}
    breakdown = {
        "parameters": per_chip_nbytes(state.graphstate),
        "optimizer_state": per_chip_nbytes(state.opt_state),
        "other_state": per_chip_nbytes((state.step, state.graphother)),
        "batch": per_chip_nbytes(batch),
        "frozen_tables": 2 * per_chip_nbytes(table),
    }
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.graphstate))
    plan_settings = dict(model=str(config_dir), cache_geometry=asdict(geo), num_draft_layers=s.num_draft_layers,
                         draft_parameters=n_params, intermediate_size=int(draft_config.intermediate_size),
                         total_batch_size=s.total_batch_size, gradient_accumulation_steps=s.gradient_accumulation_steps,
                         anchors_per_row=nb, vocab_chunk_size=s.vocab_chunk_size,
                         max_training_steps=s.max_training_steps, optimizer="adamw", mask_token_id=mask_id)
    plan = _assemble("train", topo, s.dp, s.tp, plan_settings, breakdown, result, s.max_training_steps, mfu, io)
    pd_read = PD_LIMITS_MIBPS["read"][0] * MIB * topo.hosts
    plan.io["hours_if_read_at_pd_limit"] = s.max_training_steps * rows * row_bytes / pd_read / 3600
    if plan.estimated_seconds_per_step:
        rate = rows * row_bytes / plan.estimated_seconds_per_step / topo.hosts
        plan.io["read_bytes_per_second_per_host"] = rate
        plan.io["rate_verdict"] = rate_verdict(rate, "read", geo.cache_bytes)
        plan.verdict = _verdict(plan)
    return plan


__all__ = [
    "DEFAULT_MFU", "TRAIN_COUNTS", "CacheGeometry", "Compiled", "PlanCompileError", "PlanInputError", "StepPlan",
    "cache_geometry", "check_cache_request", "check_train_request", "compile_for_topology", "easydel_state_shardings",
    "matmul_passes", "per_chip_nbytes", "plan_cache_step", "plan_train_step", "rate_verdict",
    "teacher_state_shardings", "validate_plan_request", "with_shardings",
]
