"""``layers(model, input_shape)``: every tappable name with its op, kind and shape; ``stage_ends``."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from .exact import graph_module
from .state import unchanged
from .tracing import PRE, Traced, _trace

__all__ = ["layers", "stage_ends", "stages"]


def _device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _values(traced: Traced, example: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value as a fake tensor (shapes and dtypes only, no computation); on the meta device,
    or where fake tensors fail (a leaf module with data-dependent control flow), from a real run. The
    model is left exactly as it was either way."""
    if traced.via == "export":  # torch.export already propagated fake tensors
        return {n: n.meta.get("val") for n in traced.graph.nodes}
    from torch._subclasses.fake_tensor import FakeTensorMode

    graph = fx.Graph()
    nodes: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(traced.graph, nodes))
    back = {c: n for n, c in nodes.items()}
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in back:
                values[back[n]] = out
            return out

    recorder = Recorder(graph_module(traced, graph))
    with unchanged(traced.model), torch.no_grad():
        if example.device.type != "meta":
            try:
                with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    recorder.run(mode.from_tensor(example))
                return values
            except Exception:
                values.clear()
        recorder.run(example)
    return values


def _shape(value) -> tuple[int, ...] | None:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    return tuple(int(s) if isinstance(s, int) else int(s.node.hint) for s in value.shape[1:])


def layers(model: nn.Module, input_shape: Sequence[int], leaf_modules: Iterable[str] = (), batch_size: int = 2,
           input_dtype: torch.dtype = torch.float32) -> list[dict]:
    """Every tappable name of ``model`` in graph order, with its ``op``, ``kind`` and ``shape``.

    Shapes come from fake tensors (or torch.export's), so no real computation happens and a model built on
    the ``meta`` device works; the model is left exactly as it was (buffers, caches, attributes).

    Args:
        model: any ``nn.Module`` torch.fx or torch.export can trace, in the training mode to describe.
        input_shape: the shape of one input without the batch dimension: ``(3, 224, 224)`` for images,
            ``(128,)`` for a sequence of 128 token ids.
        leaf_modules: module paths or class names kept opaque (see :func:`kdgraph.graph.trace`).
        batch_size: the batch size of the example input the shapes are computed for.
        input_dtype: the example input's dtype: ``torch.long`` for token models.

    Returns:
        one dict per tap: ``name``; ``op`` (the module class or function); ``kind``: ``module`` (a leaf
        module's call), ``function``, ``method``, ``pre`` (the input of an activation) or ``block`` (a
        non-leaf module's output; its row also has ``input``, the shape of the module's input, which
        ``NAME:pre`` taps); ``shape`` without the batch dimension. Values that are not tensors (sizes,
        tuples) are left out.

    Example::

        >>> rows = kdgraph.layers(torchvision.models.resnet18(), (3, 64, 64))
        >>> [r["name"] for r in rows][:4]
        ['conv1', 'bn1', 'relu:pre', 'relu']
        >>> next(r for r in rows if r["name"] == "layer4")["shape"]
        (512, 2, 2)
    """
    example = torch.zeros(batch_size, *input_shape, dtype=input_dtype, device=_device(model))
    traced = _trace(model, leaf_modules, example)
    values = _values(traced, example)
    rows = []
    for name, tap in traced.taps.items():
        value = values.get(tap.node)
        shape = _shape(value)
        if traced.via == "export" and traced.dynamic_batch and shape is not None \
                and all(isinstance(s, int) for s in value.shape):
            continue  # the same for every sample (masks, positions): not a feature
        if shape is None:
            continue
        row = {"name": name, "op": tap.op, "kind": tap.kind, "shape": shape}
        if tap.kind == "block":  # the shape of the module's input, which NAME:pre taps
            src = traced.inputs.get(name)
            row["input"] = _shape(values.get(src)) if src is not None else None
        rows.append(row)
    _mark_declared_stages(model, rows)
    return rows


def _mark_declared_stages(model: nn.Module, rows: list[dict]) -> None:
    """Number the rows of the stages ``model.feature_info`` declares (timm's convention: a list of dicts
    whose ``module`` names a stage's output) as ``stage``, and their pre-activation values as ``stage_pre``.

    kdgraph's models add ``pre`` (a tap name); without it the pre-activation is the input of the activation
    that produces the stage output, if one does. Nothing is marked unless every declared stage is a 4-d
    value in ``rows`` (a leaf module can hide a name; token models' stages are not feature maps).
    """
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) or not info or not all(isinstance(f, dict) for f in info):
        return
    index = {r["name"]: i for i, r in enumerate(rows)}
    marks = []
    for f in info:
        out, pre = index.get(f.get("module")), index.get(f.get("pre") or _pre_of(rows, index, f.get("module")))
        if out is None or pre is None or any(len(rows[i]["shape"] or ()) != 3 for i in (out, pre)):
            return
        marks.append((out, pre))
    for n, (out, pre) in enumerate(marks):
        rows[out]["stage"], rows[pre]["stage_pre"] = n, n


def _pre_of(rows: list[dict], index: dict, name: str | None) -> str | None:
    """The input of the activation whose output ``name`` is (a block's output is its last node's), else ``name``."""
    i = index.get(name)
    if i is None:
        return None
    while i > 0 and rows[i]["kind"] == "block":
        i -= 1
    own = rows[i]["name"] + PRE
    return own if own in index else name


def stages(rows: list[dict]) -> list[list[dict]]:
    """The stages of a :func:`layers` table, in order: each a run of 4-d values of one spatial size (its rows).

    Values larger than the current stage (shortcuts computed late) are left out, and so are pooled
    ``(C, 1, 1)`` heads unless the model has no other 4-d values.

    Example::

        [s[-1]["shape"] for s in stages(kdgraph.layers(model, (3, 32, 32)))]   # [(32, 32, 32), (64, 16, 16), ...]
    """
    spatial = [r for r in rows if r["shape"] is not None and len(r["shape"]) == 3 and r["kind"] != "pre"]
    if any(r["shape"][1:] != (1, 1) for r in spatial):  # pooled (C, 1, 1) heads are not a stage
        spatial = [r for r in spatial if r["shape"][1:] != (1, 1)]
    found: list[list[dict]] = []
    area = None
    for r in spatial:
        h, w = r["shape"][1:]
        if area is None or h * w < area:
            area = h * w
            found.append([])
        if h * w == area:  # values larger than the current stage are shortcuts computed late: skip them
            found[-1].append(r)
    return found


def stage_ends(rows: list[dict], pre: bool) -> list[str]:
    """Default distillation positions from a :func:`layers` table: one per stage, in order.

    Stages a model declares (``feature_info``, marked by :func:`layers`) come first: their outputs, or
    with ``pre`` their pre-activation values. Otherwise the stages are :func:`stages`; with ``pre`` the
    position is the last value of the stage -- the input of an activation when an activation ends it (the
    pre-ReLU value feature methods such as Heo et al.'s need). Without ``pre`` it is the output of the
    outermost block ending last in the stage (the "group output" of AT/SP), or the last value when the
    model has no blocks.
    """
    key = "stage_pre" if pre else "stage"
    declared = sorted((r[key], r["name"]) for r in rows if key in r)
    if declared:
        return [name for _, name in declared]
    names = {r["name"] for r in rows}
    ends = []
    for stage in stages(rows):
        if pre:
            last = next((r for r in reversed(stage) if r["kind"] != "block"), stage[-1])
            ends.append(last["name"] + PRE if last["name"] + PRE in names else last["name"])
        else:
            blocks = [r for r in stage if r["kind"] == "block"]
            ends.append(blocks[-1]["name"] if blocks else stage[-1]["name"])
    return ends
