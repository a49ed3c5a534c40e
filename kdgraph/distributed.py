"""The few ``torch.distributed`` calls kdgraph makes, each a no-op in a single process.

With no process group (a plain ``python`` run) the rank is 0, the world size 1, and the collectives return
at once; under ``torchrun`` they act on the default group. Data loaders use :func:`rank` and
:func:`world` to shard; the training loop sums, agrees and gathers through the others.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if _active() else 0


def world() -> int:
    """The number of processes in the default group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def barrier() -> None:
    """Wait for every rank (returns at once in a single process)."""
    if world() > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor) -> None:
    """Sum ``t`` over the ranks, in place."""
    if _active():
        dist.all_reduce(t)


def any_rank(flags: Sequence[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Each flag, true where it is true on any rank: one collective, so that ranks stop (or fail) together."""
    if world() == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    all_reduce(t)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj: Any) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if world() == 1:
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out
