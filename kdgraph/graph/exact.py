"""Taps that are exact by construction, decided once per graph from PyTorch's own alias tracking.

Every tensor carries a version counter shared by all its aliases (views, ``detach()``, a module or
function that returns its input, a no-op ``.to()``): any in-place write through any of them bumps it --
what autograd uses to detect "modified by an inplace operation". At a graph's first call, a checking run
(:class:`_Checker`, on copies of the inputs, undone afterwards) records each tapped value's version and a
copy when it is produced, and the first node after which the version moved. For each tap that was
written to later, :func:`_decide` picks one fix:

* **out-of-place rewrite** of the writing op (``relu_`` -> ``relu``, ``x += y`` -> ``x + y``,
  ``nn.ReLU(inplace=True)`` -> a copy with ``inplace=False``), when every later reader of the mutated
  tensor can be pointed at the new value: readers that held the very same tensor object (found by
  identity in the checking run, inside lists, tuples, dicts and kwargs too) are redirected; a later
  reader of an older view of it, or of a container holding it, makes the rewrite unsafe;
* otherwise a **copy at capture** (``clone`` right after the value is produced).

A second checking run verifies the result against the first: taps equal to the values copied at
production, model output and buffers bitwise equal. A rewrite that fails the check becomes a copy; copies
never change what the model computes. The steady-state graph holds only the fixes, no checks;
``check=True`` (or ``KDGRAPH_CHECK_TAPS=1``) keeps one version comparison per tap and forward.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .state import unchanged
from .tracing import INPLACE_OPERATORS, Traced, attr_of

__all__ = ["TapOverwritten", "prepare", "clone_at_capture", "versions"]


class TapOverwritten(RuntimeError):
    """A tapped value was written to after it was produced (raised by the per-forward check)."""


# ------------------------------------------------------------------------------------------ small helpers
def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def clone_at_capture(value: Any) -> Any:
    """A copy of every tensor in ``value`` (a tap fixed by copying)."""
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, value)


def versions(value: Any) -> tuple[int, ...]:
    """The version counters of the tensors in ``value`` (empty for inference tensors, which have none)."""
    return tuple(t._version for t in _tensors(value) if not t.is_inference())


def _storage(t: torch.Tensor) -> int | None:
    try:
        storage = t.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, some subclasses
        return None


def _equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two values (NaN equal to NaN), recursing into containers."""
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if not isinstance(x, torch.Tensor):
            continue
        if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
            return False
        if not torch.equal(x, y):
            if not x.is_floating_point() and not x.is_complex():
                return False
            nx, ny = torch.isnan(x), torch.isnan(y)
            if not (torch.equal(nx, ny) and torch.equal(x.masked_fill(nx, 0), y.masked_fill(ny, 0))):
                return False
    return True


# --------------------------------------------------------------------------------- out-of-place twins
def _inplace_arg_index(fn) -> int | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _twin(node: fx.Node, owner: nn.Module) -> Any:
    """What in-place ``node`` becomes out of place: ``(field, value)`` to set on the node, or a module;
    None when it has no out-of-place twin."""
    if node.op == "call_module":
        module = owner.get_submodule(node.target)
        if getattr(module, "inplace", None) is not True:
            return None
        twin = copy.copy(module)
        twin.inplace = False
        return twin
    if node.op == "call_method":
        name = node.target
        return ("target", name[:-1]) if name.endswith("_") and not name.startswith("_") \
            and callable(getattr(torch.Tensor, name[:-1], None)) else None
    if node.op != "call_function":
        return None
    target = node.target
    if target in INPLACE_OPERATORS:
        return ("target", INPLACE_OPERATORS[target])
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
        packet = getattr(torch.ops.aten, name[:-1], None) if name.endswith("_") else None
        overload = getattr(packet, target._overloadname, None) if packet is not None else None
        return ("target", overload) if overload is not None else None
    if node.kwargs.get("inplace") is True:
        return ("kwargs", {**node.kwargs, "inplace": False})
    idx = _inplace_arg_index(target)
    if idx is not None and len(node.args) > idx and node.args[idx] is True:
        return ("args", node.args[:idx] + (False,) + node.args[idx + 1:])
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        for namespace in (torch, torch.nn.functional):
            if getattr(namespace, name, None) is target and callable(getattr(namespace, name[:-1], None)):
                return ("target", getattr(namespace, name[:-1]))
    return None


def _make_out_of_place(node: fx.Node, twin: Any, extra: dict[str, nn.Module]) -> None:
    if isinstance(twin, nn.Module):
        name = f"{node.target.replace('.', '_')}_out_of_place"
        extra[name] = twin
        node.target = f"{_EXTRA}.{name}"
    else:
        setattr(node, twin[0], twin[1])


# ------------------------------------------------------------------------------------- the checking run
class _Checker(fx.Interpreter):
    """Runs a graph keeping every value alive (identities and storages stay unique), recording for each
    watched node the versions and a copy of its value when produced, and the first node that wrote to it."""

    def __init__(self, gm: fx.GraphModule, watch: Iterable[fx.Node]):
        super().__init__(gm, garbage_collect_values=False)
        self.watch = set(watch)
        self.index: dict[fx.Node, int] = {}
        self.values: dict[fx.Node, Any] = {}
        self.born: dict[int, int] = {}
        self.captured: dict[fx.Node, Any] = {}
        self.writer: dict[fx.Node, fx.Node] = {}
        self._pending: dict[fx.Node, list[tuple[torch.Tensor, int]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        i = self.index[n] = len(self.index)
        self.values[n] = out
        leaves = _tensors(out)
        for t in leaves:
            self.born.setdefault(id(t), i)
        for w, seen in list(self._pending.items()):
            if any(t._version != v for t, v in seen):
                self.writer[w] = n
                del self._pending[w]
        if n in self.watch:
            self._pending[n] = [(t, t._version) for t in leaves]
            self.captured[n] = clone_at_capture(out)
        return out

    def written(self, node: fx.Node) -> bool:
        """Whether ``node``'s value changed after it was produced (by version, or by content for writes
        that bypass version counters, such as through ``.data``)."""
        return node in self.writer or not _equal(self.values[node], self.captured[node])


@dataclass
class _Run:
    checker: _Checker
    output: Any
    buffers: list[torch.Tensor]
    tapped: dict[str, fx.Node]  # tap name -> node of this run's graph
    nodes: dict[fx.Node, fx.Node]  # node of the traced graph -> node of this run's graph


# ---------------------------------------------------------------------------------- fixes and their plan
@dataclass
class _Fixes:
    """Writers (nodes of the traced graph) made out of place, each with the nodes its later readers stop
    reading in favour of it, and tapped nodes copied at capture."""

    rewrite: dict[fx.Node, set[fx.Node]] = field(default_factory=dict)
    clone: set[fx.Node] = field(default_factory=set)


def _plan(run: _Checker, tapped: fx.Node, writer: fx.Node) -> set[fx.Node] | None:
    """The nodes to redirect to ``writer`` made out of place, or None when that is not provably safe
    (nodes of the checked graph)."""
    if not writer.args or not isinstance(writer.args[0], fx.Node):
        return None
    mutated = run.values[writer.args[0]]
    key = _storage(mutated) if isinstance(mutated, torch.Tensor) else None
    if key is None or not any(_storage(t) == key for t in _tensors(run.values[tapped])):
        return None  # the op wrote to the tap through another argument (out=, a module's side effect...)
    same = {n for n, v in run.values.items() if v is mutated}
    if any(n.op in ("placeholder", "get_attr") for n in same):
        return None  # the write is meant to reach the caller's input or the model's own state
    at = run.index[writer]
    for reader, i in run.index.items():
        if i <= at:
            continue
        for arg in reader.all_input_nodes:
            if arg in same:
                continue
            for t in _tensors(run.values.get(arg)):
                if t is mutated:
                    return None  # read back out of a container
                if run.born.get(id(t), at + 1) <= at and _storage(t) in (key, None):
                    return None  # an older view of the mutated tensor, read after the write
    return same


# ------------------------------------------------------------------------------------- graph building
_MODEL, _EXTRA, _CONST = "model", "kdgraph_twins", "kdgraph_constants"


def _resolves(model: nn.Module, target: str, value: Any) -> bool:
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return False
    return obj is value


_MISSING = object()


def graph_module(traced: Traced, graph: fx.Graph, extra: Mapping[str, nn.Module] = ()) -> fx.GraphModule:
    """A GraphModule running ``graph`` (whose targets it rewrites) against the live model: they resolve
    through ``self.model`` at every call, so ``model.to()`` replacing buffers is seen; tensor constants of
    the trace and out-of-place twins of modules are its own."""
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=f"Tapped{type(traced.model).__name__}")
    gm.add_module(_MODEL, traced.model)
    gm.add_module(_EXTRA, nn.Module())
    gm.add_module(_CONST, nn.Module())
    for name, module in dict(extra).items():
        getattr(gm, _EXTRA).add_module(name, module)
    constants: dict[str, str] = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target.startswith(_EXTRA + "."):
            continue
        value = traced.attrs[node.target] if node.target in traced.attrs else attr_of(traced.owner, node.target)
        if _resolves(traced.model, node.target, value):
            node.target = f"{_MODEL}.{node.target}"
        else:  # fx's tensor constants, torch.export's lifted constants and input guards
            if node.target not in constants:
                constants[node.target] = f"c{len(constants)}"
                holder = getattr(gm, _CONST)
                if isinstance(value, nn.Module):
                    holder.add_module(constants[node.target], value)
                else:
                    setattr(holder, constants[node.target], value)
            node.target = f"{_CONST}.{constants[node.target]}"
    gm.graph = graph
    return gm


def _copy(traced: Traced, fixes: _Fixes, taps: Mapping[str, fx.Node]):
    """A copy of the traced graph with ``fixes`` applied: ``(graph, {name: node}, twins)``."""
    graph = fx.Graph()
    nodes: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(traced.graph, nodes)
    nodes[next(n for n in traced.graph.nodes if n.op == "output")] = graph.output(out)
    extra: dict[str, nn.Module] = {}
    order = list(graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    for writer, same in fixes.rewrite.items():
        w = nodes[writer]
        _make_out_of_place(w, _twin(writer, traced.owner), extra)
        stale = {nodes[n] for n in same} - {w}
        for reader in order[position[w] + 1:]:
            reader.args = fx.node.map_arg(reader.args, lambda a: w if a in stale else a)
            reader.kwargs = fx.node.map_arg(reader.kwargs, lambda a: w if a in stale else a)
    copies: dict[fx.Node, fx.Node] = {}
    for node in sorted(fixes.clone, key=lambda n: position[nodes[n]]):
        with graph.inserting_after(nodes[node]):
            copies[node] = graph.call_function(clone_at_capture, (nodes[node],))
    tapped = {name: copies.get(node, nodes[node]) for name, node in taps.items()}
    return graph, tapped, extra, nodes


def _run(traced: Traced, fixes: _Fixes, taps: Mapping[str, fx.Node], args: tuple, kwargs: dict) -> _Run:
    """A checking run of the graph with ``fixes``, on copies of the inputs; the model is left unchanged."""
    graph, tapped, extra, nodes = _copy(traced, fixes, taps)
    gm = graph_module(traced, graph, extra)
    checker = _Checker(gm, tapped.values())
    inputs = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
              for a in args]
    with unchanged(traced.model):
        output = checker.run(*inputs, **kwargs)
        buffers = [b.detach().clone() for b in traced.model.buffers()]
    return _Run(checker, output, buffers, tapped, nodes)


def _decide(traced: Traced, taps: Mapping[str, fx.Node], args: tuple, kwargs: dict) -> tuple[_Fixes, set]:
    ref = _run(traced, _Fixes(), taps, args, kwargs)
    checker, original = ref.checker, {c: n for n, c in ref.nodes.items()}
    order = {n: i for i, n in enumerate(traced.graph.nodes)}
    written = {n for n in taps.values() if checker.written(ref.nodes[n])}
    if not written:
        return _Fixes(), written
    fixes = _Fixes()
    for node in sorted(written, key=order.__getitem__):
        writer = original.get(checker.writer.get(ref.nodes[node]))
        same = None
        if writer is not None and _twin(writer, traced.owner) is not None:
            same = _plan(checker, ref.nodes[node], ref.nodes[writer])
        if same is None:
            fixes.clone.add(node)
        elif writer not in fixes.rewrite:
            fixes.rewrite[writer] = {original[n] for n in same}
    for _ in range(2):
        if not fixes.rewrite:
            return fixes, written
        try:
            bad = _verify(traced, ref, _run(traced, fixes, taps, args, kwargs), taps)
        except Exception:  # a twin that does not take the in-place op's arguments
            bad = "output"
        if bad is None:
            return fixes, written
        if bad == "output":
            break
        fixes.clone |= bad
    return _Fixes(clone=set(written)), written  # copies at capture never change what the model computes


def _verify(traced: Traced, ref: _Run, run: _Run, taps: Mapping[str, fx.Node]):
    """None if ``run`` (with fixes) matches ``ref``; "output" if the model's output or buffers differ; else
    the tapped nodes whose value differs from the one copied at production in ``ref``."""
    if not _equal(run.output, ref.output) or not _equal(run.buffers, ref.buffers):
        return "output"
    bad = set()
    for name, node in taps.items():
        mine = run.tapped[name]
        if run.checker.written(mine) or not _equal(run.checker.values[mine], ref.checker.captured[ref.nodes[node]]):
            bad.add(node)
    return bad or None


def prepare(traced: Traced, names: Iterable[str], args: tuple, kwargs: dict, check: bool):
    """The exact graph module returning ``(output, {name: value})`` (and the tapped values' versions when
    ``check``), and how each tap was made exact: ``{name: "kept" | "out-of-place" | "copied"}``."""
    taps = {name: traced.resolve(name) for name in names}
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):
        fixes, written = _decide(traced, taps, args, kwargs)
    graph, tapped, extra, _ = _copy(traced, fixes, taps)
    output = next(n for n in graph.nodes if n.op == "output")
    result = (output.args[0], tapped)
    if check:
        seen = {}
        for name, node in tapped.items():
            with graph.inserting_after(node):
                seen[name] = graph.call_function(versions, (node,))
        result += (seen,)
    output.args = (result,)
    graph.lint()
    how = {name: "copied" if node in fixes.clone else "out-of-place" if node in written else "kept"
           for name, node in taps.items()}
    return graph_module(traced, graph, extra), how
