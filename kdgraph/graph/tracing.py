"""A model's graph with kdgraph's tap names: torch.fx where it can trace, ``torch.export`` where it cannot.

Both paths name a value the same way (see :mod:`kdgraph.graph`): fx from the tracer's module scope,
``torch.export`` from each node's ``nn_module_stack``, with a leaf module's aten ops folded into one call.
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..errors import UserError, did_you_mean
from .state import unchanged

PRE = ":pre"

INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv, operator.imod: operator.mod,
    operator.ipow: operator.pow, operator.iand: operator.and_, operator.ior: operator.or_,
    operator.ixor: operator.xor, operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
    operator.imatmul: operator.matmul,
}
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                       nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh,
                       nn.Softplus)
_ACTIVATION_NAMES = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "elu", "elu_",
                     "selu", "celu", "gelu", "silu", "silu_", "mish", "hardswish", "hardswish_", "hardsigmoid",
                     "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_", "softplus"}
_NOT_TAPS = ("placeholder", "output", "get_attr")


class TraceFailed(UserError):
    """Neither torch.fx nor torch.export could trace a model."""


class UnknownTap(UserError):
    """A tap name that is not in the model's graph."""


@dataclass(frozen=True)
class Tap:
    """One row of the tap table: the node whose value the name taps, its kind and a label for its op."""

    node: fx.Node
    kind: str  # module, function, method, pre (input of an activation) or block (a non-leaf module's output)
    op: str


@dataclass
class Traced:
    """A model's graph in one training mode, with kdgraph's names for its values.

    ``taps`` maps every listed name to its :class:`Tap`, in graph order; ``inputs`` maps a name to the node
    ``NAME:pre`` reads (any layer or block has one, the listed ``:pre`` names are those of activations);
    ``modules`` maps a non-leaf module path to ``(input node, output node, class name)``. ``owner`` is what
    the graph's ``get_attr`` and ``call_module`` targets resolve against (the model itself for fx). ``via``
    says which tracer made the graph: ``"fx"`` or ``"export"``.
    """

    model: nn.Module
    graph: fx.Graph
    owner: nn.Module
    taps: dict[str, Tap]
    inputs: dict[str, fx.Node]
    modules: dict[str, tuple[fx.Node | None, fx.Node, str]]
    via: str = "fx"
    attrs: dict[str, Any] = field(default_factory=dict)  # get_attr target -> its value when traced
    dynamic_batch: bool = True  # False where torch.export specialised the batch size

    def resolve(self, name: str) -> fx.Node:
        """The node whose value ``name`` taps (``NAME:pre`` resolved to the input of ``NAME``)."""
        if name in self.taps:
            return self.taps[name].node
        if name.endswith(PRE) and name[: -len(PRE)] in self.taps:
            base = name[: -len(PRE)]
            if self.inputs.get(base) is not None:
                return self.inputs[base]
            raise UnknownTap(f"layer {base!r} has no tensor input, so {name!r} has no value")
        raise UnknownTap(f"unknown layer {name!r} in {type(self.model).__name__}"
                         f"{did_you_mean(name, self.taps)}; `kdgraph layers MODEL` lists them all")

    def tap_names(self) -> list[str]:
        return list(self.taps)


# ------------------------------------------------------------------------------------ which modules are leaves
class _Leaves:
    """fx's rule (``torch.nn`` modules but containers), plus the user's paths and class names and timm's
    not-traceable modules."""

    def __init__(self, names: Iterable[str], classes: tuple[type, ...] = ()):
        self.names = set(names)
        self.classes = classes

    def __call__(self, m: nn.Module, qualname: str) -> bool:
        cls = type(m)
        if qualname in self.names or cls.__name__ in self.names \
                or f"{cls.__module__}.{cls.__qualname__}" in self.names or isinstance(m, self.classes):
            return True
        return cls.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, nn.Sequential)

    def plus(self, classes: Sequence[type]) -> "_Leaves":
        return _Leaves(self.names, self.classes + tuple(classes))


def _timm_not_traceable() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's own registry of modules and functions fx must not trace into (empty when timm is not loaded:
    a model holding timm modules has imported it)."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


# ------------------------------------------------------------------------------------------- torch.fx
class _Proxy(fx.Proxy):
    """A Proxy that records augmented assignment (``x += y``) as the in-place op it is.

    Plain fx records ``x += y`` as ``x = x + y``, which changes what a model computes when another name
    still refers to the old ``x``.
    """


def _inplace_dunder(op):
    def method(self, other):
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _op in INPLACE_OPERATORS:
    setattr(_Proxy, f"__{_op.__name__}__", _inplace_dunder(_op))


class _Tracer(fx.Tracer):
    # Buffers are proxied like parameters: Python code reading them (timm's `num_batches_tracked.add_(1)`,
    # `float(self.num_batches_tracked)`) is recorded or fails, instead of running once at trace time.
    proxy_buffer_attributes = True

    def __init__(self, leaves: _Leaves, autowrap: tuple[Callable, ...] = ()):
        super().__init__(autowrap_functions=autowrap)
        self.leaves = leaves
        self.qualname: dict[fx.Node, str] = {}
        self.module_io: dict[str, tuple[fx.Node | None, fx.Node, str]] = {}
        self.failed_in: tuple[str, type] | None = None
        self._scope = ""
        self._used: dict[str, int] = {}

    def proxy(self, node):
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.leaves(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        outer, self._scope = self._scope, qualname
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module the error came through
                self.failed_in = (qualname, type(m))
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
            op = INPLACE_OPERATORS[target].__name__ if target in INPLACE_OPERATORS else \
                re.sub(r"_\d+$", "", node.name)
            base = f"{self._scope}.{op}" if self._scope else op
        count = self._used.get(base, 0)
        self._used[base] = count + 1
        self.qualname[node] = base if count == 0 else f"{base}_{count}"
        return proxy


class _FxFailed(Exception):
    """fx could not trace: ``classes`` lists ``(class, first path, error)`` of every module that failed
    (each retried as a leaf), ``root`` the error of the model's own forward if that failed too."""

    def __init__(self, classes: list[tuple[type, str, str]], root: str | None):
        super().__init__(root or "")
        self.classes, self.root = classes, root


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _none_defaults(model: nn.Module) -> dict[str, None]:
    """The optional arguments of ``model.forward`` after the input that default to None (``mask=None``).

    fx would trace them as Proxies, so ``if mask is not None:`` would take the branch a call with the input
    alone never runs; traced as None, the graph is that call's, and passing one raises fx's "specialized to
    have value None" error.
    """
    fn = type(model).forward
    code = getattr(fn, "__code__", None)
    if code is None:
        return {}
    names = code.co_varnames[1:code.co_argcount]  # after self: the input, then the others
    defaults = fn.__defaults__ or ()
    optional = zip(names[len(names) - len(defaults):], defaults)
    found = {name: None for name, value in optional if value is None and name != names[0]}
    found.update({name: None for name, value in (fn.__kwdefaults__ or {}).items() if value is None})
    return found


def _fx_trace(model: nn.Module, leaves: _Leaves, autowrap: tuple[Callable, ...]) -> tuple[fx.Graph, _Tracer]:
    """Trace with fx; on failure keep tracing with each failing class as a leaf, to name them all at once."""
    failed: list[tuple[type, str, str]] = []
    while True:
        tracer = _Tracer(leaves.plus([c for c, _, _ in failed]), autowrap)
        try:
            graph = tracer.trace(model, concrete_args=_none_defaults(model) or None)
        except Exception as e:
            where = tracer.failed_in
            if where is None or not where[0] or any(c is where[1] for c, _, _ in failed) or len(failed) >= 50:
                raise _FxFailed(failed, _first_line(e)) from None
            failed.append((where[1], where[0], _first_line(e)))
            continue
        if failed:
            raise _FxFailed(failed, None)
        return graph, tracer


def _is_activation_module(m: nn.Module) -> bool:
    return isinstance(m, _ACTIVATION_MODULES)


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def first_tensor_arg(node: fx.Node) -> fx.Node | None:
    """The node's first argument that is another node's value (a parameter only when nothing else is)."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    return next((a for a in args if a.op != "get_attr"), args[0] if args else None)


def _name_fx(model: nn.Module, graph: fx.Graph, tracer: _Tracer) -> Traced:
    block_at: dict[fx.Node, list[str]] = {}
    for path, (_, out, _) in tracer.module_io.items():
        block_at.setdefault(out, []).append(path)
    taps: dict[str, Tap] = {}
    inputs: dict[str, fx.Node | None] = {}
    for node in graph.nodes:
        name = tracer.qualname.get(node)
        if name is None or node.op in _NOT_TAPS:
            continue
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            kind, op, activation = "module", type(module).__name__, _is_activation_module(module)
        else:
            kind = "method" if node.op == "call_method" else "function"
            op = _op_name(node)
            activation = op in _ACTIVATION_NAMES
        inputs[name] = first_tensor_arg(node)
        if activation and inputs[name] is not None:
            taps[name + PRE] = Tap(inputs[name], "pre", f"input of {op}")
        taps[name] = Tap(node, kind, op)
        for path in sorted(block_at.get(node, ()), key=len, reverse=True):  # outermost last
            src, out, cls = tracer.module_io[path]
            taps[path] = Tap(out, "block", cls)
            inputs[path] = src
    return Traced(model, graph, model, taps, inputs, dict(tracer.module_io), "fx")


# --------------------------------------------------------------------------------------- torch.export
def _tensor_valued(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _export(model: nn.Module, args: tuple, leaves: _Leaves) -> Traced:
    """Trace with ``torch.export`` (non-strict), batch dimension dynamic, and name nodes as fx would."""
    from torch.export import Dim, export

    dynamic = tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    with _quiet_torch():
        program = export(model, tuple(args), strict=False, dynamic_shapes=dynamic)
    owner = program.module()
    graph = owner.graph
    out_spec = graph._codegen.pytree_info.out_spec
    graph._codegen = fx.graph.CodeGen()  # plain forward(x): inputs are positional tensors
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (pytree.tree_unflatten(list(output.args[0]), out_spec),)
    taps, inputs, modules = _ExportNames(model, graph, leaves).run()
    first = next((n.meta.get("val") for n in graph.nodes if n.op == "placeholder"), None)
    dynamic = not (isinstance(first, torch.Tensor) and first.dim() and isinstance(first.shape[0], int))
    return Traced(model, graph, owner, taps, inputs, modules, "export", dynamic_batch=dynamic)


@contextlib.contextmanager
def _quiet_torch():
    """torch.export prints partial graphs and logs warnings when it fails; kdgraph reports the failure."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch")]
    states = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, state in zip(loggers, states):
            lg.disabled = state


class _ExportNames:
    """fx's names for an exported graph: a leaf module's ops are one call named by its path (``_1`` for a
    second call), other ops ``scope.op`` with the in-place ``_`` dropped, non-leaf modules name their output."""

    def __init__(self, model: nn.Module, graph: fx.Graph, leaves: _Leaves):
        self.model, self.graph, self.leaves = model, graph, leaves
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self._leaf: dict[str, bool] = {}

    def exists(self, path: str) -> bool:
        if path not in self._leaf:
            try:
                self._leaf[path] = self.leaves(self.model.get_submodule(path), path)
            except AttributeError:
                self._leaf[path] = None
        return self._leaf[path] is not None

    def is_leaf(self, path: str) -> bool:
        return self.exists(path) and bool(self._leaf[path])

    def scopes(self, node: fx.Node) -> list[tuple[str, str, str]]:
        """``(call key, path, class)`` from the root's child down to the leaf call the node belongs to."""
        out = []
        for key, (path, cls) in (node.meta.get("nn_module_stack") or {}).items():
            if not path or not self.exists(path):
                continue
            out.append((key, path, cls.rsplit(".", 1)[-1] if isinstance(cls, str) else cls.__name__))
            if self.is_leaf(path):
                break
        return out

    def run(self):
        members: dict[str, list[fx.Node]] = {}
        info: dict[str, tuple[str, str]] = {}
        named: list[tuple[fx.Node, str | None]] = []  # call_function nodes and the leaf call they belong to
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            scopes = self.scopes(node)
            for key, path, cls in scopes:
                members.setdefault(key, []).append(node)
                info[key] = (path, cls)
            leaf = scopes[-1][0] if scopes and self.is_leaf(scopes[-1][1]) else None
            named.append((node, leaf, scopes[-1][1] if scopes else ""))
        ends = {key: self.boundary(nodes) for key, nodes in members.items()}
        used: dict[str, int] = {}
        taps: dict[str, Tap] = {}
        inputs: dict[str, fx.Node | None] = {}
        modules: dict[str, tuple[fx.Node | None, fx.Node, str]] = {}
        blocks: dict[fx.Node, list[str]] = {}
        for key, (src, out) in ends.items():
            path, cls = info[key]
            if out is not None and not self.is_leaf(path):
                modules[path] = (src, out, cls)
        for path, (_, out, _) in modules.items():
            blocks.setdefault(out, []).append(path)
        done: set[str] = set()
        for node, leaf, scope in named:
            if leaf is not None:
                if leaf in done or ends[leaf][1] is not node:
                    continue
                done.add(leaf)
                path, cls = info[leaf]
                name, src, kind, op = self.fresh(path, used), ends[leaf][0], "module", cls
                activation = isinstance(self.model.get_submodule(path), _ACTIVATION_MODULES)
            elif _tensor_valued(node):
                op = _op_name(node)
                op = op[:-1] if op.endswith("_") and not op.endswith("__") else op
                name = self.fresh(f"{scope}.{op}" if scope else op, used)
                src, kind, activation = first_tensor_arg(node), "function", op in _ACTIVATION_NAMES
            else:
                continue
            inputs[name] = src
            if activation and src is not None:
                taps[name + PRE] = Tap(src, "pre", f"input of {op}")
            taps[name] = Tap(node, kind, op)
            for path in sorted(blocks.get(node, ()), key=len, reverse=True):
                taps[path] = Tap(node, "block", modules[path][2])
                inputs[path] = modules[path][0]
        return taps, inputs, modules

    @staticmethod
    def fresh(base: str, used: dict[str, int]) -> str:
        count = used.get(base, 0)
        used[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def boundary(self, nodes: list[fx.Node]) -> tuple[fx.Node | None, fx.Node | None]:
        """A call's input (the first tensor it reads from outside) and output (the last tensor read outside)."""
        inside = set(nodes)
        src = next((a for n in nodes for a in n.all_input_nodes
                    if a not in inside and a.op != "get_attr" and _tensor_valued(a)), None)
        outs = [n for n in nodes if _tensor_valued(n) and any(u not in inside for u in n.users)]
        return src, (outs[-1] if outs else None)


# -------------------------------------------------------------------------------------------- trace()
class NeedsExample(Exception):
    """fx cannot trace the model and no example input was given to trace it with torch.export."""

    def __init__(self, failure: _FxFailed):
        super().__init__(failure.root or "")
        self.failure = failure


def _fx_message(model: nn.Module, failure: _FxFailed) -> str:
    parts = []
    if failure.classes:
        listed = "; ".join(f"{cls.__name__} (first at {path!r}: {err})" for cls, path, err in failure.classes)
        names = ", ".join(cls.__name__ for cls, _, _ in failure.classes)
        parts.append(f"torch.fx cannot trace {len(failure.classes)} module class(es) of "
                     f"{type(model).__name__}: {listed}\n  fix: keep them opaque with spec key "
                     f"`trace.leaf_modules: [{names}]` (API: leaf_modules={[c.__name__ for c, _, _ in failure.classes]!r}); "
                     f"their insides then cannot be tapped")
    if failure.root:
        parts.append(f"torch.fx cannot trace {type(model).__name__}.forward itself: {failure.root}\n  fix: the "
                     f"model's own forward must be traceable by torch.fx (no Python control flow on tensor "
                     f"values); move the untraceable part into a submodule and list it in `trace.leaf_modules`")
    return "\n".join(parts)


def trace(model: nn.Module, leaf_modules: Iterable[str] = (), example: Any = None) -> Traced:
    """Trace ``model`` in its current training mode and name every value kdgraph can tap.

    torch.fx traces first. Modules that fx cannot trace are each retried as a leaf, so that the error
    names every failing class at once; timm's own not-traceable modules and functions are leaves without
    asking. Where fx fails and ``example`` is given, ``torch.export`` (non-strict, dynamic batch) traces
    the model instead, with the same names. Tracing leaves the model exactly as it was (see
    :func:`kdgraph.graph.state.unchanged`).

    Args:
        model: any ``nn.Module``; never modified.
        leaf_modules: module paths (``features.3``) or class names (``ShuffleBlock``) kept opaque: their
            output is a tap, their inside is not.
        example: an input tensor (or a tuple of positional inputs) for the ``torch.export`` fallback.

    Returns:
        a :class:`Traced`: the graph, ``taps`` (name -> node, kind, op) and ``resolve(name)``.

    Raises:
        TraceFailed: fx cannot trace the model (and torch.export could not either, or had no ``example``);
            the message lists every failing module class and the ``trace.leaf_modules`` line that fixes it.

    Example::

        >>> traced = trace(torchvision.models.resnet18())
        >>> traced.resolve("layer1.0.relu_1:pre").name
        'iadd'
    """
    try:
        return _trace(model, leaf_modules, example)
    except NeedsExample as e:
        raise TraceFailed(_fx_message(model, e.failure) + "\n  or pass an example input (trace(model, example=x)) "
                          "to let kdgraph trace it with torch.export") from None


def attr_of(root: nn.Module, target: str) -> Any:
    """The object at dotted path ``target`` under ``root`` (a get_attr or call_module node's target)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def as_args(example: Any) -> tuple:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _trace(model: nn.Module, leaf_modules: Iterable[str], example: Any) -> Traced:
    classes, functions = _timm_not_traceable()
    leaves = _Leaves(leaf_modules, classes)
    with unchanged(model):
        try:
            graph, tracer = _fx_trace(model, leaves, functions)
            traced = _name_fx(model, graph, tracer)
            traced.attrs = {n.target: attr_of(model, n.target) for n in graph.nodes if n.op == "get_attr"}
            return traced  # (fx puts tensor constants on the model while tracing; they are taken off again)
        except _FxFailed as failure:
            if example is None:
                raise NeedsExample(failure) from None
            fx_failure = failure
        try:
            return _export(model, as_args(example), leaves)
        except Exception as e:
            export_error = _first_line(e)
    hint = ""
    if any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in as_args(example)) \
            and any(isinstance(m, nn.Embedding) for m in model.modules()):
        hint = ("\n  (a token model? give it token ids: `kdgraph layers --input-dtype long`, "
                "layers(..., input_dtype=torch.long))")
    raise TraceFailed(f"{_fx_message(model, fx_failure)}\n  torch.export (non-strict) cannot trace it either: "
                      f"{export_error}{hint}")
