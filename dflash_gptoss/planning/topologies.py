"""The TPU slices the planner knows: names, device counts, HBM and peak FLOP/s (the one chip table).

A Cloud TPU accelerator type (``v5litepod-8``, ``v4-8``, ...) maps to the topology name that
``jax.experimental.topologies.get_topology_desc`` understands, plus the chip config. The
device counts are what JAX sees: v4 and v5p run in *megacore* mode, one JAX device per chip
(two TensorCores fused), so a ``v4-8`` (8 TensorCores) is 4 devices and a dp=2 x tp=4 mesh
needs a ``v4-16``. Measured facts behind every row: ``docs/tpu_planning.md``, "Topologies and meshes".

Two HBM figures per chip: the nominal one from the Cloud TPU documentation and the usable
one that libtpu's compiler reports ("Used X of Y hbm" when a program does not fit; measured
with libtpu 0.0.37). The planner's verdict comes from the compiler itself (a program that
does not fit fails to compile); the usable figure only gives the headroom of one that does.
Peak bf16 FLOP/s per chip are the documented ones (sources below) and only feed the time
estimate, together with an assumed MFU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class TpuChip:
    """One TPU generation, per JAX device (one chip; megacore chips are one device)."""

    name: str
    usable_hbm_bytes: int  # the compiler's figure per device (libtpu 0.0.37)
    nominal_hbm: str  # as documented
    peak_bf16_flops: float  # per chip, documented
    source: str  # where peak_bf16_flops and nominal_hbm come from


CHIPS: dict[str, TpuChip] = {
    "v4": TpuChip("v4", int(30.75 * GIB), "32 GiB", 275e12, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": TpuChip("v5e", int(15.75 * GIB), "16 GB", 197e12, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": TpuChip("v5p", int(95.74 * GIB), "95 GB", 459e12, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": TpuChip("v6e", int(31.25 * GIB), "32 GB", 918e12, "https://cloud.google.com/tpu/docs/v6e"),
}


@dataclass(frozen=True)
class TpuTopology:
    """A single-host-or-more slice named as Cloud TPU names it (``--accelerator-type``)."""

    accelerator_type: str
    aliases: tuple[str, ...]
    chip: TpuChip
    topology: str  # get_topology_desc's name
    chip_config_name: str
    devices: int
    hosts: int
    chips_per_host: tuple[int, int, int]  # the host's chip grid (v5e/v6e: 8 chips per host, v4/v5p: 4)

    def mesh_sizes(self) -> list[tuple[int, int]]:
        """Every (dp, tp) with dp * tp equal to the device count."""
        return [(self.devices // tp, tp) for tp in range(1, self.devices + 1) if self.devices % tp == 0]


TOPOLOGIES: tuple[TpuTopology, ...] = (
    TpuTopology("v4-8", (), CHIPS["v4"], "v4:2x2x1", "megacore", 4, 1, (2, 2, 1)),
    TpuTopology("v4-16", (), CHIPS["v4"], "v4:2x2x2", "megacore", 8, 2, (2, 2, 1)),
    TpuTopology("v5litepod-8", ("v5e-8",), CHIPS["v5e"], "v5e:2x4", "default", 8, 1, (2, 4, 1)),
    TpuTopology("v5p-8", (), CHIPS["v5p"], "v5:2x2x1", "megacore", 4, 1, (2, 2, 1)),
    TpuTopology("v5p-16", (), CHIPS["v5p"], "v5:2x2x2", "megacore", 8, 2, (2, 2, 1)),
    TpuTopology("v6e-8", (), CHIPS["v6e"], "v6e:2x4", "default", 8, 1, (2, 4, 1)),
)


def known_names() -> list[str]:
    """Every accepted name, aliases included, in table order."""
    return [n for t in TOPOLOGIES for n in (t.accelerator_type, *t.aliases)]


def find_topology(name: str) -> TpuTopology:
    """The topology called ``name`` (accelerator type or alias); ValueError lists the known ones."""
    for t in TOPOLOGIES:
        if name in (t.accelerator_type, *t.aliases):
            return t
    raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(known_names())}")


def check_mesh(topology: TpuTopology, dp: int, tp: int) -> None:
    """``dp * tp`` must use every device of the slice (easydel's mesh spans all devices)."""
    if dp * tp != topology.devices:
        sizes = ", ".join(f"dp={d} tp={t}" for d, t in topology.mesh_sizes())
        megacore = " (megacore: one device per chip)" if topology.chip_config_name == "megacore" else ""
        raise ValueError(f"--dp {dp} x --tp {tp} = {dp * tp} but {topology.accelerator_type} has "
                         f"{topology.devices} devices{megacore}; use one of: {sizes}")


def topology_description(topology: TpuTopology) -> Any:
    """libtpu's description of the slice: its devices, for compiling only (no TPU needed).

    libtpu guards a machine's chips with a lockfile that lets one process in; compiling touches
    no chip, so ``ALLOW_MULTIPLE_LIBTPU_LOAD`` (unless set) lets plans and tests run side by side.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology.topology, "tpu", chip_config_name=topology.chip_config_name,
                                        chips_per_host_bounds=topology.chips_per_host, num_slices=1)


def topology_mesh(topology: TpuTopology, axis_sizes: tuple[int, ...], axis_names: tuple[str, ...]) -> Any:
    """A ``jax.sharding.Mesh`` over the slice's devices, compiled for but never run on."""
    from jax.experimental import topologies

    return topologies.make_mesh(topology_description(topology), axis_sizes, axis_names)


__all__ = ["CHIPS", "GIB", "TOPOLOGIES", "TpuChip", "TpuTopology", "check_mesh", "find_topology", "known_names",
           "topology_description", "topology_mesh"]
