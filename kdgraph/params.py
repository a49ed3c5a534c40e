"""Parameter types and ranges, declared once in a signature and checked before anything is built.

A loss term's ``__init__`` and a dataset builder take their spec keys as keyword arguments; their type
annotations say what each key takes, and :func:`check_arguments` checks spec values against them, so a bad
value is a located spec problem (``loss.1.temperature: expected a number > 0, got 0``) rather than a NaN
or a traceback in the middle of training. Ranges are ``typing.Annotated`` metadata::

    from kdgraph.params import Positive, Probability

    class MyTerm(Term):
        def __init__(self, weight=None, warmup_epochs=0.0, temperature: Positive = 4.0,
                     mix: Probability = 0.5, mode: Literal["sum", "mean"] = "mean"): ...

Understood annotations: ``float`` (a finite real number; ints accepted), ``int``, ``bool``, ``str``,
``None``, ``Literal[...]``, unions (``float | None``), ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``,
``Sequence[T]`` (YAML lists stand for tuples) and ``Annotated[T, Range(...)]``. Parameters without an
annotation, or with one not listed here, are passed through unchecked. A subclass parameter without an
annotation takes the annotation of the same parameter in a base class (so ``weight`` is checked for
every term).
"""
from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Iterable, Literal

__all__ = ["Range", "Positive", "NonNegative", "Probability", "PositiveInt", "NonNegativeInt",
           "check_arguments", "check_value", "coerce_arguments", "describe", "hints"]


@dataclass(frozen=True)
class Range:
    """Bounds on a number: ``gt``/``ge`` below, ``lt``/``le`` above (``None``: unbounded)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, x: float) -> bool:
        return ((self.gt is None or x > self.gt) and (self.ge is None or x >= self.ge)
                and (self.lt is None or x < self.lt) and (self.le is None or x <= self.le))

    def __str__(self) -> str:
        parts = [f"{op} {v:g}" for op, v in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
                 if v is not None]
        return " and ".join(parts)


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Probability = Annotated[float, Range(ge=0, le=1)]
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]


# ------------------------------------------------------------------------------------------ annotations
def _eval(annotation: Any, namespace: dict) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:  # `from __future__ import annotations` keeps them as text; names come from the function's module
        return eval(annotation, dict(namespace), {})  # noqa: S307 - the text of a signature, not of a spec
    except Exception:  # noqa: BLE001 - a name we cannot resolve: the parameter goes unchecked
        return inspect.Parameter.empty


def hints(fn: Callable) -> dict[str, Any]:
    """``{parameter: annotation}`` of a callable (a class: its ``__init__``, base classes filling gaps)."""
    fn = fn.func if isinstance(fn, functools.partial) else fn
    chain = [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)] if isinstance(fn, type) else [fn]
    out: dict[str, Any] = {}
    for f in chain:
        try:
            params = inspect.signature(f).parameters
        except (TypeError, ValueError):
            continue
        namespace = getattr(inspect.unwrap(f), "__globals__", {})
        for name, p in params.items():
            if name not in out and p.annotation is not inspect.Parameter.empty:
                out[name] = _eval(p.annotation, namespace)
    return {k: v for k, v in out.items() if v is not inspect.Parameter.empty}


# ---------------------------------------------------------------------------------------------- checking
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def describe(annotation: Any) -> str:
    """A reader's name for what ``annotation`` takes: ``a number > 0``, ``one of 'a', 'b'``..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        ranges = [str(m) for m in annotation.__metadata__ if isinstance(m, Range)]
        return describe(args[0]) + "".join(f" {r}" for r in ranges)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
        return f"a list of ({describe(args[0]) if args else 'values'})"
    return {float: "a number", int: "an integer", bool: "true or false", str: "text",
            type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def check_value(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` fits ``annotation``; ``None`` when the annotation is not one this module knows."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        inner = check_value(value, args[0])
        ranges = [m for m in annotation.__metadata__ if isinstance(m, Range)]
        if inner is False or not ranges:
            return inner
        return _is_number(value) and all(r.holds(value) for r in ranges)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        results = [check_value(value, a) for a in args]
        return True if True in results else (None if None in results else False)
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        return _check_sequence(value, origin or annotation, args)
    if annotation is float:
        return _is_number(value) and _finite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    return None


def _finite(x: float) -> bool:
    try:
        return math.isfinite(float(x))
    except OverflowError:  # an int beyond any float
        return False


def _takes_float(annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _takes_float(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_takes_float(a) for a in args) and not any(a is int for a in args)
    return annotation is float


def coerce_arguments(fn: Callable, kwargs: dict) -> dict:
    """``kwargs`` with the integers given to ``float`` parameters made floats (YAML's ``4`` is an int;
    ``temperature ** 2`` on a huge int would overflow a tensor multiplication)."""
    wanted = hints(fn)
    return {k: float(v) if _is_number(v) and isinstance(v, int) and _takes_float(wanted.get(k)) else v
            for k, v in kwargs.items()}


def _check_sequence(value: Any, origin: Any, args: tuple) -> bool | None:
    if not isinstance(value, (list, tuple)):
        return False
    if not args:
        return True
    if origin is tuple and args[-1] is not Ellipsis:
        if len(value) != len(args):
            return False
        results = [check_value(v, a) for v, a in zip(value, args)]
    else:
        results = [check_value(v, args[0]) for v in value]
    return False if False in results else (None if None in results else True)


def check_arguments(fn: Callable, kwargs: dict, skip: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Problems of ``kwargs`` as arguments of ``fn``: ``[(name, message)]`` for values that do not fit
    the parameters' annotations (unknown names are the caller's to report)."""
    skip = set(skip)
    problems = []
    for name, annotation in hints(fn).items():
        if name in skip or name not in kwargs:
            continue
        if check_value(kwargs[name], annotation) is False:
            problems.append((name, f"expected {describe(annotation)}, got {_show(kwargs[name])}"))
    return problems


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
