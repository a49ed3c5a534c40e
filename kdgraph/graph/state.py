"""Run code against a model and leave no trace of it: :func:`unchanged`.

Tracing (fx or torch.export), fake-tensor shape propagation and kdgraph's setup-time checking runs all
execute the model's Python code, which may write to it: timm's ``BatchNormAct2d`` bumps
``num_batches_tracked``, LeViT and EfficientFormer fill attention-bias caches (with an fx Proxy or a fake
tensor while tracing), lazy modules materialise parameters, BatchNorm updates its running statistics.
:func:`unchanged` snapshots every module's attributes (its ``__dict__`` entries, containers one level
deep, restored into the very objects the model holds) and the values of its buffers and plain tensor
attributes, plus the global random number generators, and puts them all back afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn

__all__ = ["unchanged", "ParameterWritten"]


class ParameterWritten(RuntimeError):
    """The model's forward wrote to one of its parameters, which kdgraph cannot undo without a copy."""


def _contents(value: Any):
    """A copy of a mutable container's contents (None for anything else)."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return type(value)(value) if type(value) in (list, set) else list(value)
    return None


def _put_back(container: Any, saved: Any) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(saved)
    elif isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Buffers and plain tensor attributes (also inside containers one level deep), not parameters."""
    for value in module.__dict__.values():
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                    yield v
        elif isinstance(value, (list, tuple)):
            for v in value:
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                    yield v


class _Snapshot:
    def __init__(self, model: nn.Module):
        self.modules = list(model.modules())
        self.attrs = [dict(m.__dict__) for m in self.modules]
        self.containers = [(v, _contents(v)) for attrs in self.attrs for v in attrs.values()
                           if _contents(v) is not None]
        seen: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
        for m in self.modules:
            for t in _tensors(m):
                if id(t) not in seen and not t.is_inference() and not t.is_meta:
                    seen[id(t)] = (t, t._version, t.detach().clone())
        self.tensors = list(seen.values())
        self.params = [(n, p, p._version) for n, p in model.named_parameters() if not p.is_inference()]
        self.rng = torch.random.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self, check_parameters: bool = True) -> None:
        for container, saved in self.containers:
            _put_back(container, saved)
        for m, attrs in zip(self.modules, self.attrs):
            m.__dict__.clear()
            m.__dict__.update(attrs)
        with torch.no_grad():  # kernels such as batch_norm's update running statistics without a version bump
            for t, version, saved in self.tensors:
                if t._version != version or not torch.equal(t, saved):
                    t.copy_(saved)
        torch.random.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        written = [n for n, p, version in self.params if p._version != version]
        if written and check_parameters:
            raise ParameterWritten(f"the model's forward wrote to its parameter(s) {', '.join(written[:5])} in "
                                   f"place; kdgraph cannot run such a model without changing it")


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """Run the ``with`` body, then restore ``model``'s attributes, buffers and the global RNG states.

    Example::

        with unchanged(model):
            model.train()(x)   # BatchNorm statistics, caches, counters... all put back afterwards
    """
    snapshot = _Snapshot(model)
    try:
        yield
    except BaseException:
        snapshot.restore(check_parameters=False)
        raise
    snapshot.restore()
