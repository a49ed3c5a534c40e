"""Semantic checks that need no data: models exist and trace, taps exist, methods and parameters are valid.

Models are built on the ``meta`` device and traced with fake tensors, so checking a spec with a big
teacher is cheap and reads no weights.
"""
from __future__ import annotations

import torch

from ..errors import SpecError, UserError
from ..graph import layers
from . import Spec, load_all, split_ref


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
    return problems, len(loaded)


def static_dataset_info(data: dict) -> tuple[int, tuple] | None:
    """``(num_classes, input_shape)`` from the dataset registry's meta data, without loading any data."""
    from ..data import DATASETS

    name = data["dataset"]
    if name not in DATASETS:
        return None
    options = data.get("options") or {}
    meta = {k: v(**options) if callable(v) else v for k, v in DATASETS.meta(name).items()}
    return int(meta["num_classes"]), tuple(meta["input_shape"])


def meta_model(cfg: dict, num_classes: int):
    from ..models import build_model

    with torch.device("meta"):
        return build_model(cfg["model"], num_classes=num_classes, **(cfg.get("kwargs") or {}))


def check(spec: Spec) -> list[tuple]:
    """Problems of ``spec`` beyond its schema, as ``(file, line, col, key path, message)``."""
    from ..data import DATASETS
    from ..data.labels import check_labels, labels_kept
    from ..losses import build_terms

    data, problems = spec.data, []
    labels = data["data"].get("labels")
    bad_labels = check_labels(labels)
    if bad_labels:
        problems.append(spec.problem(("data", "labels"), bad_labels))
    if not DATASETS.exists(data["data"]["dataset"]):
        try:
            DATASETS.get(data["data"]["dataset"])
        except UserError as e:
            problems.append(spec.problem(("data", "dataset"), str(e)))
    info = static_dataset_info(data["data"]) if not problems else None
    leaf = (data.get("trace") or {}).get("leaf_modules", [])
    rows = {}
    for role in ("teacher", "student"):
        cfg = data.get(role)
        if not cfg:
            continue
        try:
            model = meta_model(cfg, info[0] if info else 10)
        except UserError as e:
            problems.append(spec.problem((role, "model"), str(e)))
            continue
        if info is not None:
            try:
                rows[role] = layers(model, info[1], leaf_modules=leaf)
            except UserError as e:
                problems.append(spec.problem((role, "model"), str(e)))
    teacher = data.get("teacher")
    if teacher:
        if not any(teacher.get(k) for k in ("checkpoint", "weights", "from_spec")):
            problems.append(spec.problem(("teacher",), "a teacher needs `checkpoint`, `weights` or `from_spec` "
                                                      "(a randomly initialised teacher teaches nothing)"))
        if teacher.get("from_spec"):
            base = split_ref(teacher["from_spec"], spec.file)[0]
            if not base.exists():
                problems.append(spec.problem(("teacher", "from_spec"), f"teacher spec {base} does not exist"))
    checkable = "student" in rows and ("teacher" in rows or not teacher)
    _, term_problems = build_terms(data["loss"], teacher_rows=rows.get("teacher") if checkable else None,
                                   student_rows=rows.get("student") if checkable else None,
                                   has_teacher=bool(teacher), has_labels=bool(bad_labels) or labels_kept(labels))
    problems.extend(spec.problem(path, msg) for path, msg in term_problems)
    return problems
