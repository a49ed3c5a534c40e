"""Process-wide settings: the ``torchrun`` process group, the device. (The CPU allocator's is
:mod:`kdgraph.allocator`, in the library: tapped models apply it too.)"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from ..errors import UserError


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on CPU).

    A no-op for a single process or when a group already exists; the group is destroyed on the way out.
    """
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # gloo for CPU tensors (train.device: cpu, or no GPU), NCCL for CUDA ones
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def pick_device(name: str, option: str = "train.device", mps: bool = True):
    """The ``torch.device`` that ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``...) means here.

    ``auto`` is CUDA where torch sees it, else MPS (with ``mps``), else the CPU. Under ``torchrun`` each
    process takes the GPU of its ``LOCAL_RANK`` for ``auto`` and any ``cuda``. ``option`` names the setting
    in the error raised when CUDA is asked for and torch sees none.
    """
    import torch

    from ..distributed import world

    if world() > 1 and (name == "auto" or name.startswith("cuda")) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # cuda:N means "a GPU" under torchrun
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"{option} is {name!r} but torch sees no CUDA device")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if mps and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
