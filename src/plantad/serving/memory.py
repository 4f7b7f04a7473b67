"""Memory for a model swap: a replica holds the serving version and the new one side by side until
the swap, so it reserves room for two (`serve.ray_actor_options.memory`), and a swap that would not
fit in that reservation is refused with the sizes instead of letting Ray's memory monitor kill the
replica in the middle of requests.

Figures and how they were measured: docs/benchmarks/serving.md ("Replica memory"), bench/replica_memory.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psutil
from torch import nn

T = TypeVar("T")
MIB = 2 ** 20


class SwapDoesNotFit(MemoryError):
    """Loading the new version beside the serving one would pass the replica's reserved memory."""


def resident_bytes() -> int:
    """This process's resident memory (RSS): what Ray's memory monitor counts against the node."""
    return psutil.Process().memory_info().rss


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a torch model's parameters and buffers, each storage counted once (a lower bound of
    what a second copy of the version adds: activations and runtime state come on top)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_growth(load: Callable[[], T]) -> tuple[T, int]:
    """Run `load` (a version's load and warm-up) and return its result and how much the process's
    resident memory grew meanwhile (0 if it shrank): the version's measured footprint."""
    before = resident_bytes()
    result = load()
    return result, max(0, resident_bytes() - before)


def predictor_footprint(model: nn.Module, grown: int) -> int:
    """A loaded version's footprint: its measured growth (measure_growth of its load and warm-up),
    but never less than its tensors. Growth undercounts when the allocator reuses memory freed
    earlier (a second load in one process), tensor bytes leave out activations and runtime state."""
    return max(grown, tensor_bytes(model))


def swap_room(current_bytes: int, new_bytes: int, reserved_bytes: int | None) -> dict[str, float | bool | None]:
    """What /rollout shows per replica before anyone promotes: what it holds, what the next swap
    would need (check_swap_fits's sum) and the reservation; `swap_fits` is None when nothing is reserved."""
    needed = current_bytes + new_bytes
    return {"resident_mib": round(current_bytes / MIB), "swap_needs_mib": round(needed / MIB),
            "reserved_mib": None if reserved_bytes is None else round(reserved_bytes / MIB),
            "swap_fits": None if reserved_bytes is None else needed <= reserved_bytes}


def check_swap_fits(current_bytes: int, new_bytes: int, reserved_bytes: int | None) -> None:
    """Raise SwapDoesNotFit unless `current_bytes` (the replica's resident memory now, one version
    loaded) plus `new_bytes` (the new version's footprint) fit in `reserved_bytes`
    (serve.ray_actor_options.memory); None: nothing reserved, so nothing to check against."""
    if reserved_bytes is None:
        return
    needed = current_bytes + new_bytes
    if needed > reserved_bytes:
        raise SwapDoesNotFit(
            f"swap refused: the replica holds {current_bytes / MIB:.0f} MiB and the new version needs "
            f"{new_bytes / MIB:.0f} MiB more, {needed / MIB:.0f} MiB in all, over the "
            f"{reserved_bytes / MIB:.0f} MiB it reserves (serve.ray_actor_options.memory); the serving "
            "version stays; raise the reservation or move the alias back")
