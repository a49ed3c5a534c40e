"""Semantic checks that need no data: models exist and trace, taps exist, methods and parameters are valid.

Models are built on the ``meta`` device and traced with fake tensors, so checking a spec with a big
teacher is cheap and reads no weights. Checkpoint files are opened memory-mapped to compare their keys
and shapes with the model; a ``from_spec`` teacher's spec is checked too (cycles are errors); each
feature term runs once on ``meta`` tensors of its positions' traced shapes, so pairs a method cannot
combine are reported before any work.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..errors import SpecError, UserError
from ..graph import layers
from . import Spec, load_all, teacher_spec

SOURCES = ("checkpoint", "weights", "from_spec")  # where a teacher's weights come from: exactly one


def validate(file, overrides=(), text: str | None = None) -> tuple[list[tuple], int]:
    """What ``kdgraph validate FILE`` reports: ``(problems, number of specs)``; ``text`` stands for the file's
    contents when given. Problems are ``(file, line, col, key path, message)``."""
    try:
        loaded = load_all(file, overrides, text=text)
    except SpecError as e:
        return list(e.problems), 0
    except UserError as e:
        return [(str(file), 1, 1, "", str(e))], 0
    problems = []
    for s in loaded:
        try:
            problems.extend(check(s))
        except UserError as e:
            problems.append((str(file), 1, 1, "", str(e)))
    return list(dict.fromkeys(problems)), len(loaded)  # a from_spec teacher in the same file: reported once


def static_dataset_info(data: dict) -> tuple[int, tuple] | None:
    """``(num_classes, input_shape)`` from the dataset registry's meta data, without loading any data."""
    from ..data import DATASETS

    name = data["dataset"]
    if name not in DATASETS:
        return None
    options = data.get("options") or {}
    meta = DATASETS.meta(name)
    classes, shape = (meta[k](**options) if callable(meta[k]) else meta[k] for k in ("num_classes", "input_shape"))
    return int(classes), tuple(shape)


def meta_model(cfg: dict, num_classes: int):
    from ..models import build_model

    with torch.device("meta"):
        return build_model(cfg["model"], num_classes=num_classes, **(cfg.get("kwargs") or {}))


@functools.lru_cache(maxsize=128)
def _layers(model: str, kwargs_json: str, num_classes: int, input_shape: tuple, leaf: tuple) -> tuple:
    """A model's layers table, once per process for each model, options and input (a spec set names the
    same few models hundreds of times)."""
    cfg = {"model": model, "kwargs": json.loads(kwargs_json)}
    return tuple(layers(meta_model(cfg, num_classes), input_shape, leaf_modules=list(leaf)))


def model_layers(cfg: dict, num_classes: int, input_shape: tuple, leaf) -> list[dict]:
    """:func:`kdgraph.graph.layers` of the model ``cfg`` names (built on the meta device), memoised."""
    kwargs = json.dumps(cfg.get("kwargs") or {}, sort_keys=True, default=str)
    return [dict(r) for r in _layers(cfg["model"], kwargs, num_classes, tuple(input_shape), tuple(leaf))]


def check(spec: Spec, _chain: tuple = ()) -> list[tuple]:
    """Problems of ``spec`` beyond its schema, as ``(file, line, col, key path, message)``."""
    from ..data.labels import check_labels, labels_kept
    from ..losses import build_terms

    data = spec.data
    problems, info = _data_problems(spec)
    labels = data["data"].get("labels")
    bad_labels = check_labels(labels)
    if bad_labels:
        problems.append(spec.problem(("data", "labels"), bad_labels))
    leaf = (data.get("trace") or {}).get("leaf_modules", [])
    models, rows = {}, {}
    for role in ("teacher", "student"):
        cfg = data.get(role)
        if not cfg:
            continue
        try:
            models[role] = meta_model(cfg, info[0] if info else 10)
            if info is not None:
                rows[role] = model_layers(cfg, info[0], info[1], leaf)
        except UserError as e:
            problems.append(spec.problem((role, "model"), str(e)))
            continue
        problems += _source_problems(spec, role, models[role])
    if data.get("teacher", {}).get("from_spec"):
        problems += _from_spec_problems(spec, models.get("teacher"), _chain)
    checkable = "student" in rows and ("teacher" in rows or not data.get("teacher"))
    _, term_problems = build_terms(data["loss"], teacher_rows=rows.get("teacher") if checkable else None,
                                   student_rows=rows.get("student") if checkable else None,
                                   has_teacher=bool(data.get("teacher")),
                                   has_labels=bool(bad_labels) or labels_kept(labels))
    problems.extend(spec.problem(path, msg) for path, msg in term_problems)
    if checkable:
        problems += _pair_problems(spec, {p[1] for p, _ in term_problems}, rows, models, info[0])
    if data.get("sweep"):
        from .paths import sweep_problems

        problems += sweep_problems(spec)
    return problems


def _data_problems(spec: Spec) -> tuple[list[tuple], tuple[int, tuple] | None]:
    """The data block's problems (dataset name, options), and ``(num_classes, input_shape)`` when known."""
    from ..data import option_problems

    data = spec.data["data"]
    try:
        wrong = option_problems(data["dataset"], data.get("options") or {})
    except UserError as e:
        return [spec.problem(("data", "dataset"), str(e))], None
    if wrong:
        return [spec.problem(("data", "options", k), m) for k, m in wrong], None
    try:
        return [], static_dataset_info(data)
    except (TypeError, ValueError, KeyError, IndexError, UserError) as e:  # a meta callable on these options
        return [spec.problem(("data", "options"), f"dataset {data['dataset']!r}: {e}")], None


def _source_problems(spec: Spec, role: str, model: torch.nn.Module) -> list[tuple]:
    """One source of weights at most (a teacher: exactly one); a checkpoint file that fits the model."""
    from ..checkpoint import mismatch

    cfg = spec.data[role]
    given = [k for k in SOURCES if cfg.get(k)]
    if len(given) > 1:
        return [spec.problem((role, given[1]), f"the {role} has two sources of weights, "
                                               f"{' and '.join(f'{k}: {cfg[k]!r}' for k in given)}; keep one")]
    if role == "teacher" and not given:
        return [spec.problem((role,), "a teacher needs `checkpoint`, `weights` or `from_spec` "
                                      "(a randomly initialised teacher teaches nothing)")]
    if not cfg.get("checkpoint"):
        return []
    try:
        problem = mismatch(model, cfg["checkpoint"])
    except UserError as e:
        problem = str(e)
    return [spec.problem((role, "checkpoint"), problem)] if problem else []


def _from_spec_problems(spec: Spec, teacher: torch.nn.Module | None, chain: tuple) -> list[tuple]:
    """The ``from_spec`` teacher's spec exists, trains ``teacher.model``, names no cycle and checks."""
    where = ("teacher", "from_spec")
    me = (str(Path(spec.file).resolve()), spec.data["name"])
    try:
        tspec = teacher_spec(spec)
    except SpecError as e:
        return [spec.problem(where, f"the teacher spec has problems:")] + list(e.problems)
    except UserError as e:
        return [spec.problem(where, str(e))]
    it = (str(Path(tspec.file).resolve()), tspec.data["name"])
    if it in chain + (me,):
        names = " -> ".join(f"{Path(f).name}#{n}" for f, n in chain + (me, it))
        return [spec.problem(where, f"from_spec names a cycle of teachers ({names}); a teacher must be "
                                    f"trained by another spec")]
    if tspec.data["student"]["model"] != spec.data["teacher"]["model"]:
        return [spec.problem(where, f"teacher.from_spec trains {tspec.data['student']['model']!r} but "
                                    f"teacher.model is {spec.data['teacher']['model']!r}")]
    problems = check(tspec, chain + (me,))
    if not problems and teacher is not None:
        from ..checkpoint import state_mismatch

        info = static_dataset_info(tspec.data["data"])
        trained = meta_model(tspec.data["student"], info[0] if info else 10).state_dict()
        problem = state_mismatch(teacher, trained, f"the weights {it[1]} trains")
        problems += [spec.problem(where, problem)] if problem else []
    return problems


def _pair_problems(spec: Spec, skip: set, rows: dict, models: dict, num_classes: int) -> list[tuple]:
    """Each feature term (but those in ``skip``, with problems already), run once on ``meta`` tensors of its
    positions' shapes: the pairs it cannot combine."""
    from ..losses import build_terms, probe_pairs

    problems = []
    for i, cfg in enumerate(spec.data["loss"]):
        if i in skip:
            continue
        terms, errors = build_terms([cfg], teacher_rows=rows.get("teacher") or [], student_rows=rows["student"],
                                    has_teacher=True)
        term = terms[0] if terms and not errors else None
        if term is None or term.features is None or not term.pairs:
            continue
        explicit = cfg.get("positions") not in (None, "auto")
        for j, message in probe_pairs(cfg, term, rows.get("teacher") or [], rows["student"], models, num_classes):
            problems.append(spec.problem(("loss", i, "positions") + ((j,) if explicit and j is not None else ()),
                                         message))
    return problems
