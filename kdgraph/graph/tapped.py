"""``tap(model, names)``: the model returning ``(output, {name: value})``, exact by construction."""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ..allocator import tune_allocator_once
from .exact import TapOverwritten, prepare, versions
from .tracing import NeedsExample, Traced, _trace, as_args

__all__ = ["Tapped", "tap"]

CHECK_ENV = "KDGRAPH_CHECK_TAPS"


def _batch(args: tuple) -> int | None:
    return next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)


def _signature(args: tuple) -> tuple:
    return tuple((a.dtype, a.device, tuple(a.shape[1:])) for a in args if isinstance(a, torch.Tensor))


class Tapped(nn.Module):
    """``model`` whose call returns ``(output, {name: tensor})`` with the value each named tap had when it
    was produced.

    The model is never modified: parameters and buffers stay its own (``tapped.model``), and its training
    flags pick the graph (traced per combination of submodule modes, so models that branch on
    ``self.training`` run the graph of their mode). At the first call of each mode and input signature,
    checking runs on copies of the input decide how each tap stays exact (see
    :mod:`kdgraph.graph.exact`); :attr:`how` records it. Later calls run the prepared graph only. (Those
    runs call the model's leaf modules, and so their forward hooks, a few more times at that first call.)

    The first call on the CPU also raises glibc's allocator thresholds for the process, as kdgraph's
    commands do (:mod:`kdgraph.allocator`): freed activation buffers are then reused instead of being
    returned to the system and page-faulted back at every forward. ``KDGRAPH_MALLOC=default`` opts out.

    Args:
        model: any ``nn.Module``.
        names: tap names, as :func:`kdgraph.layers` lists them (``layer1.0.relu_1:pre``, ``layer2``...).
        leaf_modules: module paths or class names kept opaque (see :func:`kdgraph.graph.trace`).
        example: an input (or tuple of positional inputs) to prepare with now; needed up front only to
            learn early about unknown names of a model that only ``torch.export`` can trace.
        check: compare every tap's version counter at the end of each forward and raise
            :class:`~kdgraph.graph.exact.TapOverwritten` if one was written to (default: environment
            variable ``KDGRAPH_CHECK_TAPS=1``).

    Example::

        >>> tapped = Tapped(torchvision.models.resnet18(), ["layer1.0.relu_1:pre", "layer4"])
        >>> logits, feats = tapped(torch.randn(2, 3, 64, 64))
        >>> feats["layer4"].shape
        torch.Size([2, 512, 2, 2])
    """

    def __init__(self, model: nn.Module, names: Sequence[str], leaf_modules: Iterable[str] = (), *,
                 example: Any = None, check: bool | None = None):
        super().__init__()
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.leaf_modules = tuple(leaf_modules)
        self.check = os.environ.get(CHECK_ENV, "") not in ("", "0") if check is None else bool(check)
        self.how: dict[str, dict[str, str]] = {}  # "mode input via" -> {name: kept | out-of-place | copied}
        self._traces: dict[tuple, Traced | None] = {}
        self._graphs: dict[tuple, fx.GraphModule] = {}
        if example is not None:
            self._prepare(as_args(example), {})
        else:  # fail now on unknown names or untraceable models (a model only torch.export traces waits)
            self._traced(self._mode(), None)

    def _mode(self) -> tuple:
        return tuple(m.training for m in self.model.modules())

    def _traced(self, mode: tuple, args: tuple | None) -> Traced | None:
        """The trace for ``mode`` (fx), or for ``mode`` and these inputs (torch.export); None while fx
        cannot trace and no input is at hand."""
        traced = self._traces.get(mode)
        if traced is None and mode not in self._traces:
            try:
                traced = _trace(self.model, self.leaf_modules, None)
            except NeedsExample:
                if args is None:
                    self._traces[mode] = None
                    return None
                traced = None
            if traced is not None:
                for name in self.names:
                    traced.resolve(name)
                self._traces[mode] = traced
        if traced is not None:
            return traced
        if args is None:
            return None
        key = (mode, _signature(args))
        if key not in self._traces:
            traced = _trace(self.model, self.leaf_modules, args)
            for name in self.names:
                traced.resolve(name)
            self._traces[key] = traced
        return self._traces[key]

    @torch.compiler.disable
    def _prepare(self, args: tuple, kwargs: dict) -> fx.GraphModule:
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args):
            tune_allocator_once()
        key = (self._mode(), _signature(args))
        traced = self._traced(key[0], args)
        if traced.via == "export" and not traced.dynamic_batch:  # torch.export specialised the batch size
            key += (_batch(args),)
        gm, how = prepare(traced, self.names, args, kwargs, self.check)
        self._graphs[key] = gm
        label = ", ".join(f"{str(a.dtype).replace('torch.', '')}{list(a.shape)}" for a in args
                          if isinstance(a, torch.Tensor))
        self.how[f"{'train' if self.model.training else 'eval'} {label} {traced.via}"] = how
        return gm

    def forward(self, *args, **kwargs):
        key = (self._mode(), _signature(args))
        gm = self._graphs.get(key) or self._graphs.get(key + (_batch(args),)) or self._prepare(args, kwargs)
        if not self.check:
            return gm(*args, **kwargs)
        output, taps, seen = gm(*args, **kwargs)
        if not torch.is_inference_mode_enabled():
            changed = [name for name, v in seen.items() if versions(taps[name]) != v]
            if changed:
                raise TapOverwritten(f"tapped value(s) {', '.join(changed)} of {type(self.model).__name__} were "
                                     f"written to after they were produced; please report this as a kdgraph bug")
        return output, taps

    def _apply(self, fn, *args, **kwargs):
        self._graphs.clear()  # prepared on other devices or dtypes; export traces hold the old tensors
        self._traces = {k: v for k, v in self._traces.items() if v is None or v.via == "fx"}
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"], state["_traces"], state["how"] = {}, {}, {}
        return state


def tap(model: nn.Module, names: Sequence[str], leaf_modules: Iterable[str] = (), **kwargs) -> Tapped:
    """Return ``model`` tapped at ``names``: its call returns ``(output, {name: tensor})``.

    Each tapped tensor is exactly the value the named layer produced, even where the model later
    overwrites it in place (``nn.ReLU(inplace=True)``, ``x += y``, an eval-mode Dropout or stochastic depth
    returning its input before a residual ``+=``...): at the first call kdgraph finds such writes through
    PyTorch's version counters and rewrites the op out of place or copies the value, whichever keeps the
    model's own output bitwise unchanged (:mod:`kdgraph.graph.exact`). The model itself is never edited.

    Args:
        model: any ``nn.Module`` that torch.fx or torch.export can trace (torchvision, timm, Hugging Face...).
        names: names from :func:`kdgraph.layers`; ``NAME:pre`` is the input of ``NAME`` (for an activation,
            the pre-activation value).
        leaf_modules: module paths or class names kept opaque.
        **kwargs: ``example`` and ``check``, see :class:`Tapped`.

    Returns:
        a :class:`Tapped` module sharing ``model``'s parameters and buffers.

    Raises:
        UnknownTap: a name is not in the model's graph (the message suggests the closest ones).
        TraceFailed: the model cannot be traced (the message names every class to keep opaque).

    Example::

        >>> model = torchvision.models.resnet18()
        >>> logits, feats = kdgraph.tap(model, ["layer1.0.relu_1:pre"])(torch.randn(2, 3, 32, 32))
        >>> bool((feats["layer1.0.relu_1:pre"] < 0).any())  # before the in-place ReLU
        True
    """
    return Tapped(model, names, leaf_modules, **kwargs)
