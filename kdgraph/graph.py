"""Named taps on any model through torch.fx, without editing its ``forward``.

Naming follows ``torchvision.models.feature_extraction``: a leaf module call is named by its module path
(``block2.0.relu1``; a second call of the same module gets ``_1``), a function or method call by the path
of the module it runs in plus the op (``layer1.0.add``), and the path of a non-leaf module names that
module's output (``block2``). ``NAME:pre`` is the input of node ``NAME`` -- for an activation, the
pre-activation value.

A tapped value is the value at the moment it was produced. In-place ops that would later overwrite it
(``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.relu_()``, ``x += y``...) are rewritten
out-of-place, and later readers of the mutated tensor are pointed at the new value, so the model computes
exactly what it computed before. All other in-place ops stay in place. Where a tapped value could be
overwritten through a view, the tap takes a copy instead. Dead code is never eliminated (an unused
``x.relu_()`` still mutates ``x``; see pytorch issue 68301).
"""
from __future__ import annotations

import copy
import inspect
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError, did_you_mean

__all__ = ["layers", "tap", "trace", "Tapped", "Traced", "TraceFailed", "UnknownTap", "stage_ends", "stages"]

PRE = ":pre"

_INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "select", "t", "unfold", "chunk", "split", "unbind",
    "as_strided", "detach", "contiguous", "diagonal", "movedim", "swapaxes", "__getitem__", "view_as_real",
}
_VIEW_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze, torch.narrow,
    torch.select, torch.chunk, torch.split, torch.unbind, torch.t, torch.detach, torch.movedim,
    torch.swapaxes, torch.diagonal, operator.getitem,
}
_VIEW_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                       nn.Softplus)
_ACTIVATION_NAMES = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "elu", "elu_",
                     "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "sigmoid",
                     "sigmoid_", "tanh", "tanh_", "softplus"}


class TraceFailed(UserError):
    """torch.fx could not trace a model."""


class UnknownTap(UserError):
    """A tap name that is not in the model's graph."""


# --------------------------------------------------------------------------------------------- tracing
class _Proxy(fx.Proxy):
    """A Proxy that records augmented assignment (``x += y``) as the in-place op it is.

    Plain fx records ``x += y`` as ``x = x + y``, which changes what a model computes when another name
    still refers to the old ``x``.
    """


def _inplace_dunder(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _op in _INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_op.__name__}__", _inplace_dunder(_op))


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[str] = ()):
        super().__init__()
        self.leaf_modules = set(leaf_modules)
        self.qualname: dict[fx.Node, str] = {}
        self.module_io: dict[str, tuple[fx.Node | None, fx.Node, str]] = {}
        self.failed_in: tuple[str, str] | None = None
        self._scope = ""
        self._used: dict[str, int] = {}

    def proxy(self, node):
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        cls = type(m)
        if qualname in self.leaf_modules or cls.__name__ in self.leaf_modules \
                or f"{cls.__module__}.{cls.__qualname__}" in self.leaf_modules:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        outer, self._scope = self._scope, qualname
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (qualname, type(m).__name__)
            raise
        finally:
            self._scope = outer
        if qualname and isinstance(out, fx.Proxy) and not self.is_leaf_module(m, qualname):
            first = next((a.node for a in args if isinstance(a, fx.Proxy)), None)
            self.module_io[qualname] = (first, out.node, type(m).__name__)
        return out

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        node = proxy.node
        if kind == "call_module":
            base = target
        elif kind in ("placeholder", "get_attr"):
            base = str(target)
        else:  # `x += y` is named `add`, as torchvision (whose fx trace loses the in-place) names it
            op = _INPLACE_OPERATORS[target].__name__ if target in _INPLACE_OPERATORS else \
                re.sub(r"_\d+$", "", node.name)
            base = f"{self._scope}.{op}" if self._scope else op
        count = self._used.get(base, 0)
        self._used[base] = count + 1
        self.qualname[node] = base if count == 0 else f"{base}_{count}"
        return proxy


@dataclass
class Traced:
    """A model's fx graph in one training mode, with kdgraph names for its nodes."""

    model: nn.Module
    graph: fx.Graph
    nodes: dict[str, fx.Node]                                 # name -> node, in graph order
    modules: dict[str, tuple[fx.Node | None, fx.Node, str]]  # non-leaf module path -> (input, output, class)
    names: dict[fx.Node, str] = field(default_factory=dict)  # node -> name

    def resolve(self, name: str) -> fx.Node:
        """The node whose value ``name`` taps (``:pre`` resolved to the node's input)."""
        base, pre = (name[: -len(PRE)], True) if name.endswith(PRE) else (name, False)
        if base in self.nodes and self.nodes[base].op not in ("placeholder", "output", "get_attr"):
            node = self.nodes[base]
            if not pre:
                return node
            src = _first_tensor_arg(node)
            if src is not None:
                return src
            raise UnknownTap(f"layer {base!r} has no tensor input, so {name!r} has no value")
        if base in self.modules:
            src, out, _ = self.modules[base]
            if pre and src is None:
                raise UnknownTap(f"module {base!r} has no tensor input, so {name!r} has no value")
            return src if pre else out
        candidates = self.tap_names()
        raise UnknownTap(f"unknown layer {name!r} in {type(self.model).__name__}"
                         f"{did_you_mean(name, candidates)}; `kdgraph layers MODEL` lists them all")

    def tap_names(self) -> list[str]:
        names = [n for n, node in self.nodes.items() if node.op not in ("placeholder", "output", "get_attr")]
        names += [n + PRE for n, node in self.nodes.items() if _is_activation(node, self.model)]
        return names + list(self.modules)


def trace(model: nn.Module, leaf_modules: Iterable[str] = ()) -> Traced:
    """Trace ``model`` in its current training mode.

    ``leaf_modules`` lists module paths (``features.3``) or class names (``ShuffleBlock``) kept opaque.
    """
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds of errors for untraceable code
        where = (f"in module {tracer.failed_in[0]!r} ({tracer.failed_in[1]})" if tracer.failed_in and
                 tracer.failed_in[0] else f"in {type(model).__name__}.forward")
        hint = (f"keep that module opaque with spec key `trace.leaf_modules: [{tracer.failed_in[0]}]` "
                f"(API: leaf_modules=[{tracer.failed_in[0]!r}]); its inside then cannot be tapped"
                if tracer.failed_in and tracer.failed_in[0] else
                "the model's own forward must be traceable by torch.fx (no Python control flow on tensor "
                "values); wrap the untraceable part in a submodule and list it in `trace.leaf_modules`")
        raise TraceFailed(f"torch.fx cannot trace {type(model).__name__} {where}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n  fix: {hint}") from None
    nodes = {tracer.qualname[n]: n for n in graph.nodes if n in tracer.qualname}
    return Traced(model, graph, nodes, tracer.module_io, {n: k for k, n in nodes.items()})


# ------------------------------------------------------------------------------------- node predicates
def _first_tensor_arg(node: fx.Node) -> fx.Node | None:
    return next((a for a in node.args if isinstance(a, fx.Node)), None)


def _module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(node.target) if node.op == "call_module" else None


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return ""


def _is_activation(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(_module(root, node), _ACTIVATION_MODULES)
    return node.op in ("call_function", "call_method") and _target_name(node) in _ACTIVATION_NAMES


def _inplace_arg_index(fn) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _is_inplace(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return getattr(_module(root, node), "inplace", False) is True
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.target is operator.setitem:
            return True
        if node.kwargs.get("inplace") is True:
            return True
        idx = _inplace_arg_index(node.target)
        if idx is not None and len(node.args) > idx and node.args[idx] is True:
            return True
        name = _target_name(node)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    return False


def _is_view(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(_module(root, node), _VIEW_MODULES)
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target in _VIEW_FUNCTIONS


class _Modules:
    """The model's submodules plus the out-of-place twins made while rewriting (the model is not touched)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.extra: dict[str, nn.Module] = {}

    def get_submodule(self, target: str) -> nn.Module:
        return self.extra[target] if target in self.extra else self.model.get_submodule(target)


def _out_of_place(node: fx.Node, root: _Modules) -> bool:
    """Rewrite in-place ``node`` to its out-of-place twin; False when there is none."""
    if node.op == "call_module":
        twin = copy.copy(_module(root, node))
        twin.inplace = False
        name = f"{node.target}__out_of_place"
        root.extra[name] = twin
        node.target = name
        return True
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS:
            node.target = _INPLACE_OPERATORS[node.target]
            return True
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            return True
        idx = _inplace_arg_index(node.target)
        if idx is not None and len(node.args) > idx and node.args[idx] is True:
            node.args = node.args[:idx] + (False,) + node.args[idx + 1:]
            return True
        name = _target_name(node)
        for namespace in (torch, F, torch.Tensor):
            if getattr(namespace, name, None) is node.target and hasattr(namespace, name[:-1]):
                node.target = getattr(namespace, name[:-1])
                return True
        return False
    if node.op == "call_method" and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]
        return True
    return False


def _protect(graph: fx.Graph, root: _Modules, value: fx.Node) -> fx.Node:
    """Make sure nothing after ``value`` overwrites it; returns the node to tap (``value`` or a copy)."""
    order = list(graph.nodes)
    # Nodes that are the same tensor object as `value`: in-place ops return their first argument.
    same = {value}
    for node in order:
        if _is_inplace(node, root) and node.args and node.args[0] in same:
            same.add(node)
        elif node in same and _is_inplace(node, root) and isinstance(node.args[0], fx.Node):
            same.add(node.args[0])
    changed = True
    while changed:  # close over the chain in both directions
        changed = False
        for node in order:
            if _is_inplace(node, root) and node.args and isinstance(node.args[0], fx.Node):
                if (node in same) != (node.args[0] in same):
                    same |= {node, node.args[0]}
                    changed = True
    views = set()
    for node in order:
        if node.args and _is_view(node, root) and (node.args[0] in same or node.args[0] in views):
            views.add(node)
    after = order[order.index(value) + 1:]
    for i, node in enumerate(after):
        if not (node.args and _is_inplace(node, root)):
            continue
        if node.args[0] in views or not (node.args[0] in same and _out_of_place(node, root)):
            if node.args[0] not in same and node.args[0] not in views:
                continue
            with graph.inserting_after(value):  # overwritten through a view: tap a copy instead
                return graph.call_method("clone", (value,))
        # The op no longer mutates `value`: readers after it of the names that held the old tensor must see
        # the new one. (In-place ops chained on `node` itself stay in place: they mutate the new tensor.)
        pos = order.index(node)
        old = {m for m in same if order.index(m) < pos}
        for later in after[i + 1:]:
            later.args = tuple(node if a in old else a for a in later.args)
            later.kwargs = {k: node if v in old else v for k, v in later.kwargs.items()}
        same = old
        views = {v for v in views if order.index(v) < pos}
    return value


# ------------------------------------------------------------------------------------------ tapped model
def _graph_module(model: nn.Module, graph: fx.Graph, extra: dict[str, nn.Module]) -> fx.GraphModule:
    owners: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in extra:
            owners[node.target] = (model.get_submodule(node.target) if node.op == "call_module"
                                   else _get_attr(model, node.target))
    owners.update(extra)
    return fx.GraphModule(owners, graph, class_name=f"Tapped{type(model).__name__}")


def _get_attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _build(model: nn.Module, names: Sequence[str], leaf_modules: Iterable[str]) -> fx.GraphModule:
    traced = trace(model, leaf_modules)
    graph = traced.graph
    wanted = {name: traced.resolve(name) for name in names}
    modules = _Modules(model)
    protected: dict[fx.Node, fx.Node] = {}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(wanted.values()), key=order.__getitem__):
        protected[node] = _protect(graph, modules, node)
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = ((output.args[0], {name: protected[node] for name, node in wanted.items()}),)
    graph.lint()
    return _graph_module(model, graph, modules.extra)


class Tapped(nn.Module):
    """``model`` whose call returns ``(output, {name: tensor})`` for the requested taps.

    Parameters and buffers stay the model's own (``tapped.model``). The graph is traced per combination of
    submodule training flags, so models that branch on ``self.training`` run the graph of their mode.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], leaf_modules: Iterable[str] = ()):
        super().__init__()
        self.model = model
        self.names = list(dict.fromkeys(names))
        self.leaf_modules = tuple(leaf_modules)
        self._graphs: dict[tuple, fx.GraphModule] = {}
        self._graph()  # fail now on unknown names or untraceable models

    def _graph(self) -> fx.GraphModule:
        key = tuple(m.training for m in self.model.modules())
        if key not in self._graphs:
            self._graphs[key] = _build(self.model, self.names, self.leaf_modules)
        return self._graphs[key]

    def forward(self, *args, **kwargs):
        return self._graph()(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._graphs.clear()  # graphs hold references to the tensors being replaced
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_graphs"] = {}
        return state


def tap(model: nn.Module, names: Sequence[str], leaf_modules: Iterable[str] = ()) -> Tapped:
    """Return a module whose call returns ``(output, {name: tensor})``; see the module docstring for names."""
    return Tapped(model, names, leaf_modules)


# ---------------------------------------------------------------------------------------------- layers
def _propagate(model: nn.Module, graph: fx.Graph, example: torch.Tensor) -> dict[fx.Node, Any]:
    """Shapes of every node from fake tensors: no real compute, cheap for big models."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = _graph_module(model, graph, {})
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    buffers = [(b, b.clone()) for b in model.buffers() if b.device.type != "meta"]
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            Recorder(gm).run(mode.from_tensor(example))
        with torch.no_grad():  # small buffers (BatchNorm's num_batches_tracked) can be updated for real
            for b, saved in buffers:
                b.copy_(saved)
    except Exception:  # e.g. a leaf module with data-dependent control flow: run it for real, leave no trace
        buffers = {k: v.clone() for k, v in model.state_dict().items()}
        values.clear()
        try:
            with torch.no_grad():
                Recorder(gm).run(example.to(next(model.parameters(), example).device))
        finally:
            model.load_state_dict(buffers)
    return values


def _shape(value) -> tuple[int, ...] | None:
    return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def layers(model: nn.Module, input_shape: Sequence[int], leaf_modules: Iterable[str] = (),
           batch_size: int = 2) -> list[dict]:
    """Every tappable name of ``model`` in graph order, with ``name``, ``op``, ``kind`` and ``shape``.

    ``input_shape`` excludes the batch; shapes in the result exclude it too. ``kind`` is ``module`` (leaf
    module call), ``function``, ``method``, ``pre`` (the input of an activation) or ``block`` (the output
    of a non-leaf module; its row also has ``input``, the shape of the module's input, which ``NAME:pre``
    taps). Shapes come from fake tensors, so no real computation happens.
    """
    traced = trace(model, leaf_modules)
    values = _propagate(model, traced.graph, torch.zeros(batch_size, *input_shape))
    block_at: dict[fx.Node, list[str]] = {}
    for path, (_, out, cls) in traced.modules.items():
        block_at.setdefault(out, []).append(path)
    rows: list[dict] = []
    for name, node in traced.nodes.items():
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        shape = _shape(values.get(node))
        if shape is None:
            continue
        if _is_activation(node, model):
            src = _first_tensor_arg(node)
            rows.append({"name": name + PRE, "op": f"input of {_op_label(node, model)}", "kind": "pre",
                         "shape": _shape(values.get(src))})
        kind = {"call_module": "module", "call_function": "function", "call_method": "method"}[node.op]
        rows.append({"name": name, "op": _op_label(node, model), "kind": kind, "shape": shape})
        for path in sorted(block_at.get(node, ()), key=len, reverse=True):  # outermost last
            src = traced.modules[path][0]
            rows.append({"name": path, "op": traced.modules[path][2], "kind": "block", "shape": shape,
                         "input": _shape(values.get(src)) if src is not None else None})
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


def _op_label(node: fx.Node, root: nn.Module) -> str:
    return type(_module(root, node)).__name__ if node.op == "call_module" else _target_name(node)


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
