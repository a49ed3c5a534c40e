"""A generated corpus of mutated specs, in classes, for ``tests/test_safety_specs.py``.

Every case is ``(class, name, files)``: the files to write (name -> bytes) and the one to validate first
(``spec.yaml``). The corpus is a pure function of the seed and the number of cases per class, so a failure
is reproduced by its name. ``python -m tests.fuzz_specs [N]`` validates N cases per class and prints
tried / handled per class (handled: exit 2 with located problems, or 0, never a traceback or a hang).
"""
from __future__ import annotations

import random
import sys
from typing import Any, Iterator

import yaml

TEACHER = "teacher.pt"  # written by the test: a wrn-10-1 state_dict for 10 classes

BASE = """\
name: fz
data: {dataset: digits, workers: 0, batch_size: 8, options: {size: 16}}
teacher: {model: wrn-10-1, checkpoint: teacher.pt}
student: {model: wrn-10-1}
loss:
  - {method: ce, weight: 0.1}
  - {method: kd, weight: 0.9, temperature: 4}
  - method: at
    positions: [[block2, block2], [block3, block3]]
train: {epochs: 2, max_steps_per_epoch: 1, optimizer: {name: sgd, lr: 0.05}, schedule: {name: multistep, milestones: [1]}}
log: {tensorboard: false}
"""

MULTI = """\
name: fz-teacher
extends: recipe.yaml
data: {dataset: fake, workers: 0, batch_size: 4, options: {train_size: 8, test_size: 8, image_size: [3, 8, 8]}}
student: {model: resnet20}
---
name: fz-kd
extends: recipe.yaml
data: {dataset: fake, workers: 0, batch_size: 4, options: {train_size: 8, test_size: 8, image_size: [3, 8, 8]}}
teacher: {model: resnet20, from_spec: "#fz-teacher"}
student: {model: resnet20}
loss: [{method: ce}, {method: sp}, {method: nst, positions: [[layer3, layer3]]}]
"""

RECIPE = """\
train: {epochs: 1, max_steps_per_epoch: 1, optimizer: {lr: 0.1}, schedule: {name: constant}}
log: {tensorboard: false}
"""

SWEEP = BASE.replace("name: fz\n", "name: fz-sweep\n") + "sweep:\n  loss.1.temperature: [2, 4]\n  train.optimizer.lr: [0.1, 0.05]\n"

SEEDS = {"base": BASE, "multi": MULTI, "sweep": SWEEP}

VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 3, 2**63, -(2**63), 1e308, float("nan"), float("inf"), -float("inf"), -0.0, 0.5,
    1e-300, "", "x", "hot", "../../etc/passwd", "/dev/zero", "os:system", "subprocess:run", "#nope", "auto",
    "wrn-16-2", "block2", "fc", [], [1], [[1, 2]], [["fc", "block2"]], {}, {"a": 1}, "\u00e9\u4e2d\u200b", "a" * 5000,
    "kd", "torchvision:resnet18", "torchvision:nope", "wrn-0-0", "wrn-16-3", "digits", "fake", "cifar10",
]
YAML_CHARS = list(":-[]{}\"'\t \n&*!|>#%@`,?") + ["\\", "---", "...", "<<: *a", "&a", "*a", "!!python/name:os.system"]
TYPOS = {"name": "nmae", "data": "dta", "student": "studnet", "teacher": "teachr", "loss": "losses",
         "train": "trian", "method": "mehtod", "positions": "position", "temperature": "temprature",
         "weight": "wieght", "epochs": "epoch", "dataset": "datset", "model": "modle", "checkpoint": "ckpt"}


def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node: Any, path: tuple) -> Any:
    for p in path:
        node = node[p]
    return node


def _dump(docs: list) -> bytes:
    return yaml.safe_dump_all(docs, sort_keys=False, allow_unicode=True).encode()


def structure(rng: random.Random, seed: str) -> dict[str, bytes]:
    """One value, key or entry of a valid spec changed: another type, a bad number, a typo, an unknown key."""
    docs = list(yaml.safe_load_all(SEEDS[seed]))
    doc = rng.choice(docs)
    path = rng.choice([p for p in _paths(doc) if p])
    parent, key = _get(doc, path[:-1]), path[-1]
    op = rng.choice(["value", "value", "value", "delete", "unknown", "typo", "wrap"])
    if op == "value":
        parent[key] = rng.choice(VALUES)
    elif op == "delete":
        del parent[key]
    elif op == "unknown" and isinstance(parent, dict):
        parent[rng.choice(["colour", "tempreature", "extra", "<<", "1"])] = rng.choice(VALUES)
    elif op == "typo" and isinstance(parent, dict) and isinstance(key, str):
        parent[TYPOS.get(key, key + "s")] = parent.pop(key)
    else:
        parent[key] = [parent[key]]
    return {"spec.yaml": _dump(docs)}


def syntax(rng: random.Random, seed: str) -> dict[str, bytes]:
    """YAML-significant characters inserted, deleted or replaced at random places (1 to 3 edits)."""
    text = SEEDS[seed]
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text))
        op = rng.choice(["insert", "delete", "replace"])
        piece = rng.choice(YAML_CHARS)
        text = text[:i] + (piece if op != "delete" else "") + text[i + (op != "insert"):]
    return {"spec.yaml": text.encode()}


def truncation(rng: random.Random, seed: str) -> dict[str, bytes]:
    """The file cut at a random byte (an editor or a copy that stopped)."""
    raw = SEEDS[seed].encode()
    return {"spec.yaml": raw[: rng.randrange(len(raw))]}


def encoding(rng: random.Random, seed: str) -> dict[str, bytes]:
    """Bytes that are not UTF-8 text: Latin-1, UTF-16, NUL bytes, control bytes, random binary."""
    text = SEEDS[seed].replace("name: fz", "name: caf\u00e9-fz")
    raw = text.encode()
    i = rng.randrange(len(raw))
    choice = rng.choice(["latin1", "utf16", "nul", "control", "binary", "bom", "invalid"])
    data = {"latin1": text.encode("latin-1", "replace"), "utf16": text.encode("utf-16"),
            "nul": raw[:i] + b"\0" + raw[i:], "control": raw[:i] + bytes([rng.choice([1, 7, 27, 127])]) + raw[i:],
            "binary": bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))),
            "bom": b"\xef\xbb\xbf" + raw, "invalid": raw[:i] + bytes([rng.randrange(0x80, 0x100)]) + raw[i:]}[choice]
    return {"spec.yaml": data}


def expansion(rng: random.Random, seed: str) -> dict[str, bytes]:
    """Alias bombs, recursive aliases, deep nesting, very long files (hostile or mistaken YAML)."""
    kind = rng.choice(["laughs", "recursive", "deep_flow", "deep_block", "big", "many_docs", "long_key"])
    if kind == "laughs":
        width, depth = rng.randint(5, 12), rng.randint(6, 12)
        lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        text = BASE + "\n".join(lines).replace("a", "zz") + "\n"
    elif kind == "recursive":
        text = rng.choice(["&a [*a]\n", "name: x\ndata: &d {dataset: digits, options: *d}\n",
                           "a: &a {b: &b {c: *a}}\n", "- &x\n  - *x\n"])
    elif kind == "deep_flow":
        n = rng.randint(60, 20000)
        text = "name: " + "[" * n + "]" * n + "\n"
    elif kind == "deep_block":
        n = rng.randint(60, 400)
        text = "".join("  " * i + f"k{i}:\n" for i in range(n)) + "  " * n + "v\n"
    elif kind == "big":
        text = BASE + "description: " + "x" * rng.randint(1 << 20, 3 << 20) + "\n"
    elif kind == "many_docs":
        text = "---\n" * rng.randint(100, 5000)
    else:
        text = "? " + "k" * rng.randint(1000, 200000) + "\n: 1\n"
    return {"spec.yaml": text.encode()}


def references(rng: random.Random, seed: str) -> dict[str, bytes]:
    """``extends`` and ``from_spec`` naming wrong things: types, missing files, itself, cycles, devices."""
    kind = rng.choice(["extends_type", "extends_self", "extends_cycle", "extends_missing", "extends_device",
                       "extends_dir", "from_self", "from_cycle", "from_nope", "from_missing", "from_model",
                       "two_sources", "ckpt_missing", "ckpt_damaged", "ckpt_empty", "ckpt_other"])
    base = yaml.safe_load(BASE)
    files: dict[str, bytes] = {}
    value = {"extends_type": rng.choice([5, [1], {"a": 1}, True, None, ""]), "extends_self": "spec.yaml",
             "extends_cycle": "b.yaml", "extends_missing": "nope.yaml", "extends_device": "/dev/zero",
             "extends_dir": "."}.get(kind)
    if kind.startswith("extends"):
        base["extends"] = value
        files["b.yaml"] = b"extends: spec.yaml\n"
    elif kind.startswith("from"):
        ref = {"from_self": "#fz", "from_cycle": "other.yaml#fz-other", "from_nope": "#nope",
               "from_missing": "missing.yaml", "from_model": "other.yaml#fz-plain"}[kind]
        base["teacher"] = {"model": "wrn-10-1", "from_spec": ref}
        other = dict(yaml.safe_load(BASE), name="fz-other", teacher={"model": "wrn-10-1", "from_spec": "spec.yaml#fz"})
        plain = dict(yaml.safe_load(BASE), name="fz-plain", student={"model": "wrn-16-1"})
        plain.pop("teacher")
        plain["loss"] = [{"method": "ce"}]
        files["other.yaml"] = _dump([other, plain])
    elif kind == "two_sources":
        base["teacher"][rng.choice(["from_spec", "weights"])] = rng.choice(["x.yaml", "DEFAULT", "#fz"])
    else:
        base["teacher"]["checkpoint"] = {"ckpt_missing": "nope.pt", "ckpt_damaged": "damaged.pt",
                                         "ckpt_empty": "empty.pt", "ckpt_other": "other.pt"}[kind]
        files.update({"damaged.pt": b"PK\x03\x04" + bytes(rng.randrange(256) for _ in range(300)), "empty.pt": b""})
    files["spec.yaml"] = _dump([base])
    return files


def imports(rng: random.Random, seed: str) -> dict[str, bytes]:
    """Import paths where a spec names a model, data set or method (validated with imports switched off)."""
    path = rng.choice(["os:system", "subprocess:run", "builtins:eval", "shutil:rmtree", "posix:system",
                       "kdgraph.checkpoint:os.system", "fz_evil:build", "fz_evil.sub:build", "tests.userpkg:Net",
                       "kdgraph.models:build_model", "fz_evil:_private"])
    base = yaml.safe_load(BASE)
    where = rng.choice(["student", "teacher", "dataset", "method"])
    if where in ("student", "teacher"):
        base[where]["model"] = path
        base[where]["kwargs"] = {"command": "touch pwned"}
    elif where == "dataset":
        base["data"]["dataset"] = path
    else:
        base["loss"][1]["method"] = path
    return {"spec.yaml": _dump([base])}


CLASSES = {"structure": structure, "syntax": syntax, "truncation": truncation, "encoding": encoding,
           "expansion": expansion, "references": references, "imports": imports}


def corpus(per_class: int, seed: int = 0) -> list[tuple[str, str, dict[str, bytes]]]:
    """``per_class`` cases of every class: ``[(class, case name, files)]``."""
    cases = []
    for cls, make in CLASSES.items():
        for i in range(per_class):
            rng = random.Random(f"{seed}-{cls}-{i}")
            cases.append((cls, f"{cls}-{i}", make(rng, rng.choice(list(SEEDS)))))
    return cases


if __name__ == "__main__":  # counts for a closing note: python -m tests.fuzz_specs 200
    from tests.test_safety_specs import count_corpus

    count_corpus(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
