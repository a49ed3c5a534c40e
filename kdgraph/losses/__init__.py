"""Loss methods: registry, term construction and the wiring of their distillation positions.

Built-in methods (spec ``method:`` names) are listed in :data:`LOSSES`; ``package.module:Name`` loads a
user's :class:`~kdgraph.losses.terms.Term`. :func:`build_terms` turns a spec's ``loss`` list into terms whose
``pairs`` hold the resolved (teacher tap, student tap) positions.
"""
from __future__ import annotations

import inspect

import torch

from ..errors import UserError, did_you_mean
from ..graph import PRE, stage_ends
from ..params import check_arguments, coerce_arguments
from ..registry import Registry
from . import functional
from .functional import UNLABELLED
from .terms import AT, CE, DKD, KD, NST, PKT, RKD, SP, FeatureTerm, FitNet, MarginReLU, Outputs, Setup, Term
from .terms import CRD, ReviewKD
from .terms import AB, CC, DIST, FSP, FT, SRRL, VID  # methods-B

LOSSES = Registry("loss method")
for _name, _cls in [("ce", CE), ("kd", KD), ("dkd", DKD), ("at", AT), ("sp", SP), ("fitnet", FitNet),
                    ("nst", NST), ("pkt", PKT), ("rkd", RKD), ("margin_relu", MarginReLU)]:
    LOSSES.register(_name)(_cls)
for _name, _cls in [("crd", CRD), ("reviewkd", ReviewKD)]:  # stateful methods: memory bank, fusion pyramid
    LOSSES.register(_name)(_cls)
for _name, _cls in [("dist", DIST), ("vid", VID), ("cc", CC), ("srrl", SRRL), ("ft", FT), ("fsp", FSP),
                    ("ab", AB)]:  # methods-B
    LOSSES.register(_name)(_cls)

__all__ = ["LOSSES", "UNLABELLED", "Term", "FeatureTerm", "Outputs", "Setup", "auto_positions", "build_terms",
           "functional", "probe_pairs",
           "term_params"]

_COMMON = {"method", "weight", "positions", "warmup_epochs"}
_FRAMEWORK = ("init_epochs", "lr_scale")  # keys every term takes, set as attributes after construction


def term_params(cls) -> dict:
    """The method's parameters and their defaults (``weight``, ``init_epochs`` and ``lr_scale`` included)."""
    params = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        params[name] = None if p.default is inspect.Parameter.empty else p.default
    if params.get("weight") is None:
        params["weight"] = getattr(cls, "default_weight", 1.0)
    for name in _FRAMEWORK:
        params.setdefault(name, getattr(cls, name, Term.__dict__[name]))
    return params


def _framework_keys(term, cfg: dict) -> list[tuple[tuple, str]]:
    """Set ``init_epochs`` / ``lr_scale`` from the spec entry; problems as ``(key, message)``."""
    problems = []
    epochs = cfg.get("init_epochs")
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            problems.append((("init_epochs",), f"init_epochs must be a whole number >= 0, not {epochs!r}"))
        else:
            term.init_epochs = epochs
    scale = cfg.get("lr_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            problems.append((("lr_scale",), f"lr_scale must be a number > 0, not {scale!r}"))
        else:
            term.lr_scale = float(scale)
    return problems


def _auto(rows: list[dict], term, student: bool = False) -> list[str]:
    """``positions: auto`` of ``term`` in one model; the student's kind of value may differ (``student_features``)."""
    if term.auto == "embedding":
        return _embedding(rows)
    if term.auto == "final":
        return _final_map(rows)
    features = getattr(term, "student_features", None) or term.features if student else term.features
    ends = stage_ends(rows, pre=features == "pre")
    if term.auto == "last":
        return ends[-1:]
    if term.auto == "middle":  # the second of 3 or 4 stages (RepDistiller's hint layer), the third of 5
        return ends[(len(ends) - 1) // 2: (len(ends) - 1) // 2 + 1]
    if term.auto == "input+all":  # the first stage's input (when a block starts it) and every stage end
        first = next((r for r in rows if ends and r["name"] == ends[0]), None)
        return [ends[0] + PRE] + ends if first is not None and first["kind"] == "block" else ends
    if term.auto == "all+embedding":
        embedding = _embedding(rows)
        return ends + embedding if ends and embedding else []
    return ends


_AUTO_RULES = {("all", "out"): "stage outputs", ("all", "pre"): "pre-activation stage ends",
               ("middle", "out"): "middle stage output", ("last", "out"): "last stage output",
               ("embedding", "out"): "embedding", ("all+embedding", "out"): "stage outputs + embedding",
               ("all+embedding", "pre"): "pre-activation ends + embedding"}


def auto_positions(rows: list[dict]) -> list[dict]:
    """What ``positions: auto`` picks in a model (its :func:`~kdgraph.graph.layers` table), for each rule the
    built-in feature methods use: ``{"rule", "methods", "positions"}``, methods sharing a rule together."""
    groups: dict[tuple, list[str]] = {}
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        if getattr(cls, "features", None):
            groups.setdefault((cls.auto, "out" if cls.auto == "embedding" else cls.features), []).append(name)
    order = list(_AUTO_RULES)
    keys = sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), k))
    return [{"rule": _AUTO_RULES.get(key, f"{key[0]} ({key[1]})"), "methods": groups[key],
             "positions": _auto(rows, LOSSES.get(groups[key][0]))} for key in keys]


def _embedding(rows: list[dict]) -> list[str]:
    """The input of the last Linear module (the classifier's), as one position."""
    linear = [i for i, r in enumerate(rows) if r["op"] == "Linear" and r["kind"] == "module"]
    if not linear or linear[-1] == 0:
        return []
    prev = [r for r in rows[: linear[-1]] if r["kind"] != "block"]
    return [prev[-1]["name"]] if prev else []


# ops between the last feature map and the classifier's input (global pooling, flattening, dropout)
_HEAD_OPS = {"AdaptiveAvgPool2d", "AvgPool2d", "AdaptiveMaxPool2d", "MaxPool2d", "adaptive_avg_pool2d",
             "avg_pool2d", "adaptive_max_pool2d", "max_pool2d", "mean", "amax", "flatten", "Flatten", "view",
             "reshape", "squeeze", "Dropout", "dropout", "Identity"}


def _final_map(rows: list[dict]) -> list[str]:
    """The feature map the classifier's global pooling reads: [name], or [] when there is none."""
    linear = [i for i, r in enumerate(rows) if r["op"] == "Linear" and r["kind"] == "module"]
    for r in reversed(rows[: linear[-1]] if linear else []):
        if r["kind"] != "pre" and r["op"] not in _HEAD_OPS:
            return [r["name"]] if r["shape"] is not None and len(r["shape"]) == 3 else []
    return []


def build_terms(loss: list[dict], *, teacher_rows: list[dict] | None, student_rows: list[dict] | None,
                has_teacher: bool, has_labels: bool = True) -> tuple[list[Term], list[tuple[tuple, str]]]:
    """Terms for a spec's ``loss`` list, and the problems found as ``(key path, message)``.

    ``*_rows`` are :func:`kdgraph.layers` tables; with ``None`` the positions are not checked.
    ``has_labels=False`` (no training sample keeps its label) refuses the terms that need labels.
    """
    terms, problems = [], []
    for i, cfg in enumerate(loss):
        path = ("loss", i)
        try:
            cls = LOSSES.get(cfg["method"])
        except UserError as e:
            problems.append((path + ("method",), str(e)))
            continue
        if not (isinstance(cls, type) and issubclass(cls, Term)):
            problems.append((path + ("method",), f"{cfg['method']!r} is not a kdgraph.losses.Term subclass"))
            continue
        params = _params(cfg)
        allowed = set(term_params(cls))
        bad = [k for k in params if k not in allowed]
        for k in bad:
            problems.append((path + (k, "<key>"), f"{cfg['method']} has no parameter {k!r}"
                                                  f"{did_you_mean(k, sorted(allowed | _COMMON))}; "
                                                  f"its parameters: {', '.join(sorted(allowed))}"))
        if bad:
            continue
        wrong = check_arguments(cls, params)
        problems.extend((path + (k,), f"{cfg['method']}: {k}: {msg}") for k, msg in wrong)
        if wrong:
            continue
        try:
            term = _construct(cls, params)
        except (TypeError, ValueError) as e:
            problems.append((path, f"{cfg['method']}: {e}"))
            continue
        problems.extend((path + k, m) for k, m in _framework_keys(term, cfg))
        if term.needs_teacher and not has_teacher:
            problems.append((path + ("method",), f"{cfg['method']} distils from a teacher, but the spec has no "
                                                 f"`teacher:` (remove the term to train the student alone)"))
        if term.needs_labels and not has_labels:
            problems.append((path + ("method",), f"{cfg['method']} uses labels, but data.labels keeps none "
                                                 f"(keep some, or distil with teacher-based terms only)"))
        positions = cfg.get("positions")
        if term.features is None:
            if positions is not None:
                problems.append((path + ("positions",), f"{cfg['method']} works on logits and takes no positions"))
        elif teacher_rows is not None and student_rows is not None:
            pairs, errs = _resolve_pairs(cfg["method"], term, positions, teacher_rows, student_rows)
            term.pairs = pairs
            problems.extend((path + ("positions",) + p, m) for p, m in errs)
        terms.append(term)
    return terms, problems


def _resolve_pairs(method, term, positions, teacher_rows, student_rows):
    if positions is None or positions == "auto":
        t_auto, s_auto = _auto(teacher_rows, term), _auto(student_rows, term, student=True)
        if not t_auto or len(t_auto) != len(s_auto):
            return [], [((), f"positions: auto found {len(t_auto)} teacher position(s) {t_auto} and "
                             f"{len(s_auto)} student position(s) {s_auto} for {method}; list the pairs "
                             f"explicitly as [[teacher_tap, student_tap], ...] (`kdgraph layers MODEL` lists taps)")]
        return list(zip(t_auto, s_auto)), []
    pairs, errs = [], []
    for j, pair in enumerate(positions):
        t, s = (pair["teacher"], pair["student"]) if isinstance(pair, dict) else pair
        for k, (name, rows, who) in enumerate([(t, teacher_rows, "teacher"), (s, student_rows, "student")]):
            known = {r["name"] for r in rows}
            if name not in known and not _is_pre_of(name, known):
                sub = (j, k) if not isinstance(pair, dict) else (j, who)
                errs.append((sub, f"no layer {name!r} in the {who}{did_you_mean(name, known)}; "
                                  f"`kdgraph layers MODEL` lists them"))
        pairs.append((t, s))
    return pairs, errs


def _is_pre_of(name: str, known: set) -> bool:
    return name.endswith(PRE) and name[: -len(PRE)] in known


def _construct(cls, params: dict) -> Term:
    """``cls(**params)``, framework keys left to :func:`_framework_keys`, integers for floats made floats."""
    own = inspect.signature(cls.__init__).parameters
    return cls(**coerce_arguments(cls, {k: v for k, v in params.items() if k not in _FRAMEWORK or k in own}))


def _params(cfg: dict) -> dict:
    """A ``loss`` entry's keyword arguments for its term (``method`` and ``positions`` are not)."""
    return {k: v for k, v in cfg.items() if k not in ("method", "positions") and v is not None}


_PROBE_BATCH = 4


def probe_pairs(cfg: dict, term: Term, teacher_rows: list[dict], student_rows: list[dict], models: dict,
                num_classes: int) -> list[tuple[int | None, str]]:
    """Pairs of ``term`` its method cannot combine, as ``[(pair index or None, message)]``.

    A fresh term of the same method is set up and run once on ``meta`` tensors shaped like the traced
    positions (no data, no weights), so a 2-D embedding paired with a 4-D map, or spatial sizes a method
    cannot align, are found before any work. Only the errors a method raises for inputs it cannot take
    (``ValueError``, and torch's ``RuntimeError`` for mismatched shapes) count; a term that cannot run on
    ``meta`` tensors at all is not judged. ``models`` holds the ``meta`` models by role.
    """
    shapes = {("teacher", r["name"]): tuple(r["shape"]) for r in teacher_rows}
    shapes.update({("student", r["name"]): tuple(r["shape"]) for r in student_rows})
    if any(("teacher", t) not in shapes or ("student", s) not in shapes for t, s in term.pairs):
        return []  # e.g. NAME:pre of a module whose input shape the table does not list
    probe = _Probe(type(term), _params(cfg), shapes, models, num_classes)
    error = probe.run(term.pairs)
    if error is None:
        return []
    if len(term.pairs) == 1:
        return [(0, error)]
    located = [(j, e) for j, pair in enumerate(term.pairs) if (e := probe.run([pair])) is not None]
    return located or [(None, error)]


class _Probe:
    def __init__(self, cls, params: dict, shapes: dict, models: dict, num_classes: int):
        self.cls, self.params, self.shapes, self.models, self.num_classes = cls, params, shapes, models, num_classes
        self._traced = None

    def teacher_node(self, name: str):
        """The node of tap ``name`` in the teacher's graph (the ``meta`` teacher traced once, as the Distiller
        traces the real one); a teacher that does not trace here leaves the term unjudged."""
        if self._traced is None:
            from ..graph import trace

            try:
                self._traced = trace(self.models["teacher"], [])
            except Exception as e:  # noqa: BLE001 - the Distiller reports a tracing failure itself
                raise NotImplementedError(f"the teacher does not trace: {e}") from None
        return self._traced.resolve(name)

    def meta(self, role: str, name: str, batch: int = _PROBE_BATCH) -> torch.Tensor:
        return torch.empty(batch, *self.shapes[(role, name)], device="meta")

    def run(self, pairs: list[tuple[str, str]]) -> str | None:
        """Why the method fails on ``pairs`` (a message naming them and their shapes), or None."""
        term = _construct(self.cls, self.params)
        term.pairs = list(pairs)
        samples = 2 * max(self.num_classes, _PROBE_BATCH)  # a stand-in training set: every class, twice
        ctx = Setup(student=self.models.get("student"), teacher=self.models.get("teacher"),
                    student_shapes={s: self.shapes[("student", s)] for _, s in pairs},
                    teacher_shapes={t: self.shapes[("teacher", t)] for t, _ in pairs},
                    teacher_node=self.teacher_node if self.models.get("teacher") is not None else None,
                    teacher_features=lambda names: {n: self.meta("teacher", n, 2 * _PROBE_BATCH) for n in names},
                    log=lambda _: None, num_samples=samples, targets=torch.arange(samples) % self.num_classes)
        logits = torch.empty(_PROBE_BATCH, self.num_classes, device="meta")
        out = Outputs(logits=logits, target=torch.zeros(_PROBE_BATCH, dtype=torch.long, device="meta"),
                      feats={s: self.meta("student", s) for _, s in pairs}, teacher_logits=logits.clone(),
                      teacher_feats={t: self.meta("teacher", t) for t, _ in pairs},
                      index=torch.arange(_PROBE_BATCH, device="meta"))
        try:
            with torch.device("meta"):
                term.setup(ctx)
                term(out)
        except NotImplementedError:
            return None
        except (ValueError, RuntimeError, UserError) as e:
            if "meta" in str(e).lower():  # an operation with no meta kernel, or a data-dependent one
                return None
            shown = ", ".join(f"teacher {t!r} {_dims(self.shapes[('teacher', t)])} with student {s!r} "
                              f"{_dims(self.shapes[('student', s)])}" for t, s in pairs)
            return f"{_method_name(self.cls)} cannot pair {shown}: {str(e).splitlines()[0]}"
        return None


def _dims(shape: tuple) -> str:
    return f"({'x'.join(map(str, shape))})"


def _method_name(cls) -> str:
    return next((n for n in LOSSES.names() if LOSSES.get(n) is cls), cls.__name__)
