"""The Build tab without Gradio: spec dict <-> form values, the YAML preview and its validation, spec files.

A *form* is a dict keyed by :data:`FIELDS`: dotted spec paths (``data.batch_size``, ``train.optimizer.lr``)
plus, for each of the :data:`MAX_TERMS` loss-term slots, ``loss.N.method``, ``loss.N.weight``,
``loss.N.params`` (rows ``[parameter, value, default]``; an empty value means the default),
``loss.N.positions`` (``auto`` or ``pairs``) and ``loss.N.pairs`` (rows ``[teacher tap, student tap]``), and
``loss.count``, the number of slots in use. Values are what the widgets hold: text, numbers, booleans and
lists of rows. :func:`spec_to_form` and :func:`form_to_spec` convert; the spec written keeps only the values
that differ from the schema's defaults, so a saved spec reads like a hand-written one and loads back into
the same spec.
"""
from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from kdgraph import spec as specs
from kdgraph.errors import SpecError, UserError, format_problem

from .jobs import inside

MAX_TERMS = 4
NO_TEACHER = "(none)"
TRISTATE = {"auto": None, "true": True, "false": False}
POSITION_MODES = ("auto", "pairs")
PARAMS_HEADERS = ["parameter", "value", "default"]
PAIRS_HEADERS = ["teacher", "student"]
LAYER_HEADERS = ["name", "op", "kind", "shape"]
AUTO_RULES = {"all": "one per stage", "last": "the last stage", "middle": "the middle stage",
              "embedding": "the input of the last Linear layer", "final": "the map the global pooling reads",
              "input+all": "the first stage's input and one per stage"}
TERM_KEYS = ("method", "weight", "params", "positions", "pairs")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.+=-]+\.ya?ml$")
# torch.fx tracing patches module globals while it runs: one model is built and traced at a time
TRACE_LOCK = threading.Lock()

# A new spec: offline (scikit-learn's digits), small and quick, like specs/quickstart.yaml.
NEW_SPEC = {"name": "my-run", "data": {"dataset": "digits", "batch_size": 64, "workers": 0},
            "student": {"model": "wrn-10-1"}, "loss": [{"method": "ce"}],
            "train": {"epochs": 15, "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}}}


@dataclass(frozen=True)
class Field:
    """One form value: its key and how it converts (see :func:`_to_form` and :func:`_from_form`)."""

    key: str
    kind: str  # text, int, float, number (optional, as text), bool, tristate, mapping, names, ints, floats,
    #            yaml, flow (optional, one line of YAML), model, count, term


_SIMPLE = [
    ("name", "text"), ("description", "text"),
    ("data.dataset", "text"), ("data.root", "text"), ("data.download", "bool"), ("data.batch_size", "int"),
    ("data.test_batch_size", "number"), ("data.loader", "text"), ("data.workers", "int"), ("data.pin_memory", "tristate"),
    ("data.persistent_workers", "tristate"), ("data.augment", "bool"), ("data.options", "mapping"),
    ("data.labels", "flow"), ("seeds", "flow"),
    ("teacher.model", "model"), ("teacher.kwargs", "mapping"), ("teacher.checkpoint", "text"),
    ("teacher.weights", "text"), ("teacher.from_spec", "text"),
    ("student.model", "text"), ("student.kwargs", "mapping"), ("student.checkpoint", "text"),
    ("student.weights", "text"),
    ("trace.leaf_modules", "names"),
]
_TRAIN = [
    ("train.epochs", "int"), ("train.optimizer.name", "text"), ("train.optimizer.lr", "float"),
    ("train.optimizer.momentum", "float"), ("train.optimizer.nesterov", "bool"),
    ("train.optimizer.weight_decay", "float"), ("train.optimizer.betas", "floats"),
    ("train.schedule.name", "text"), ("train.schedule.milestones", "ints"), ("train.schedule.gamma", "float"),
    ("train.schedule.step_size", "int"), ("train.schedule.min_lr", "float"),
    ("train.schedule.warmup_epochs", "float"), ("train.precision", "text"), ("train.device", "text"),
    ("train.seed", "int"), ("train.compile", "bool"), ("train.channels_last", "bool"),
    ("train.sync_bn", "bool"),
    ("train.grad_clip", "number"), ("train.max_steps_per_epoch", "number"),
    ("log.tensorboard", "bool"), ("log.every", "int"),
    ("sweep", "yaml"), ("expect", "yaml"),
]
SPEC_FIELDS = ([Field(k, kind) for k, kind in _SIMPLE] + [Field("loss.count", "count")]
               + [Field(f"loss.{i}.{k}", "term") for i in range(MAX_TERMS) for k in TERM_KEYS]
               + [Field(k, kind) for k, kind in _TRAIN])
FIELDS = [f.key for f in SPEC_FIELDS]


class _Omit:
    """Marks a form value that writes nothing into the spec (the schema default applies)."""


OMIT = _Omit()


# ------------------------------------------------------------------------------------------ helpers
yaml_text = specs.flow_text  # one line of YAML flow text (what a table cell or a one-line box shows)


def spec_yaml(data: dict) -> str:
    """A spec as YAML: block style at the top, flow style for mappings and lists of plain values."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (``True`` is not ``1``; ``0`` is ``0.0``)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def strip_defaults(data: dict) -> dict:
    """Remove, in place, the keys whose value is the schema's default (``loss`` is always kept).

    Mappings left empty are removed too when :func:`kdgraph.spec.apply_defaults` recreates them, so
    ``apply_defaults(strip_defaults(d)) == d`` for a spec ``d`` with its defaults applied.
    """
    root = specs.schema()

    def strip(obj: dict, sch: dict) -> None:
        props = specs.resolve_ref(sch, root).get("properties", {})
        for key in list(obj):
            sub = specs.resolve_ref(props.get(key, {}), root)
            if key != "loss" and "default" in sub and _same(obj[key], sub["default"]):
                del obj[key]
            elif isinstance(obj[key], dict) and "properties" in sub:
                strip(obj[key], sub)
                if not obj[key] and not sub.get("required") and key != "sweep":
                    del obj[key]

    strip(data, root)
    return data


def method_class(method: str):
    """The :class:`~kdgraph.losses.Term` class of a loss method, or None when it names none."""
    from kdgraph.losses import LOSSES, Term

    try:
        cls = LOSSES.get(method)
    except UserError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Term) else None


def method_defaults(method: str) -> dict:
    """A method's parameters and defaults, ``weight`` included ({} for an unknown method)."""
    from kdgraph.losses import term_params

    cls = method_class(method)
    return term_params(cls) if cls is not None else {}


def param_rows(method: str, term: dict | None = None) -> list[list[str]]:
    """The parameter table of a term: ``[name, value or "", default]``; keys the method does not take are
    kept (their default reads ``not a parameter``) so that validation reports them."""
    term = term or {}
    known = {k: v for k, v in method_defaults(method).items() if k != "weight"}
    rows = [[k, yaml_text(term[k]) if k in term else "", yaml_text(v)] for k, v in known.items()]
    extra = [k for k in term if k not in known and k not in ("method", "weight", "positions")]
    return rows + [[k, yaml_text(term[k]), "not a parameter"] for k in extra]


def _rows(value: Any) -> list[list]:
    """The non-blank rows of a table widget's value (a list of rows)."""
    return [list(r) for r in (value or []) if any(str(c if c is not None else "").strip() for c in r)]


def _parse_yaml(text: str, what: str) -> Any:
    try:
        docs = specs.load_yaml(what, text)  # the spec loader's limits on size, nesting and aliases
    except UserError as e:
        problem = e.problems[0][-1] if isinstance(e, SpecError) else str(e)
        raise ValueError(f"{what}: {problem}") from None
    if len(docs) != 1:
        raise ValueError(f"{what}: one YAML value, not {len(docs)} documents")
    return docs[0][0]


# ------------------------------------------------------------------------------------ spec -> form
def _integral(value: Any) -> Any:
    """``1000`` for ``1000.0`` (a float with an integral value), else ``value``."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return int(value)
    return value


def _to_form(kind: str, value: Any) -> Any:
    if kind == "text":
        return "" if value is None else str(value)
    if kind in ("int", "float"):
        return value
    if kind == "number":
        return "" if value is None else str(_integral(value))
    if kind == "bool":
        return bool(value)
    if kind == "tristate":
        return {None: "auto", True: "true", False: "false"}[value]
    if kind == "mapping":
        return yaml_text(value) if value else ""
    if kind in ("names", "ints", "floats"):
        return ", ".join(str(v) for v in value or [])
    if kind == "yaml":
        return yaml.safe_dump(value, sort_keys=False, default_flow_style=None) if value else ""
    if kind == "flow":
        return "" if value is None else yaml_text(value)
    raise ValueError(kind)


def spec_to_form(data: dict) -> dict:
    """The form showing spec ``data`` (defaults are filled in first; ``extends`` must be resolved)."""
    data = copy.deepcopy(data)
    specs.apply_defaults(data)
    loss = data.get("loss") or []
    if len(loss) > MAX_TERMS:
        raise UserError(f"the form holds at most {MAX_TERMS} loss terms; this spec has {len(loss)}")
    form: dict[str, Any] = {}
    for f in SPEC_FIELDS:
        if f.kind == "term":
            continue
        if f.kind == "count":
            form[f.key] = len(loss)
        elif f.kind == "model":
            form[f.key] = (data.get("teacher") or {}).get("model") or NO_TEACHER
        else:
            try:
                value = specs.get_path(data, f.key.split("."))
            except (KeyError, TypeError):
                value = None
            form[f.key] = _to_form(f.kind, value)
    for i in range(MAX_TERMS):
        form.update(term_to_form(i, loss[i] if i < len(loss) else None))
    return form


def term_to_form(i: int, term: dict | None) -> dict:
    """The five form values of term slot ``i`` (an empty slot for None)."""
    if term is None:
        return {f"loss.{i}.method": "", f"loss.{i}.weight": "", f"loss.{i}.params": [],
                f"loss.{i}.positions": "auto", f"loss.{i}.pairs": []}
    positions = term.get("positions")
    pairs = []
    if isinstance(positions, list):
        pairs = [[p["teacher"], p["student"]] if isinstance(p, dict) else list(p) for p in positions]
    return {f"loss.{i}.method": str(term.get("method") or ""),
            f"loss.{i}.weight": _to_form("number", term.get("weight")),
            f"loss.{i}.params": param_rows(str(term.get("method") or ""), term),
            f"loss.{i}.positions": "pairs" if isinstance(positions, list) else "auto",
            f"loss.{i}.pairs": pairs}


def new_term(i: int, method: str) -> dict:
    """A fresh slot ``i`` for ``method``: its canonical weight and default parameters, auto positions."""
    return {**term_to_form(i, {"method": method}),
            f"loss.{i}.weight": _to_form("number", method_defaults(method).get("weight"))}


# ------------------------------------------------------------------------------------ form -> spec
def _from_form(kind: str, value: Any, key: str) -> Any:
    if kind == "text":
        text = "" if value is None else str(value).strip()
        return text if text else OMIT
    if kind == "number":  # optional: an integer when written as one
        text = str(value if value is not None else "").strip()
        if not text:
            return OMIT
        try:
            return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
        except ValueError:
            raise ValueError(f"{key}: {text!r} is not a number (leave it empty for the default)") from None
    if kind in ("int", "float"):
        if value is None or value == "":
            return OMIT
        number = float(value)
        if kind == "int":
            if number != int(number):
                raise ValueError(f"{key}: {value} is not a whole number")
            return int(number)
        return number
    if kind == "bool":
        return bool(value)
    if kind == "tristate":
        if value not in TRISTATE:
            raise ValueError(f"{key}: choose one of {', '.join(TRISTATE)}")
        return TRISTATE[value]
    if kind == "mapping":
        parsed = _parse_yaml(value or "", key) if str(value or "").strip() else {}
        if not isinstance(parsed, dict):
            raise ValueError(f"{key}: expected a mapping such as {{size: 16}}, got {value!r}")
        return parsed
    if kind in ("yaml", "flow"):
        parsed = _parse_yaml(value or "", key) if str(value or "").strip() else None
        return OMIT if parsed is None else parsed
    items = [s.strip() for s in str(value or "").replace(";", ",").split(",") if s.strip()]
    if kind == "names":
        return items
    try:
        return [int(s) if kind == "ints" else float(s) for s in items]
    except ValueError:
        what = "whole numbers" if kind == "ints" else "numbers"
        raise ValueError(f"{key}: expected {what} separated by commas, got {value!r}") from None


def _raw(value: Any) -> str:
    return "" if value is None else str(value).strip()


def term_from_form(form: dict, i: int, problems: list | None = None) -> dict:
    """The spec entry of loss-term slot ``i``. A value that cannot be read is kept as the text typed (the
    validator then reports it at its place) and ``(field key, message)`` is appended to ``problems``."""
    problems = [] if problems is None else problems
    method = str(form.get(f"loss.{i}.method") or "").strip()
    term: dict[str, Any] = {"method": method}
    key = f"loss.{i}.weight"
    try:
        weight = _from_form("number", form.get(key), key)
    except ValueError as e:
        problems.append((key, str(e)))
        weight = _raw(form.get(key))
    if weight is not OMIT:
        term["weight"] = _integral(float(weight)) if not isinstance(weight, str) else weight
    for row in _rows(form.get(f"loss.{i}.params")):
        name, value = str(row[0]).strip(), _raw(row[1])
        if name and value:
            try:
                term[name] = _parse_yaml(value, f"loss.{i}.{name}")
            except ValueError as e:
                problems.append((f"loss.{i}.params", str(e)))
                term[name] = value
    mode = form.get(f"loss.{i}.positions") or "auto"
    cls = method_class(method)
    if mode == "pairs":
        pairs = [[_raw(r[0]), _raw(r[1]) if len(r) > 1 else ""] for r in _rows(form.get(f"loss.{i}.pairs"))]
        if any(not t or not s for t, s in pairs):
            problems.append((f"loss.{i}.pairs", f"loss.{i}.positions: every pair needs a teacher tap and a "
                                                f"student tap"))
        if not pairs:
            problems.append((f"loss.{i}.pairs", f"loss.{i}.positions: add at least one [teacher, student] pair, "
                                                f"or choose auto"))
        term["positions"] = pairs
    elif cls is not None and cls.features is not None:
        term["positions"] = "auto"
    return term


def form_to_spec(form: dict) -> tuple[dict, list[tuple[str, str]]]:
    """``(spec data, form problems)``: the spec the form describes, without schema defaults.

    Nothing typed is dropped: a value that cannot be read (bad YAML, a word in a number list...) goes into
    the spec as the text typed -- so the validator reports it at its key, and the indices of the loss terms
    after it stay right -- and is reported as ``(field key, message)``; the schema and the semantic checks
    are :func:`validate`'s job.
    """
    data: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []

    def put(key: str, kind: str) -> None:
        try:
            value = _from_form(kind, form.get(key), key)
        except ValueError as e:
            problems.append((key, str(e)))
            value = _raw(form.get(key)) or OMIT
        if value is not OMIT:
            specs.set_path(data, key.split("."), value)

    teacher = str(form.get("teacher.model") or "").strip()
    for f in SPEC_FIELDS:
        if f.kind == "model":
            if teacher and teacher != NO_TEACHER:
                data["teacher"] = {"model": teacher}
        elif f.key.startswith("teacher."):
            if "teacher" in data:
                put(f.key, f.kind)
        elif f.kind == "count":
            data["loss"] = []
            for i in range(min(int(form.get(f.key) or 0), MAX_TERMS)):
                data["loss"].append(term_from_form(form, i, problems))
        elif f.kind != "term":
            put(f.key, f.kind)
    order = ["name", "description", "seeds", "data", "teacher", "student", "trace", "loss", "train", "log", "sweep",
             "expect"]
    data = {k: data[k] for k in order if k in data}
    return strip_defaults(data), problems


# ------------------------------------------------------------------------------------ validation
def check_text(text: str, file: str | Path) -> list[tuple]:
    """The problems ``kdgraph validate FILE`` finds in ``text`` saved as ``file``, as ``(file, line, col,
    key path, message)`` tuples; [] when the spec is valid."""
    from kdgraph.spec.check import validate as validate_file

    file = str(file)
    try:
        with TRACE_LOCK:
            problems, _ = validate_file(file, text=text)
    except Exception as e:  # noqa: BLE001 - a user's model or method failing to build or trace
        problems = [(file, 1, 1, "", f"{type(e).__name__}: {e}")]
    return list(problems)


def validate(text: str, file: str | Path) -> list[str]:
    """The lines ``kdgraph validate FILE`` prints for ``text`` saved as ``file`` (``FILE:LINE:COL:
    key.path: message``); [] when the spec is valid."""
    return [format_problem(*p) for p in check_text(text, file)]


def preview_line(problem: tuple, file: str | Path) -> str:
    """A problem of the form's YAML as the page shows it: ``line L:C: key.path: message`` for the preview
    (the form is not saved, so its file name would mislead), ``FILE:L:C: ...`` for another file (a
    ``from_spec`` teacher's spec)."""
    where, line, col, path, message = problem
    if line is None:  # a problem of the form's files (:func:`path_problems`): no place in the YAML
        return f"{path}: {message}"
    if str(where) != str(file):
        return format_problem(*problem)
    return f"line {line or 1}:{col or 1}: {path or '<root>'}: {message}"


def path_problems(data: dict, specs_dir: str | Path, runs_dir: str | Path) -> list[tuple[str, str]]:
    """The files a form's spec names -- a teacher's ``from_spec``, checkpoints -- that are outside the UI's
    specs and runs folders (symbolic links followed), as ``(key path, message)``: the UI reads nothing
    elsewhere."""
    problems = []
    teacher = data.get("teacher") or {}
    named = [("teacher.from_spec", specs.split_ref(teacher["from_spec"], Path(specs_dir) / "form.yaml")[0])]\
        if teacher.get("from_spec") else []
    named += [(f"{role}.checkpoint", Path((data.get(role) or {})["checkpoint"])) for role in ("teacher", "student")
              if (data.get(role) or {}).get("checkpoint")]
    for key, path in named:
        outside = []
        for root in (specs_dir, runs_dir):
            try:
                inside(root, path, key)
            except UserError as e:
                outside.append(str(e))
        if len(outside) == 2:
            problems.append((key, f"{path} is outside the specs folder ({specs_dir}) and the runs folder "
                                  f"({runs_dir}): the UI reads files only there"))
    return problems


def preview(form: dict, file: str | Path, specs_dir: str | Path | None = None,
            runs_dir: str | Path | None = None) -> tuple[str, list[tuple], list[tuple[str, str]]]:
    """``(YAML text, validator problems, form problems)`` of the form: :func:`check_text`'s tuples for the
    YAML saved as ``file``, and :func:`form_to_spec`'s ``(field key, message)`` pairs. With the UI's folders
    given, files the spec names outside them (:func:`path_problems`) are the problems instead, without a
    line, and the YAML is not checked (nothing there is read)."""
    data, form_problems = form_to_spec(form)
    text = spec_yaml(data)
    outside = path_problems(data, specs_dir, runs_dir) if specs_dir is not None and runs_dir is not None else []
    if outside:
        return text, [(file, None, None, key, message) for key, message in outside], form_problems
    return text, check_text(text, file), form_problems


# ------------------------------------------------------------------------------------ spec files
def check_file_name(name: str) -> str:
    """A spec file name for the specs folder (``NAME.yaml``), or a UserError saying what is wrong."""
    name = (name or "").strip()
    if not _FILE_NAME.match(name):
        raise UserError(f"spec file name {name!r}: use letters, digits and _.+=- and end with .yaml "
                        f"(the file goes into the specs folder)")
    return name


def spec_choices(specs_dir: str | Path) -> list[str]:
    """The specs that can be loaded: ``FILE`` for a one-spec file, ``FILE#NAME`` for each spec of a
    multi-spec file (YAML files of the folder, sorted)."""
    out = []
    for path in sorted(Path(specs_dir).glob("*.y*ml")):
        try:
            docs = specs.load_yaml(path)
        except UserError:
            out.append(path.name)
            continue
        names = [d.get("name") for d, _ in docs if isinstance(d, dict)]
        if len(docs) > 1 and all(isinstance(n, str) for n in names):
            out.extend(f"{path.name}#{n}" for n in names)
        else:
            out.append(path.name)
    return out


def sweep_files(specs_dir: str | Path) -> list[str]:
    """Spec files of the folder with a ``sweep:`` block (through ``extends`` too)."""
    out = []
    for path in sorted(Path(specs_dir).glob("*.y*ml")):
        try:
            loaded = specs.load_all(path)
        except UserError:
            continue
        if len(loaded) == 1 and loaded[0].get("sweep"):
            out.append(path.name)
    return out


def load_spec(specs_dir: str | Path, choice: str) -> dict:
    """The spec ``FILE`` or ``FILE#NAME`` of the specs folder, resolved (``extends``, defaults).

    A teacher ``from_spec: "#name"`` (a spec of the same file) becomes ``FILE#name`` so that the spec
    still finds it once saved under another name in the same folder.
    """
    file, _, name = (choice or "").partition("#")
    path = inside(specs_dir, file, "spec file")
    if not file or not path.is_file():
        raise UserError(f"no spec file {file!r} in {specs_dir}")
    loaded = specs.load_all(path)
    chosen = [s for s in loaded if not name or s.data.get("name") == name]
    if not chosen:
        raise UserError(f"{path} holds no spec named {name!r}")
    if len(chosen) > 1:
        raise UserError(f"{path} holds {len(chosen)} specs: choose one as {file}#NAME")
    data = chosen[0].data
    teacher = data.get("teacher") or {}
    if str(teacher.get("from_spec") or "").startswith("#"):
        teacher["from_spec"] = file + teacher["from_spec"]
    return data


def save_spec(specs_dir: str | Path, file_name: str, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``specs_dir/file_name``; an existing different file needs ``overwrite``."""
    path = inside(specs_dir, check_file_name(file_name), "spec file")
    if path.exists() and path.read_text() != text and not overwrite:
        raise UserError(f"{path} exists: tick 'overwrite' to replace it, or choose another file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def launch_text(data: dict, specs_dir: str | Path) -> str:
    """The YAML of a spec started from the form: written into its run directory, so a relative teacher
    ``from_spec`` is made absolute (it is relative to the specs folder, where the form's spec belongs)."""
    data = copy.deepcopy(data)
    teacher = data.get("teacher") or {}
    ref = teacher.get("from_spec")
    if ref:
        if str(ref).startswith("#"):
            raise UserError(f"teacher.from_spec {ref!r} names a spec of the same file; name the file too "
                            f"(FILE{ref}) so that the run finds it")
        teacher["from_spec"] = specs.absolute_ref(ref, Path(specs_dir) / "form.yaml")  # relative to the folder
    return spec_yaml(data)


# ------------------------------------------------------------------------------------------- layers
def trace_inputs(data_cfg: dict) -> tuple[int, tuple, str]:
    """``(num_classes, input shape, note)`` to trace models with for the spec's ``data`` block; a dataset
    without registry meta data (an import path) is traced as 10 classes of 3x32x32, which the note says."""
    from kdgraph.spec.check import static_dataset_info

    try:
        info = static_dataset_info({"options": {}, **data_cfg}) if data_cfg.get("dataset") else None
    except (TypeError, ValueError) as e:
        raise UserError(f"data.options do not fit dataset {data_cfg.get('dataset')!r}: {e}") from None
    if info is None:
        return 10, (3, 32, 32), "input shape unknown for this dataset: traced as 10 classes of 3x32x32"
    return info[0], info[1], ""


@lru_cache(maxsize=64)
def _layers(model: str, kwargs_json: str, num_classes: int, input_shape: tuple, leaf: tuple) -> tuple:
    from kdgraph.graph import layers
    from kdgraph.spec.check import meta_model

    try:
        with TRACE_LOCK:
            net = meta_model({"model": model, "kwargs": json.loads(kwargs_json)}, num_classes)
            return tuple(layers(net.eval(), input_shape, leaf_modules=list(leaf)))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's model failing to build or to trace
        raise UserError(f"{model}: {type(e).__name__}: {e}") from None


def model_layers(model: str, kwargs: dict, data_cfg: dict, leaf: list[str]) -> list[dict]:
    """``kdgraph.layers`` rows of a model built on the meta device for the dataset (cached)."""
    num_classes, shape, _ = trace_inputs(data_cfg)
    return list(_layers(model, json.dumps(kwargs or {}, sort_keys=True, default=str), num_classes,
                        tuple(shape), tuple(leaf or ())))


def layer_table(rows: list[dict], text: str = "", pre: bool = True) -> list[list[str]]:
    """Table rows ``[name, op, kind, shape]``: those whose name or op contains ``text`` (any case), the
    ``NAME:pre`` (pre-activation) entries only with ``pre``."""
    text = (text or "").strip().lower()
    return [[r["name"], r["op"], r["kind"], "x".join(map(str, r["shape"]))] for r in rows
            if (pre or r["kind"] != "pre") and (not text or text in r["name"].lower() or text in r["op"].lower())]


def tap_choices(names: list[str]) -> list[str]:
    """The tap names in graph order, but each before every name that contains it (any case), so that the
    page's dropdown -- which, on Enter, picks the first choice containing the typed text -- picks an exact
    name (``block2``) over the names that merely contain it (``block2.0.bn1``, listed before their group)."""
    out: list[str] = []
    lowered: list[str] = []
    for name in names:
        low = name.lower()
        at = next((j for j, other in enumerate(lowered) if low in other and low != other), len(out))
        out.insert(at, name)
        lowered.insert(at, low)
    return out


def form_layers(form: dict) -> tuple[list[dict] | None, list[dict] | None, list[str]]:
    """``(teacher rows, student rows, notes)`` for the models of the form (None where one does not trace)."""
    notes: list[str] = []
    try:
        data_cfg = {"dataset": str(form.get("data.dataset") or "").strip(),
                    "options": _from_form("mapping", form.get("data.options"), "data.options")}
        leaf = _from_form("names", form.get("trace.leaf_modules"), "trace.leaf_modules")
        note = trace_inputs(data_cfg)[2]
    except (UserError, ValueError) as e:
        return None, None, [str(e)]
    if note:
        notes.append(note)
    out = []
    for role in ("teacher", "student"):
        model = str(form.get(f"{role}.model") or "").strip()
        if not model or model == NO_TEACHER:
            out.append(None)
            continue
        try:
            kwargs = _from_form("mapping", form.get(f"{role}.kwargs"), f"{role}.kwargs")
            out.append(model_layers(model, kwargs, data_cfg, leaf))
        except (UserError, ValueError) as e:
            notes.append(f"{role}: {e}")
            out.append(None)
    return out[0], out[1], notes


def term_info(form: dict, i: int, teacher_rows: list[dict] | None, student_rows: list[dict] | None) -> str:
    """What slot ``i``'s method is, its canonical weight, the pairs ``auto`` picks in the two layer tables
    (or why it picks none) and, for a method whose scale depends on map sizes, what the weight amounts to
    on these maps (:func:`weight_hint`)."""
    from kdgraph.losses import build_terms, term_params

    method = str(form.get(f"loss.{i}.method") or "").strip()
    if not method:
        return "choose a method"
    cls = method_class(method)
    if cls is None:
        return f"`{method}` is not a loss method (see the problems under the preview)"
    canonical = term_params(cls)["weight"]
    if cls.features is None:
        return f"`{method}` works on the logits (no positions); canonical weight {canonical:g}"
    kind = "pre-activation features" if cls.features == "pre" else "features"
    text = (f"`{method}` distils {kind}; auto positions: {AUTO_RULES.get(cls.auto, cls.auto)}; "
            f"canonical weight {canonical:g}")
    if teacher_rows is None or student_rows is None:
        return text + "  \npositions show once both models trace"
    cfg = {"method": method}  # the pairs do not depend on the other values, which may not be readable yet
    if form.get(f"loss.{i}.positions") == "pairs":
        cfg["positions"] = [list(r[:2]) for r in _rows(form.get(f"loss.{i}.pairs")) if len(r) > 1 and r[0] and r[1]]
    terms, problems = build_terms([cfg], teacher_rows=teacher_rows, student_rows=student_rows, has_teacher=True)
    if problems:
        return text + "  \n" + problems[0][1]
    if "positions" not in cfg:
        text += "  \n**auto chose** (teacher → student): " + ", ".join(f"`{t}` → `{s}`" for t, s in terms[0].pairs)
    try:
        weight = _from_form("number", form.get(f"loss.{i}.weight"), "weight")
    except ValueError:
        return text
    hint = weight_hint(cls, canonical if weight is OMIT else float(weight), terms[0].pairs, teacher_rows, student_rows)
    return text + (f"  \n{hint}" if hint else "")


def weight_hint(cls, weight: float, pairs: list, teacher_rows: list[dict], student_rows: list[dict]) -> str | None:
    """For a method whose loss per position scales as 1/(H*W) (``weight_map_reference`` set, e.g. ``at``):
    what ``weight`` amounts to on the maps of ``pairs`` compared with the maps its canonical weight was
    tuned on, and the weight that matches the canonical one here. None for other methods, or when the
    maps are within a factor 1.5 of the reference."""
    from kdgraph.losses import term_params

    reference = getattr(cls, "weight_map_reference", None)
    shapes = {("t", r["name"]): r["shape"] for r in teacher_rows}
    shapes.update({("s", r["name"]): r["shape"] for r in student_rows})
    maps = []
    for t, s in pairs:
        ts, ss = shapes.get(("t", t)), shapes.get(("s", s))
        if not reference or not ts or not ss or len(ts) != 3 or len(ss) != 3:
            return None
        maps.append(min(ts[1:], ss[1:], key=lambda hw: hw[0] * hw[1]))  # the larger map is pooled to the smaller
    if not maps:
        return None
    factor = sum(1 / (h * w) for h, w in maps) / sum(1 / (h * w) for h, w in reference)
    if 1 / 1.5 <= factor <= 1.5:
        return None
    canonical = term_params(cls)["weight"]
    here = ", ".join(f"{h}x{w}" for h, w in maps)
    ref = ", ".join(f"{h}x{w}" for h, w in reference)
    return (f"⚠ **weight for these maps**: its loss scales as 1/(H·W), so weight {weight:g} on {here} acts like "
            f"{weight * factor:.4g} on the {ref} maps the canonical {canonical:g} was tuned on; "
            f"**{canonical / factor:.4g}** here matches the canonical weight")


def dataset_options(name: str) -> str:
    """The ``data.options`` a dataset builder takes, with their defaults (one line of Markdown)."""
    import inspect

    from kdgraph.data import DATASETS

    name = (name or "").strip()
    try:
        builder = DATASETS.get(name)
        params = inspect.signature(builder).parameters.values()
    except UserError as e:
        return f"⚠ {e}"
    except (TypeError, ValueError):
        return f"`{name}`: its options cannot be listed"
    fixed = ("root", "train", "augment", "download")
    listed = [f"`{p.name}`" + ("" if p.default is p.empty else f" (default {yaml_text(p.default)})")
              for p in params if p.name not in fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return f"options of `{name}`: " + ", ".join(listed) if listed else f"`{name}` takes no options"
