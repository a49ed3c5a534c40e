"""Specs: YAML files validated against the JSON Schema shipped here (``schema.json``, draft 2020-12).

Every problem is reported as ``FILE:LINE:COL: key.path: message``. Loading is ``yaml.safe_load``-safe (only
plain YAML types). ``extends: base.yaml`` deep-merges a base spec (lists are replaced, not merged), and
``--set key.path=value`` overrides apply last (the value is parsed as YAML). A spec with ``seeds: [0, 1, 2]``
stands for one run per seed: :func:`per_seed` makes them (``NAME-seed0``... with that ``train.seed``).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from ..errors import SpecError, UserError, did_you_mean

Path_ = tuple  # a key path: ("loss", 0, "weight")
Where = tuple  # (file, line, col)


@dataclass
class Spec:
    """A loaded spec: plain data plus where each key path came from."""

    data: dict
    file: str
    positions: dict[Path_, Where] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    group: str = ""  # the name of the spec whose `seeds:` made this one (runs of a group differ in train.seed)

    def where(self, path: Iterable) -> Where:
        path = tuple(path)
        while path and path not in self.positions:
            path = path[:-1]
        return self.positions.get(path, (self.file, 1, 1))

    def problem(self, path: Iterable, message: str) -> tuple:
        path = tuple(path)
        return (*self.where(path), dotted(p for p in path if p != "<key>"), message)

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)


def flow_text(value) -> str:
    """``value`` as one line of YAML flow text (a ``--set`` value, a table cell, a one-line box)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def dotted(path: Iterable) -> str:
    return ".".join(str(p) for p in path)


def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("schema.json").read_text())


def resolve_ref(sch: dict, root: dict) -> dict:
    """``sch`` with its ``$ref`` followed (``#/$defs/NAME`` of ``root``, the schema), repeatedly."""
    while "$ref" in sch:
        sch = root["$defs"][sch["$ref"].rsplit("/", 1)[-1]]
    return sch


# ------------------------------------------------------------------------------------------------ YAML
def _construct(node: yaml.Node, file: str, path: Path_, positions: dict) -> Any:
    positions[path] = (file, node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if key in out:
                raise SpecError([(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1,
                                  dotted(path + (key,)), "duplicate key")])
            out[key] = _construct(value_node, file, path + (key,), positions)
            # point a key's problems at the key itself, its value's at the value
            positions.setdefault(path + (key, "<key>"), (file, key_node.start_mark.line + 1,
                                                         key_node.start_mark.column + 1))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, file, path + (i,), positions) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_yaml(file: str | Path, text: str | None = None) -> list[tuple[Any, dict]]:
    """Parse the YAML documents of a file safely: ``[(data, {key path: (file, line, col)}), ...]``."""
    file = str(file)
    if text is None:
        try:
            text = Path(file).read_text()
        except OSError as e:
            raise UserError(f"cannot read spec {file}: {e.strerror or e}") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise SpecError([(file, line, col, "", f"invalid YAML: {getattr(e, 'problem', None) or e}")]) from None
    docs = []
    for node in nodes:
        positions: dict = {}
        try:
            docs.append((_construct(node, file, (), positions) if node is not None else {}, positions))
        except yaml.constructor.ConstructorError as e:
            mark = e.problem_mark
            raise SpecError([(file, mark.line + 1, mark.column + 1, "", f"unsupported YAML: {e.problem}")]) from None
    return docs or [({}, {})]


def _merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def set_path(data: dict, path: list, value: Any) -> None:
    """Set ``data[p0][p1]...`` = value; list indices are integers, missing mappings are created."""
    node = data
    for i, key in enumerate(path[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {} if not str(path[i + 1]).isdigit() else [])
    last = path[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx == len(node):
            node.append(value)
        else:
            node[idx] = value
    else:
        node[last] = value


def get_path(data: Any, path: Iterable) -> Any:
    for key in path:
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def parse_override(text: str) -> tuple[list, Any]:
    if "=" not in text:
        raise UserError(f"--set expects KEY.PATH=VALUE, got {text!r}")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: the value {raw!r} is not valid YAML: {e}") from None
    path = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return path, value


def load_all(file: str | Path, overrides: Iterable[str] = (), text: str | None = None) -> list[Spec]:
    """Every spec in a file (YAML documents separated by ``---`` run in order), checked against the schema.

    ``extends`` is resolved, then the ``--set`` overrides are applied to each document.
    """
    specs, problems = [], []
    for data, positions in load_yaml(file, text):
        spec = _resolve_extends(Path(file), data, positions, ())
        for text_override in overrides:
            path, value = parse_override(text_override)
            try:
                set_path(spec.data, path, value)
            except (IndexError, ValueError, TypeError, KeyError, AttributeError):
                raise UserError(f"--set {text_override}: no such place in the spec "
                                f"(lists are indexed from 0; use the next index to append)") from None
            spec.positions[tuple(path)] = ("--set", 1, 1)
            spec.overrides.append(text_override)
        problems.extend(schema_problems(spec))
        specs.append(spec)
    names = [s.data.get("name") for s in specs]
    for s in specs:
        if names.count(s.data.get("name")) > 1:
            problems.append(s.problem(("name",), f"two specs in {file} are named {s.data.get('name')!r}"))
            break
    problems.extend(s.problem(("seeds",), "give `seeds` (one run per seed) or train.seed, not both")
                    for s in specs if s.data.get("seeds") and "seed" in (s.data.get("train") or {}))
    if problems:
        raise SpecError(problems)
    for s in specs:
        apply_defaults(s.data)
    return specs


def per_seed(spec: Spec) -> list[Spec]:
    """The runs a loaded spec stands for: one per value of its ``seeds`` list (``train.seed`` set to it, named
    ``NAME-seed<K>``, ``group`` NAME, no ``seeds`` key), or the spec itself when it has none.

    Example::

        kd = load_all("specs/quickstart.yaml")[-1]          # quickstart-kd, with seeds: [0, 1, 2]
        [s.data["name"] for s in per_seed(kd)]              # quickstart-kd-seed0, -seed1, -seed2
    """
    if not spec.data.get("seeds"):
        return [spec]
    out = []
    for seed in spec.data["seeds"]:
        data = copy.deepcopy({k: v for k, v in spec.data.items() if k != "seeds"})
        data["name"] = f"{spec.data['name']}-seed{seed}"
        data["train"]["seed"] = seed
        out.append(Spec(data, spec.file, dict(spec.positions), list(spec.overrides), group=spec.data["name"]))
    return out


def load(file: str | Path, overrides: Iterable[str] = (), text: str | None = None) -> Spec:
    """The one spec in a file (see :func:`load_all`)."""
    specs = load_all(file, overrides, text)
    if len(specs) != 1:
        raise UserError(f"{file} holds {len(specs)} specs; this command takes a file with one")
    return specs[0]


def _resolve_extends(file: Path, data: Any, positions: dict, seen: tuple) -> Spec:
    if not isinstance(data, dict):
        raise SpecError([(str(file), 1, 1, "", "a spec is a mapping of keys (name, data, student, ...)")])
    base_name = data.pop("extends", None)
    if base_name is None:
        return Spec(data, str(file), positions)
    base_file = (file.parent / base_name) if not Path(base_name).is_absolute() else Path(base_name)
    if base_file.resolve() in seen:
        raise SpecError([(*positions[("extends",)], "extends", f"circular extends through {base_file}")])
    if not base_file.exists():
        raise SpecError([(*positions[("extends",)], "extends", f"base spec {base_file} does not exist")])
    base_docs = load_yaml(base_file)
    if len(base_docs) != 1:
        raise SpecError([(*positions[("extends",)], "extends", f"base spec {base_file} must hold one spec")])
    base = _resolve_extends(base_file, *base_docs[0], seen + (file.resolve(),))
    merged = _merge(base.data, data)
    base.positions.update(positions)
    return Spec(merged, str(file), base.positions)


# ------------------------------------------------------------------------------------- schema checking
def schema_problems(spec: Spec) -> list[tuple]:
    validator = jsonschema.Draft202012Validator(schema())
    problems = []
    for error in sorted(validator.iter_errors(spec.data), key=lambda e: list(map(str, e.absolute_path))):
        problems.extend(_explain(spec, error))
    return problems


def _explain(spec: Spec, error: jsonschema.ValidationError) -> list[tuple]:
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in known]
        return [(*spec.where(path + (k, "<key>")), dotted(path + (k,)),
                 f"unknown key {k!r}{did_you_mean(str(k), known)}; valid keys: {', '.join(known)}")
                for k in unknown]
    if error.validator == "enum":
        options = error.validator_value
        return [spec.problem(path, f"{error.instance!r} is not one of {options}"
                                   f"{did_you_mean(str(error.instance), map(str, options))}")]
    if error.validator == "oneOf" and error.context:
        # report the branch that got furthest rather than jsonschema's generic summary
        best = max(error.context, key=lambda e: len(e.absolute_path))
        if best.absolute_path != error.absolute_path or best.validator != "type":
            return _explain(spec, best)
        return [spec.problem(path, f"expected {error.schema.get('description') or 'a valid value'}, "
                                   f"got {error.instance!r}")]
    if error.validator == "pattern" and error.schema.get("description"):
        return [spec.problem(path, f"{error.instance!r} is not valid here: {error.schema['description']}")]
    if error.validator == "required":
        return [spec.problem(path, error.message.replace("property", "key"))]
    if error.validator == "type" and isinstance(error.instance, str) and _looks_numeric(error.instance):
        return [spec.problem(path, f"{error.message}: YAML (1.1, as PyYAML reads it) takes {error.instance!r} "
                                   f"for text; write exponents with a dot and a sign (1.0e-3, 5.0e+4) or "
                                   f"plain decimals (0.001)")]
    return [spec.problem(path, error.message)]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_defaults(data: dict, sch: dict | None = None) -> None:
    """Fill schema defaults into ``data`` in place (objects that are present, and top-level sections)."""
    root = sch or schema()

    def fill(obj: Any, s: dict) -> None:
        s = resolve_ref(s, root)
        if isinstance(obj, dict):
            for key, sub in s.get("properties", {}).items():
                sub = resolve_ref(sub, root)
                if key not in obj:
                    if "default" in sub:
                        obj[key] = copy.deepcopy(sub["default"])
                    elif "properties" in sub and not sub.get("required") and key != "sweep":
                        obj[key] = {}
                if key in obj:
                    fill(obj[key], sub)
        elif isinstance(obj, list) and isinstance(s.get("items"), dict):
            for item in obj:
                fill(item, s["items"])

    fill(data, root)


# ---------------------------------------------------------------------------------- teacher.from_spec
TEACHER_DATA = ("dataset", "root", "download", "options")  # what a from_spec teacher takes from the student's spec


def split_ref(ref: str, spec_file: str | Path) -> tuple[Path, str]:
    """``FILE#NAME`` (a ``teacher.from_spec``) as ``(spec file, NAME or "")``.

    FILE is relative to the folder of ``spec_file`` (the spec that holds the reference); an empty FILE
    (``#NAME``) is ``spec_file`` itself, and no ``#NAME`` means the first spec of the file.
    """
    file, _, doc = str(ref).partition("#")
    return (Path(spec_file).parent / file if file else Path(spec_file)), doc


def absolute_ref(ref: str, spec_file: str | Path) -> str:
    """``ref`` (see :func:`split_ref`) with an absolute file, valid from any folder."""
    path, doc = split_ref(ref, spec_file)
    return f"{path.resolve()}#{doc}" if doc else str(path.resolve())


def teacher_spec(spec: Spec) -> Spec:
    """The spec that ``teacher.from_spec`` names, as the student's spec would train it.

    The student's ``--set`` overrides of ``data`` and ``train`` apply to it too, and where the data set
    differs (:data:`TEACHER_DATA`; e.g. a CIFAR recipe's teacher named by a spec switched to digits), the
    teacher follows the student's. The returned spec's ``overrides`` list what was applied.
    """
    ref = spec.data["teacher"]["from_spec"]
    path, doc = split_ref(ref, spec.file)
    inherited = [o for o in spec.overrides if o.split("=", 1)[0].split(".")[0] in ("data", "train")]
    chosen = [d for d in load_all(path, inherited) if not doc or d.data["name"] == doc]
    if not chosen:
        raise UserError(f"teacher.from_spec {ref!r}: no spec named {doc!r} in {path}")
    teacher = chosen[0]
    follow = [f"data.{k}={flow_text(spec.data['data'].get(k))}" for k in TEACHER_DATA
              if spec.data["data"].get(k) != teacher.data["data"].get(k)]
    if follow:
        teacher = [d for d in load_all(path, inherited + follow) if d.data["name"] == teacher.data["name"]][0]
    return teacher
