"""Key paths of a spec (``loss.1.temperature``, the convention of ``--set`` and of ``sweep:`` blocks) and the
checks of a ``sweep:`` block that need no run: every key names a place of the spec, linked keys get one
value each, and every value is one the spec accepts there (schema, ranges, method parameters).
"""
from __future__ import annotations

import copy
from typing import Any

from ..errors import UserError, did_you_mean
from . import Spec, dotted, flow_text, resolve_ref, schema, schema_problems, set_path

_MISSING = object()


def parse_path(text: str) -> tuple:
    """``"loss.1.weight"`` -> ``("loss", 1, "weight")``, the convention of ``--set``."""
    parts = str(text).strip().split(".")
    if not str(text).strip() or any(not p for p in parts):
        raise UserError(f"sweep: {text!r} is not a key path like loss.1.weight")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _method_params(term: Any) -> list[str]:
    """The parameters of a loss term's method (besides the schema's method, weight, positions...)."""
    from ..losses import LOSSES, term_params

    try:
        return list(term_params(LOSSES.get(term["method"])))
    except (UserError, KeyError, TypeError):
        return []


def spec_paths(data: dict) -> tuple[list[str], set[str]]:
    """``(paths, open)``: every key path a ``--set`` may change in ``data`` (its own keys, the schema's,
    loss parameters), and those that are free-form mappings (``data.options``, ``student.kwargs``...)
    where any key goes."""
    root = schema()
    out: list[str] = []
    free: set[str] = set()

    def walk(node: Any, sch: dict, prefix: tuple) -> None:
        sch = resolve_ref(sch, root)
        if isinstance(node, list):
            children = [(i, item, sch.get("items", {})) for i, item in enumerate(node)]
        elif isinstance(node, dict) or (node is _MISSING and "properties" in sch):
            props = sch.get("properties", {})
            if sch.get("type") == "object" and not props:
                free.add(dotted(prefix))
            keys = list(node) if isinstance(node, dict) else []
            if prefix[:1] == ("loss",) and len(prefix) == 2:
                keys += _method_params(node)
            keys += list(props)
            children = [(k, node.get(k, _MISSING) if isinstance(node, dict) else _MISSING, props.get(k, {}))
                        for k in dict.fromkeys(keys)]
        else:
            if node is _MISSING and sch.get("type") == "object":
                free.add(dotted(prefix))
            return
        for key, child, child_sch in children:
            path = prefix + (key,)
            if path[0] not in ("sweep", "extends"):
                out.append(dotted(path))
                walk(child, child_sch, path)

    walk(data, root, ())
    return out, free


def path_problem(path: tuple, known: list[str], free: set[str]) -> str | None:
    """Why ``path`` names no place of the spec whose paths are ``(known, free)`` (:func:`spec_paths`)."""
    if path[0] == "sweep":
        return "the sweep block itself cannot be swept"
    if dotted(path) in known or any(dotted(path[:i]) in free for i in range(1, len(path))):
        return None
    hint = did_you_mean(dotted(path), known) or " (lists are indexed from 0, e.g. loss.1.weight)"
    return f"no key path {dotted(path)!r} in the spec{hint}"


def sweep_problems(spec: Spec) -> list[tuple]:
    """Problems of the spec's ``sweep:`` block, as ``(file, line, col, key path, message)``: keys that are
    not key paths of the spec, linked values of the wrong length, and values the spec would refuse there
    (each value is tried alone in the base spec: schema, finite numbers, method parameters)."""
    sweep = spec.data.get("sweep") or {}
    known, free = spec_paths(spec.data)
    problems = []
    for key, values in sweep.items():
        try:
            paths = [parse_path(k) for k in str(key).split(",")]
        except UserError as e:
            problems.append(spec.problem(("sweep", key, "<key>"), str(e)))
            continue
        found = [(p, m) for p in paths if (m := path_problem(p, known, free))]
        problems += [spec.problem(("sweep", key, "<key>"), m) for _, m in found]
        if found or not isinstance(values, list):
            continue
        for i, value in enumerate(values):
            row = [value] if len(paths) == 1 else value
            if not isinstance(row, list) or len(row) != len(paths):
                problems.append(spec.problem(("sweep", key, i), f"linked keys take lists of {len(paths)} values "
                                                                f"each (one per key); got {value!r}"))
                continue
            problems += [spec.problem(("sweep", key, i), m) for m in _value_problems(spec, paths, row)]
    return problems


def _value_problems(spec: Spec, paths: list[tuple], values: list) -> list[str]:
    """What is wrong with the spec once ``paths`` are set to ``values`` (and not wrong without them)."""
    from ..losses import build_terms

    data = copy.deepcopy({k: v for k, v in spec.data.items() if k != "sweep"})
    try:
        for path, value in zip(paths, values):
            set_path(data, list(path), copy.deepcopy(value))
    except (IndexError, ValueError, TypeError, KeyError, AttributeError):
        return [f"{', '.join(map(dotted, paths))}: no such place in the spec"]
    def term_problems(d: dict) -> list[str]:
        if not isinstance(d.get("loss"), list):
            return []
        found = build_terms(d["loss"], teacher_rows=None, student_rows=None, has_teacher=bool(d.get("teacher")))[1]
        return [f"{dotted(p)}: {m}" for p, m in found]

    shown = ", ".join(f"{dotted(p)}={flow_text(v)}" for p, v in zip(paths, values))
    found = [f"{p[3] or '<root>'}: {p[4]}" for p in schema_problems(Spec(data, spec.file, {}))]
    if not found:
        before = term_problems(spec.data)
        found = [m for m in term_problems(data) if m not in before]
    return [f"with {shown}: {m}" for m in found]
