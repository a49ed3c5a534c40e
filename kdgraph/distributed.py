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


def gather_tensors(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated along dim 0 over the ranks, in rank order, without gradient.

    The same on every rank; the tensors themselves (detached) in a single process. Sizes in dim 0 may
    differ between ranks. Every rank must call it at the same point (inside a loss term's forward is fine):
    this is how a term updates state that must stay equal across ranks, such as a memory bank.
    """
    if world() == 1:
        return tuple(t.detach() for t in tensors)
    device = tensors[0].device
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world())]
    dist.all_gather(sizes, torch.tensor([tensors[0].shape[0]], device=device))
    sizes = [int(n) for n in sizes]
    out = []
    for t in tensors:
        padded = t.detach().new_zeros((max(sizes),) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        parts = [torch.empty_like(padded) for _ in range(world())]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
    return tuple(out)
