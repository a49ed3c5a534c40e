"""kdgraph: knowledge distillation for PyTorch, with layers named in a spec and tapped through torch.fx.

The public names (:class:`Distiller`, :func:`layers`, :func:`tap`) are imported on first use, so that
``import kdgraph`` -- and ``kdgraph --help`` -- does not import torch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Distiller", "layers", "tap", "__version__"]

if TYPE_CHECKING:
    from .distiller import Distiller
    from .graph import layers, tap


def __getattr__(name: str):
    if name == "Distiller":
        from .distiller import Distiller

        return Distiller
    if name in ("layers", "tap"):
        from . import graph

        return getattr(graph, name)
    raise AttributeError(f"module 'kdgraph' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
