"""Checkpoints: written atomically, read with ``weights_only=True``; loading their weights into a model.

:func:`load_weights` reads kdgraph checkpoints, plain state_dicts and the files of RepDistiller,
mdistiller and the original Distillation project (``{"model": ...}``, ``{"state_dict": ...}``), renaming
their keys through the layouts the model's class declares in ``checkpoint_layouts``.
"""
from __future__ import annotations

import argparse
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


#: Plain-data classes other projects pickle next to their weights (RepDistiller's ``{"opt": Namespace}``).
SAFE_GLOBALS = [argparse.Namespace]


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``, also allowing :data:`SAFE_GLOBALS`; a missing, empty or damaged file
    is a :class:`UserError` naming it.

    ``mmap`` maps the file instead of reading it (zip-format checkpoints; older ones are read).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
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


#: The name :func:`map_state` gives a state_dict whose keys are the model's own.
OWN_LAYOUT = "kdgraph"
_OPTIONAL = ("num_batches_tracked",)  # BatchNorm buffers files from PyTorch < 0.4.1 lack (loading fills them)


def _fits(own: dict, state: dict) -> bool:
    if any(k not in own for k in state):
        return False
    if any(k not in state and not k.endswith(_OPTIONAL) for k in own):
        return False
    return all(state[k].shape == own[k].shape for k in state)


def map_state(model: nn.Module, state: dict) -> tuple[dict, str] | tuple[None, None]:
    """``state`` renamed to ``model``'s keys, and the name of the layout that fitted; ``(None, None)`` if none.

    Tried in order: the model's own keys, then each foreign layout ``type(model).checkpoint_layouts``
    declares (``{name: function(foreign key) -> own key}``). A layout fits when it gives every key of the
    model (BatchNorm's ``num_batches_tracked`` may be absent), no other key, and the model's shapes.
    ``module.`` and ``_orig_mod.`` prefixes (DataParallel, torch.compile) are dropped first.

    Example::

        state, layout = map_state(build_model("wrn-40-2", 100), torch.load(f)["model"])
        # layout == "RepDistiller/mdistiller/Heo et al./Distillation WRN (blockN.layer.I, convShortcut)"
    """
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    layouts = {OWN_LAYOUT: None, **getattr(type(model), "checkpoint_layouts", {})}
    for name, rename in layouts.items():
        mapped = state if rename is None else {rename(k): v for k, v in state.items()}
        if len(mapped) == len(state) and _fits(own, mapped):
            return mapped, name
    return None, None


def load_weights(model: nn.Module, path: str | Path) -> str:
    """Load a checkpoint's weights into ``model`` and return the key layout used (see :func:`map_state`).

    A file that fits no layout raises a UserError naming the file and the keys that differ from the
    model's own (and the foreign layouts tried).

    Example::

        layout = load_weights(build_model("resnet32x4", 100), "resnet32x4_vanilla/ckpt_epoch_240.pth")
    """
    state = model_state(load(path), path)
    mapped, layout = map_state(model, state)
    if mapped is None:
        raise UserError(state_mismatch(model, state, f"the weights in checkpoint {path}"))
    model.load_state_dict(mapped)
    return layout


def _mismatch(model: nn.Module, state: dict) -> str:
    """What differs between ``state`` and ``model``, read in the layout that shares the most keys with it."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    layouts = {OWN_LAYOUT: None, **getattr(type(model), "checkpoint_layouts", {})}
    renamed = {name: state if f is None else {f(k): v for k, v in state.items()} for name, f in layouts.items()}
    name, state = max(renamed.items(), key=lambda item: len(own.keys() & item[1].keys()))
    missing = [k for k in own if k not in state and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]

    def few(keys):
        return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
    parts = [f"missing keys: {few(missing)}" if missing else "",
             f"unexpected keys: {few(unexpected)}" if unexpected else "",
             f"shape mismatches (file vs model): {few(shapes)}" if shapes else ""]
    read_as = f" (keys read in the {name} layout)" if name != OWN_LAYOUT else ""
    others = [n for n in layouts if n not in (name, OWN_LAYOUT)]
    return ("; ".join(p for p in parts if p) + read_as
            + (f"; also tried the layouts: {'; '.join(others)}" if others else ""))


def state_mismatch(model: nn.Module, state: dict, what: str) -> str | None:
    """Why ``state`` (a state_dict) fits none of ``model``'s key layouts (:func:`map_state`) -- missing and
    unexpected keys, shape mismatches -- or ``None`` when it loads. ``what`` names the weights in the message."""
    if map_state(model, state)[0] is not None:
        return None
    return f"{what} do not match {type(model).__name__}: {_mismatch(model, state)}"


def mismatch(model: nn.Module, path: str | Path) -> str | None:
    """:func:`state_mismatch` for a checkpoint file, read memory-mapped (no weights are copied); a file that
    does not exist or cannot be read raises a :class:`UserError`."""
    return state_mismatch(model, model_state(load(path, mmap=True), path), f"the weights in {path}")


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
