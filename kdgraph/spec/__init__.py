"""Specs: YAML files validated against the JSON Schema shipped here (``schema.json``, draft 2020-12).

Every problem is reported as ``FILE:LINE:COL: key.path: message``. Loading is ``yaml.safe_load``-safe (only
plain YAML types). ``extends: base.yaml`` deep-merges a base spec (lists are replaced, not merged), and
``--set key.path=value`` overrides apply last (the value is parsed as YAML). A spec with ``seeds: [0, 1, 2]``
stands for one run per seed: :func:`per_seed` makes them (``NAME-seed0``... with that ``train.seed``).
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

from ..errors import SpecError, UserError, did_you_mean

Path_ = tuple  # a key path: ("loss", 0, "weight")
_PLAIN_KEY = re.compile(r"^[\w+=-][\w.+=-]*$")  # shown as it is in a problem's key path; others JSON-quoted
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
        return (*self.where(path), shown_path(path), message)

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


def shown_path(path: Iterable) -> str:
    """A key path as a problem shows it: dotted, keys that are not plain names JSON-quoted."""
    return dotted(p if isinstance(p, int) or _PLAIN_KEY.match(p) else json.dumps(p) for p in path if p != "<key>")


def schema() -> dict:
    return json.loads(resources.files(__package__).joinpath("schema.json").read_text())


def resolve_ref(sch: dict, root: dict) -> dict:
    """``sch`` with its ``$ref`` followed (``#/$defs/NAME`` of ``root``, the schema), repeatedly."""
    while "$ref" in sch:
        sch = root["$defs"][sch["$ref"].rsplit("/", 1)[-1]]
    return sch


# ------------------------------------------------------------------------------------------------ YAML
MAX_BYTES = 1 << 20      # a spec is a few KiB; a bigger file is not a spec (or is /dev/zero)
MAX_DEPTH = 64           # nesting of mappings and lists
MAX_VALUES = 100_000     # values after expanding aliases (a "billion laughs" file expands to 10^9)


def _at(file: str, mark, message: str, path: Path_ = ()) -> SpecError:
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return SpecError([(file, line, col, shown_path(path), message)])


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, composing at most :data:`MAX_DEPTH` levels (its composer recurses)."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _at(self.name, self.peek_event().start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Builder:
    """Plain data from a composed YAML node graph, with the position of every key path.

    Aliases are expanded (a spec is a tree), at most :data:`MAX_VALUES` values in all; an alias to one of
    its own ancestors is an error rather than an endless tree.
    """

    def __init__(self, file: str):
        self.file, self.count, self.open = file, 0, set()
        self.scalars = yaml.SafeLoader("")

    def build(self, node: yaml.Node, path: Path_, positions: dict) -> Any:
        mark = node.start_mark
        positions[path] = (self.file, mark.line + 1, mark.column + 1)
        self.count += 1
        if self.count > MAX_VALUES:
            raise _at(self.file, mark, f"the spec expands to more than {MAX_VALUES} values (aliases repeating "
                                       f"aliases?); a spec is a few hundred", path)
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            return self.scalar(node, path)
        if node.tag not in (yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG):
            raise _at(self.file, mark, f"unsupported YAML: the tag {node.tag!r} (a spec holds plain mappings, "
                                       f"lists and values)", path)
        if id(node) in self.open:
            raise _at(self.file, mark, "an alias refers to a mapping or list that contains it (a recursive "
                                       "alias); a spec is a tree", path)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(v, path + (i,), positions) for i, v in enumerate(node.value)]
            return self.mapping(node, path, positions)
        finally:
            self.open.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path_, positions: dict) -> dict:
        out = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                shown = f"{key!r} ({type(key).__name__})" if isinstance(key_node, yaml.ScalarNode) else "a mapping or list"
                raise _at(self.file, key_node.start_mark, f"a key must be text, not {shown}; quote it", path)
            if key in out:
                raise _at(self.file, key_node.start_mark, "duplicate key", path + (key,))
            out[key] = self.build(value_node, path + (key,), positions)
            # point a key's problems at the key itself, its value's at the value
            positions.setdefault(path + (key, "<key>"), (self.file, key_node.start_mark.line + 1,
                                                         key_node.start_mark.column + 1))
        return out

    def scalar(self, node: yaml.Node, path: Path_) -> Any:
        try:
            return self.scalars.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as e:
            raise _at(self.file, e.problem_mark or node.start_mark, f"unsupported YAML: {e.problem}", path) from None
        except Exception as e:  # noqa: BLE001 - PyYAML's safe constructors on a value that is not of its tag
            # (`!!timestamp nope` raises AttributeError, `!!binary` binascii.Error, `!!int x` ValueError)
            raise _at(self.file, node.start_mark, f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]} "
                                                  f"({type(e).__name__})", path) from None


def read_text(file: str | Path) -> str:
    """A spec file's text: at most :data:`MAX_BYTES`, UTF-8, no NUL bytes (errors name file, line, column)."""
    file = str(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise UserError(f"cannot read spec {file}: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise SpecError([(file, 1, 1, "", f"larger than {MAX_BYTES // 1024} KiB: not a spec (a spec is a few KiB "
                                          f"of YAML)")])
    bad = raw.find(b"\0")
    if bad < 0:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            bad = e.start
            what = f"byte 0x{raw[bad]:02x} is not UTF-8; save the file as UTF-8"
    else:
        what = "a NUL byte: a binary file, not YAML text"
    line = raw.count(b"\n", 0, bad) + 1
    col = bad - (raw.rfind(b"\n", 0, bad) + 1) + 1
    raise SpecError([(file, line, col, "", what)])


def load_yaml(file: str | Path, text: str | None = None) -> list[tuple[Any, dict]]:
    """Parse the YAML documents of a file safely: ``[(data, {key path: (file, line, col)}), ...]``.

    Only plain YAML types (``yaml.safe_load``'s); limits on size (:data:`MAX_BYTES`), nesting
    (:data:`MAX_DEPTH`) and alias expansion (:data:`MAX_VALUES`) end hostile or mistaken files fast.
    """
    file = str(file)
    if text is None:
        text = read_text(file)
    elif len(text) > MAX_BYTES:
        raise SpecError([(file, 1, 1, "", f"larger than {MAX_BYTES // 1024} KiB: not a spec")])
    docs = []
    loader = None
    try:
        loader = _Loader(text)  # the reader checks every character here
        loader.name = file
        while loader.check_node():
            node = loader.get_node()
            positions: dict = {}
            docs.append((_Builder(file).build(node, (), positions) if node is not None else {}, positions))
    except yaml.MarkedYAMLError as e:
        raise _at(file, e.problem_mark, f"invalid YAML: {e.problem or e}") from None
    except yaml.YAMLError as e:  # the reader: a character YAML does not allow
        position = getattr(e, "position", 0)
        line = text.count("\n", 0, position) + 1
        what = f"the character {chr(e.character)!r} (#x{e.character:04x}), which YAML does not allow" \
            if isinstance(e, yaml.reader.ReaderError) else str(e)
        raise SpecError([(file, line, position - (text.rfind("\n", 0, position) + 1) + 1, "",
                          f"invalid YAML: {what}")]) from None
    finally:
        if loader is not None:
            loader.dispose()
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
    if not key.strip() or any(not p for p in key.strip().split(".")):
        raise UserError(f"--set {text}: {key!r} is not a key path like loss.1.weight")
    try:
        docs = load_yaml("--set", raw) if raw.strip() else [(None, {})]
    except SpecError as e:
        raise UserError(f"--set {key}: the value {raw!r} is not valid YAML: {e.problems[0][-1]}") from None
    if len(docs) != 1:
        raise UserError(f"--set {key}: the value {raw!r} holds {len(docs)} YAML documents, not one value")
    path = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
    return path, docs[0][0]


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
        raise SpecError([(*positions.get((), (str(file), 1, 1)), "",
                          f"a spec is a mapping of keys (name, data, student, ...), not {type(data).__name__}")])
    base_name = data.pop("extends", None)
    if base_name is None:
        return Spec(data, str(file), positions)
    where = positions[("extends",)]
    if not isinstance(base_name, str) or not base_name.strip():
        raise SpecError([(*where, "extends", f"expected the file name of a base spec (text), got {base_name!r}")])
    base_file = (file.parent / base_name) if not Path(base_name).is_absolute() else Path(base_name)
    if base_file.resolve() in seen + (file.resolve(),):
        chain = [str(p) for p in seen + (file.resolve(), base_file.resolve())]
        raise SpecError([(*where, "extends", f"circular extends: {' -> '.join(chain)}")])
    if not base_file.is_file():
        raise SpecError([(*where, "extends", f"base spec {base_file} does not exist (or is not a file)")])
    base_docs = load_yaml(base_file)
    if len(base_docs) != 1:
        raise SpecError([(*positions[("extends",)], "extends", f"base spec {base_file} must hold one spec")])
    base = _resolve_extends(base_file, *base_docs[0], seen + (file.resolve(),))
    merged = _merge(base.data, data)
    base.positions.update(positions)
    return Spec(merged, str(file), base.positions)


# ------------------------------------------------------------------------------------- schema checking
def schema_problems(spec: Spec) -> list[tuple]:
    """Problems of ``spec`` against the JSON Schema, and numbers that are not finite (NaN, infinity)."""
    validator = jsonschema.Draft202012Validator(schema())
    problems = [spec.problem(path, f"{value!r} is not a finite number") for path, value in _non_finite(spec.data)]
    for error in sorted(validator.iter_errors(spec.data), key=lambda e: list(map(str, e.absolute_path))):
        problems.extend(_explain(spec, error))
    return problems


def _non_finite(data: Any, path: Path_ = ()) -> Iterable[tuple[Path_, float]]:
    if isinstance(data, float) and not math.isfinite(data):
        yield path, data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _non_finite(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _non_finite(v, path + (i,))


def _explain(spec: Spec, error: jsonschema.ValidationError) -> list[tuple]:
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = list(error.schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in known]
        return [(*spec.where(path + (k, "<key>")), shown_path(path + (k,)),
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
    docs = load_all(path, inherited)
    chosen = [d for d in docs if not doc or d.data["name"] == doc]
    if not chosen:
        names = [str(d.data.get("name")) for d in docs]
        raise UserError(f"teacher.from_spec {ref!r}: no spec named {doc!r} in {path}{did_you_mean(doc, names)}; "
                        f"its specs: {', '.join(names)}")
    teacher = chosen[0]
    follow = [f"data.{k}={flow_text(spec.data['data'].get(k))}" for k in TEACHER_DATA
              if spec.data["data"].get(k) != teacher.data["data"].get(k)]
    if follow:
        teacher = [d for d in load_all(path, inherited + follow) if d.data["name"] == teacher.data["name"]][0]
    return teacher
