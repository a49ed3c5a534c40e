"""Checkpoints: written atomically, read with ``weights_only=True``; loading their weights into a model."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import UserError
from .files import atomic_write


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: a reader never sees half a file.

    A failed write (a full disk) raises its ``OSError`` (torch reports it as a RuntimeError of its zip
    writer); the temporary file is removed and the file at ``path`` left as it was.
    """
    with atomic_write(path) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = e.__cause__ or e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a missing, empty or damaged file is a :class:`UserError` naming it.

    ``mmap`` maps the file instead of reading it (zip-format checkpoints; older ones are read).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and _is_zip(path))
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file; all mean "unreadable"
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read checkpoint {path}: {first}") from None


def _is_zip(path: Path) -> bool:
    import zipfile

    return zipfile.is_zipfile(path)


def model_state(obj: Any, path: str | Path) -> dict:
    """The model weights in a kdgraph checkpoint (``{"model": ...}``) or a plain state_dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj["model"]
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise UserError(f"{path} holds neither a kdgraph checkpoint nor a state_dict")


def state_mismatch(model: nn.Module, state: dict, what: str) -> str | None:
    """Why ``state`` (a state_dict) does not load into ``model`` -- missing and unexpected keys, shape
    mismatches -- or ``None`` when it does. ``what`` names the weights in the message."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None

    def few(keys):
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    parts = [f"missing keys: {few(missing)}" if missing else "",
             f"unexpected keys: {few(unexpected)}" if unexpected else "",
             f"shape mismatches (file vs model): {few(shapes)}" if shapes else ""]
    return f"{what} do not match {type(model).__name__}: " + "; ".join(p for p in parts if p)


def mismatch(model: nn.Module, path: str | Path) -> str | None:
    """:func:`state_mismatch` for a checkpoint file, read memory-mapped (no weights are copied); a file that
    does not exist or cannot be read raises a :class:`UserError`."""
    return state_mismatch(model, model_state(load(path, mmap=True), path), f"the weights in {path}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint's weights into ``model``; a mismatch names the file and the keys."""
    state = model_state(load(path), path)
    problem = state_mismatch(model, state, f"the weights in checkpoint {path}")
    if problem:
        raise UserError(problem)
    model.load_state_dict({k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()})


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU (each rank saves its own)
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (tensors may come back on any device; GPUs are matched to this process's)."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # an older checkpoint: every visible GPU's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda.cpu())


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
