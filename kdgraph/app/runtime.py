"""Process-wide settings: the CPU allocator, the ``torchrun`` process group, the device.

glibc ``malloc`` serves every buffer above ``M_MMAP_THRESHOLD`` (128 KiB to 32 MiB, adaptively) with a
fresh ``mmap`` and returns it to the system on ``free``; a CNN forward allocates such activation buffers
every step, so each step pays page faults for memory it just gave back. Raising the mmap and trim
thresholds keeps freed buffers in the heap for reuse: on a 2-core CPU a WRN-16-2 forward (batch 128)
went from 494 ms to 315 ms. The cost is that the process keeps its peak heap instead of shrinking.
(CUDA memory has its own caching allocator and is not affected.)
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from typing import Iterator

from ..errors import UserError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_THRESHOLD = 1 << 30  # 1 GiB: larger buffers are still mmapped (and returned)


def tune_allocator() -> bool:
    """Keep large freed buffers in glibc's heap; True when applied.

    Skipped off glibc, when ``KDGRAPH_MALLOC=default``, or when the user set ``MALLOC_MMAP_THRESHOLD_`` or
    ``MALLOC_TRIM_THRESHOLD_`` themselves (or preloads another allocator such as jemalloc or tcmalloc).
    """
    if not sys.platform.startswith("linux") or os.environ.get("KDGRAPH_MALLOC", "") == "default":
        return False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")) \
            or any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))


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
