"""A reference for taps that kdgraph did not compute: values cloned the moment they are produced.

* forward hooks on the eager model (a deep copy) clone every module call's output, and a forward pre-hook
  its input: that covers leaf modules, blocks (a non-leaf module's output, last call) and ``:pre`` of
  activation modules;
* for function and method taps, an fx Interpreter over the *unmodified* traced graph clones each node's
  value right after it runs.

:func:`check_model` compares a tapped model with both, plus the model's output and every buffer.
"""
from __future__ import annotations

import copy
import re
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

import kdgraph
from kdgraph.graph import exact, tracing


def _clone(value: Any) -> Any:
    return exact.clone_at_capture(value)


def _equal(a: Any, b: Any) -> bool:
    return exact._equal(a, b)


class _Cloner(fx.Interpreter):
    def __init__(self, gm, watch):
        super().__init__(gm, garbage_collect_values=False)  # every value stays readable at the end
        self.watch, self.values = set(watch), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            self.values[n] = _clone(out)
        return out


def _cloning_run(model: nn.Module, names: Sequence[str], x: torch.Tensor, seed: int):
    """Run the unmodified graph of a deep copy of ``model``: ``(output, {name: value cloned when produced},
    {name: the same value at the end of the forward})``."""
    model = copy.deepcopy(model)
    traced = tracing._trace(model, (), x)
    wanted = {name: traced.resolve(name) for name in names}
    graph = fx.Graph()
    nodes: dict = {}
    graph.output(graph.graph_copy(traced.graph, nodes))
    cloner = _Cloner(exact.graph_module(traced, graph), [nodes[n] for n in wanted.values()])
    torch.manual_seed(seed)
    out = cloner.run(x.clone())
    return (out, {name: cloner.values[nodes[node]] for name, node in wanted.items()},
            {name: cloner.env[nodes[node]] for name, node in wanted.items()})


def interpreter_reference(model: nn.Module, names: Sequence[str], x: torch.Tensor, seed: int):
    """``(output, {name: value cloned at production})`` from the unmodified graph of a deep copy of the model."""
    out, cloned, _ = _cloning_run(model, names, x, seed)
    return out, cloned


def hook_reference(model: nn.Module, rows: Sequence[dict], names: Sequence[str], x: torch.Tensor, seed: int):
    """``(output, {name: value}, buffers after)`` from the eager model (a deep copy) with cloning hooks, for
    the names that are module calls (``path``, ``path_K`` for the K+1-th call), their ``:pre`` (the call's
    input) or blocks (the module's output, last call)."""
    kinds = {r["name"]: r["kind"] for r in rows}
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    wanted = {re.sub(r"_\d+$", "", n.removesuffix(":pre")) for n in names} | {n.removesuffix(":pre") for n in names}
    calls: dict[str, list] = {}
    handles = []
    for path, module in modules.items():
        if not path or path not in wanted:
            continue
        calls[path] = []
        handles.append(module.register_forward_pre_hook(
            lambda m, args, p=path: calls[p].append([_clone(args[0]) if args else None, None])))
        handles.append(module.register_forward_hook(
            lambda m, args, out, p=path: calls[p][-1].__setitem__(1, _clone(out))))
    torch.manual_seed(seed)
    out = model(x.clone())
    for h in handles:
        h.remove()
    values = {}
    for name in names:
        pre = name.endswith(":pre")
        base = name[:-4] if pre else name
        m = re.fullmatch(r"(.*)_(\d+)", base)
        path, index = (m[1], int(m[2])) if m and m[1] in calls and base not in calls else (base, 0)
        if not calls.get(path):
            continue
        if kinds.get(name) == "block":
            index = len(calls[path]) - 1
        if index < len(calls[path]):
            values[name] = calls[path][index][0 if pre else 1]
    return out, values, [b.detach().clone() for b in model.buffers()]


_UNINITIALISED = {"empty", "new_empty", "empty_like", "new_empty_strided", "empty_strided"}  # no value to compare


def pick(rows: list[dict], overwritten: list[str], n: int = 8) -> list[str]:
    """Up to ``n`` names: values overwritten later first, then ``:pre`` of activations, then others, each
    group spread over the graph."""
    def spread(names, k):
        if len(names) <= k:
            return list(names)
        return [names[round(i * (len(names) - 1) / max(k - 1, 1))] for i in range(k)]
    rows = [r for r in rows if r["op"] not in _UNINITIALISED]
    overwritten = [n for n in overwritten if n in {r["name"] for r in rows}]
    pres = [r["name"] for r in rows if r["kind"] == "pre" and r["name"] not in overwritten]
    others = [r["name"] for r in rows if r["kind"] != "pre" and r["name"] not in overwritten]
    chosen = spread(overwritten, 3)
    chosen += spread(pres, min(3, n - len(chosen)))
    chosen += spread(others, n - len(chosen))
    return chosen


def state(model: nn.Module) -> tuple[dict, list]:
    """What tracing must not change: buffer values, parameters (objects and version counters: any write to
    one bumps it) and every module's attribute names and objects (containers one level deep)."""
    tensors = {k: v.detach().clone() for k, v in model.named_buffers()}
    tensors.update({k: (id(p), p._version) for k, p in model.named_parameters()})
    attrs = [(name, {k: (id(v), _contents(v)) for k, v in m.__dict__.items()}) for name, m in model.named_modules()]
    return tensors, attrs


def _contents(v):
    if isinstance(v, dict):
        return {k: id(x) for k, x in v.items()}
    if isinstance(v, (list, set)):
        return sorted(map(id, v))
    return None


def assert_same_state(before: tuple, after: tuple) -> None:
    tb, ab = before
    ta, aa = after
    assert tb.keys() == ta.keys()
    for k in tb:
        assert _equal(tb[k], ta[k]), f"buffer or parameter {k} changed"
    assert [n for n, _ in ab] == [n for n, _ in aa], "modules changed"
    for (name, b), (_, a) in zip(ab, aa):
        assert b == a, f"attributes of module {name!r} changed: {set(a.items()) ^ set(b.items())}"


def check_model(model: nn.Module, x: torch.Tensor, n_taps: int = 8, seed: int = 0) -> dict[str, Any]:
    """Tap ``model`` (eval, then train) at up to ``n_taps`` names and compare with the references; returns
    what was tapped and how each tap was made exact. Raises AssertionError on any difference."""
    report = {}
    for train in (False, True):
        model.train(train)
        before = state(model)
        rows = kdgraph.layers(model, tuple(x.shape[1:]))
        assert_same_state(before, state(model))
        ref_out, cloned, final = _cloning_run(model, [r["name"] for r in rows], x, seed)
        overwritten = [name for name in cloned if not _equal(cloned[name], final[name])]
        names = pick(rows, overwritten, n_taps)
        del final
        tapped = kdgraph.tap(model, names)
        assert_same_state(before, state(model))
        eager_out, hooked, eager_buffers = hook_reference(model, rows, names, x, seed)
        torch.manual_seed(seed)
        out, feats = tapped(x.clone())
        assert _equal(out, eager_out), "tapped output differs from the eager model's"
        assert _equal(ref_out, eager_out), "the unmodified graph's output differs from the eager model's"
        buffers = [b.detach().clone() for b in model.buffers()]
        assert _equal(buffers, eager_buffers), "buffers differ from the eager model's after one forward"
        for name in names:
            assert _equal(feats[name], cloned[name]), f"{name}: differs from the value cloned at production"
            if name in hooked:
                assert _equal(feats[name], hooked[name]), f"{name}: differs from the forward hook's clone"
        report["train" if train else "eval"] = {"names": names, "overwritten": overwritten,
                                                 "hooked": sorted(n for n in hooked if n in names),
                                                 "how": next(iter(tapped.how.values()))}
    return report
