"""Named taps on any model -- torchvision, timm, Hugging Face or your own -- without editing its ``forward``.

Names follow ``torchvision.models.feature_extraction``: a leaf module's call is named by its module path
(``block2.0.relu1``; a second call of the same module gets ``_1``), a function or method call by the
path of the module it runs in plus the op (``layer1.0.add``), and the path of a non-leaf module names
that module's output (``block2``). ``NAME:pre`` is the input of ``NAME`` -- for an activation, the
pre-activation value. torch.fx traces the model; where it cannot (most Hugging Face models), torch.export
does, and nodes are named the same way from their module stack (:mod:`kdgraph.graph.tracing`).

A tapped value is the value at the moment it was produced, whatever the model does afterwards: writes
through any alias are found with PyTorch's version counters at the first call, and fixed by an
out-of-place rewrite of the writing op or a copy (:mod:`kdgraph.graph.exact`). Tracing, shape
propagation and those checks leave the model exactly as it was (:mod:`kdgraph.graph.state`).

Public API: :func:`layers` (the tap table), :func:`tap` / :class:`Tapped` (the tapped model),
:func:`trace` (the named graph), :func:`stage_ends` (default distillation positions) and :func:`stages`
(a table's stages).
"""
from .exact import TapOverwritten
from .state import unchanged
from .table import layers, stage_ends, stages
from .tapped import Tapped, tap
from .tracing import PRE, TraceFailed, Traced, UnknownTap, trace

__all__ = ["layers", "tap", "trace", "Tapped", "Traced", "TraceFailed", "UnknownTap", "TapOverwritten",
           "stage_ends", "stages", "unchanged", "PRE"]
