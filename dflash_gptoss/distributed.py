"""JAX multi-controller start-up and the per-process row arithmetic both scripts share.

Past one host, every host runs the SAME command with its own ``--process-id``; JAX's
distributed runtime (``jax.distributed.initialize``) connects them, after which
``jax.devices()`` lists every device of every host, meshes span hosts, and each process
feeds only the rows of a global batch that its own devices hold
(``jax.make_array_from_process_local_data``). There is no other distribution layer.

:func:`initialize_distributed` must run before anything touches a JAX backend (device
lists, arrays, compilation); the scripts call it right after parsing their flags. On CPU,
cross-process collectives go through gloo (``jax_cpu_collectives_implementation``; the
default of jax >= 0.5, set explicitly here for clarity).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DistributedConfigError",
    "DistributedInfo",
    "add_distributed_args",
    "initialize_distributed",
    "initialize_from_args",
    "is_main_process",
    "is_multiprocess",
    "local_rows",
    "process_row_range",
    "sync",
]


class DistributedConfigError(ValueError):
    """Flags that cannot start the distributed runtime (the message names the flag and the fix)."""


@dataclass(frozen=True)
class DistributedInfo:
    process_id: int
    num_processes: int
    local_devices: int
    global_devices: int


def _check_address(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(
            f"--coordinator-address {address!r} must be HOST:PORT (e.g. 10.0.0.2:8476): the address of "
            "process 0, reachable from every host, on a free port.")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: list[int] | None = None,
                           auto: bool = False, initialization_timeout: int = 300) -> DistributedInfo | None:
    """Start JAX's multi-controller runtime, or do nothing for a single process.

    * nothing given (and ``auto`` False), or ``num_processes == 1``: single process, returns ``None``
      without touching JAX;
    * ``auto``: ``jax.distributed.initialize()`` with no arguments (JAX detects Cloud TPU pod slices,
      SLURM, Open MPI, or the ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
      environment variables);
    * otherwise all three of ``coordinator_address`` (process 0's ``HOST:PORT``), ``num_processes``
      and ``process_id`` (``0 <= process_id < num_processes``).

    Raises :class:`DistributedConfigError` for inconsistent flags, before any connection attempt.
    Calling it again after a successful start returns the running runtime's figures.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if auto and any(v is not None for v in explicit):
        raise DistributedConfigError("--distributed-auto detects the cluster itself; do not combine it with "
                                     "--coordinator-address / --num-processes / --process-id.")
    if not auto:
        if num_processes is not None and (not isinstance(num_processes, int) or num_processes < 1):
            raise DistributedConfigError(f"--num-processes {num_processes!r} must be an integer >= 1.")
        if all(v is None for v in explicit) or (num_processes == 1 and process_id in (None, 0)):
            return None
        if num_processes is None:
            raise DistributedConfigError("--coordinator-address / --process-id need --num-processes N (the number "
                                         "of processes, one per host, that run this same command).")
        if process_id is None:
            raise DistributedConfigError(f"--num-processes {num_processes} needs --process-id I, 0 <= I < "
                                         f"{num_processes}, different on every host (0 on the coordinator).")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise DistributedConfigError(f"--process-id {process_id!r} must lie in [0, {num_processes}) for "
                                         f"--num-processes {num_processes}.")
        if coordinator_address is None:
            raise DistributedConfigError(f"--num-processes {num_processes} needs --coordinator-address HOST:PORT "
                                         "(process 0's address, the same on every host).")
        _check_address(coordinator_address)

    import jax

    if jax.distributed.is_initialized():
        return _info()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        try:
            jax.distributed.initialize(initialization_timeout=initialization_timeout)
        except ValueError as exc:  # nothing detected: jax names the first missing value
            raise DistributedConfigError(
                f"--distributed-auto found no cluster to join ({exc}); it detects Cloud TPU pod slices, SLURM and "
                "Open MPI, or reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. Elsewhere pass "
                "--coordinator-address, --num-processes and --process-id.") from exc
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   local_device_ids=local_device_ids, initialization_timeout=initialization_timeout)
    return _info()


def _info() -> DistributedInfo:
    import jax

    return DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


# ------------------------------------------------------------------------------------ CLI flags
def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--coordinator-address``, ``--num-processes``, ``--process-id``, ``--distributed-auto``."""
    g = parser.add_argument_group(
        "multi-host (JAX multi-controller)",
        "Past one host, run the SAME command on every host, differing only in --process-id; the mesh "
        "(--dp x --tp) then spans all hosts' devices and each host feeds only the rows its own devices "
        "hold. Every path (cache, checkpoints, outputs) must be on a filesystem all hosts share "
        "(NFS/Filestore, Lustre; not GCS-fuse, which has no concurrent writers to one file); only process 0 "
        "writes the shared bookkeeping files.")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="process 0's address and a free port, reachable from every host (the same on every host).")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes (normally one per host) running this command.")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process's index in [0, N); 0 runs the coordinator.")
    g.add_argument("--distributed-auto", action="store_true",
                   help="let JAX detect the cluster (Cloud TPU pod slices, SLURM, Open MPI, or the "
                        "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID environment variables) instead "
                        "of the three flags above.")


def initialize_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DistributedInfo | None:
    """:func:`initialize_distributed` from the flags; a bad combination is a ``parser.error`` (exit 2)."""
    try:
        return initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                                      auto=args.distributed_auto)
    except DistributedConfigError as exc:
        parser.error(str(exc))
    return None  # unreachable (parser.error exits)


# ------------------------------------------------------------------------------------ helpers
def is_multiprocess() -> bool:
    """True inside a started multi-process runtime (never initializes a backend otherwise)."""
    jax = sys.modules.get("jax")
    return bool(jax is not None and jax.distributed.is_initialized() and jax.process_count() > 1)


def is_main_process() -> bool:
    """Process 0 (or the only process): the one that writes shared files."""
    return not is_multiprocess() or sys.modules["jax"].process_index() == 0


def sync(name: str) -> None:
    """A barrier across all processes (a no-op for one process). Every process must call it in the same order."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


MESSAGE_BYTES = 4096
"""A message broadcast from process 0 is cut to this many UTF-8 bytes (errors, not data)."""


def broadcast_message(message: str) -> str:
    """Process 0's ``message`` on every process (a collective: every process calls it, in the same order).

    A refusal decided on process 0 (a held lock, a failed export) must stop every process with the
    same line; the other processes pass anything, usually ``""``.
    """
    import numpy as np
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(message.encode()[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b"\0"), dtype=np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(encoded))).rstrip(b"\0").decode(errors="replace")


def gather_to_host(tree: Any) -> Any:
    """Every array of ``tree`` whole on every process (a collective past one host: every process must
    call it in the same order); arrays this process already holds in full are left as they are."""
    import jax

    def whole(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    return jax.tree.map(whole, tree)


def process_row_range(sharding: Any, shape: tuple[int, ...]) -> tuple[int, int]:
    """``[lo, hi)``: the rows (axis 0) of an array of ``shape`` with ``sharding`` that this process's
    devices hold; the whole range on one process.

    A batch sharded over ``dp`` with each host holding whole ``dp`` shards gives each process a
    contiguous block (the mesh puts a host's devices next to each other on ``dp``); anything else
    is refused, because a process then could not feed its rows as one slice.
    """
    n = int(shape[0])
    spans = sorted({(index[0] if index else slice(None)).indices(n)[:2]
                    for index in sharding.addressable_devices_indices_map(tuple(shape)).values()})
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        if end != start:
            raise ValueError(f"this process's devices hold rows {spans} of {n}: not one contiguous block; lay the "
                             "mesh out so each host holds whole, adjacent dp shards.")
    return spans[0][0], spans[-1][1]


def local_rows(array: Any) -> tuple[int, Any]:
    """``(lo, rows)``: the axis-0 block of ``array`` whose primary copy (replica 0) this process holds,
    as numpy; ``rows`` may be empty when another process holds the primary copy of every row.

    Each row is thereby claimed by exactly one process (the one writing it to a shared file).
    """
    import numpy as np

    pieces = {}
    for shard in array.addressable_shards:
        if shard.replica_id != 0:
            continue
        if any(i != slice(None) for i in shard.index[1:]):
            raise ValueError(f"local_rows needs an array sharded on axis 0 only, got {array.sharding}.")
        s = shard.index[0] if shard.index else slice(None)
        start, stop, _ = s.indices(array.shape[0])
        pieces[start] = (stop, shard.data)
    if not pieces:
        return 0, np.zeros((0, *array.shape[1:]), dtype=array.dtype)
    starts = sorted(pieces)
    for a, b in zip(starts, starts[1:], strict=False):
        if pieces[a][0] != b:
            raise ValueError(f"the rows this process holds are not contiguous (blocks at {starts}).")
    return starts[0], np.concatenate([np.asarray(pieces[s][1]) for s in starts], axis=0)
