"""The ready specs in ``specs/``: schema, names, comments, recipes, teachers and the semantic check.

Every ``specs/*.yaml`` must load against the schema, be named after its file, start with a comment block
that says how to run it, and pass :func:`kdgraph.spec.check.check` (models built on the meta device and
traced with fake tensors, so this reads no data and no weights). The specs that reproduce the original
project's tables must quote the number it reported.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

from kdgraph import spec as specs
from kdgraph.spec.check import check

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
SPEC_FILES = sorted(SPECS_DIR.glob("*.yaml"))
IDS = [f.name for f in SPEC_FILES]

#: Datasets of the original project's tables: a distillation spec on one of them reproduces a table entry.
TABLE_DATASETS = {"cifar100", "cinic10"}

# The original project's reported best test top-1 (%) for the specs that reproduce its tables.
_CIFAR = {"wrn-16-2": ("74.02", "73.10", "74.12", "75.41"),
          "wrn-16-4": ("78.56", "77.43", "78.67", "79.39"),
          "wrn-28-2": ("76.14", "75.41", "77.00", "77.86")}
_CINIC = {("2.0", "1.0"): ("85.78", "84.71", "85.32", "85.29"),
          ("2.0", "0.5"): ("80.34", "79.06", "79.15", "78.79"),
          ("1.0", "0.5"): ("80.29", "78.42", "79.02", "79.69")}
METHODS = ("kd", "at", "sp", "margin_relu")
REPORTED = {
    "teacher_wrn-28-4_cifar100": "79.17",
    "teacher_shufflenetv2-2.0_cinic10": "81.5",
    "teacher_shufflenetv2-1.0_cinic10": "78.11",
    "wrn-16-2_cifar100": "73.42",
    "wrn-16-4_cifar100": "77.24",
    "wrn-28-2_cifar100": "75.78",
    "shufflenetv2-1.0_cinic10": "78.11",
    "shufflenetv2-0.5_cinic10": "73.82",
    **{f"{m}_wrn-28-4_{s}": n for s, nums in _CIFAR.items() for m, n in zip(METHODS, nums)},
    **{f"{m}_wrn": n for m, n in zip(METHODS, _CIFAR["wrn-16-2"])},
    **{f"{m}_shufflenetv2-{t}_shufflenetv2-{s}": n
       for (t, s), nums in _CINIC.items() for m, n in zip(METHODS, nums)},
}
#: Heo et al.'s official numbers, quoted by the margin_relu specs of the same pairs.
HEO = {"margin_relu_wrn-28-4_wrn-16-2": "75.92", "margin_relu_wrn": "75.92",
       "margin_relu_wrn-28-4_wrn-16-4": "79.11", "margin_relu_wrn-28-4_wrn-28-2": "78.02"}
SHORT_NAMES = {f"{m}_wrn": f"{m}_wrn-28-4_wrn-16-2" for m in METHODS}
RECIPES = {"cifar100": "_recipe_cifar100", "cinic10": "_recipe_cinic10"}
#: Canonical weights of the feature methods (each with ce 1.0).
FEATURE_WEIGHTS = {"at": 1000, "sp": 3000, "margin_relu": 1e-3}


@lru_cache(maxsize=None)
def loaded(file: Path) -> tuple:
    return tuple(specs.load_all(file))


def leading_comment(file: Path) -> str:
    lines = []
    for line in file.read_text().splitlines():
        if not line.startswith("#") and line.strip():
            break
        lines.append(line)
    return "\n".join(lines)


def is_table_distillation(s: specs.Spec) -> bool:
    return bool(s.data.get("teacher")) and s.data["data"]["dataset"] in TABLE_DATASETS


def without(data: dict, *keys: str) -> dict:
    return {k: v for k, v in data.items() if k not in keys}


# ---------------------------------------------------------------------------------------------- all
def test_the_ready_specs_exist():
    names = {f.stem for f in SPEC_FILES}
    missing = sorted((set(REPORTED) | set(RECIPES.values())) - names)
    assert not missing, f"missing specs: {missing}"


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_schema(file):
    docs = loaded(file)  # raises SpecError with FILE:LINE:COL problems
    assert docs
    if len(docs) == 1:
        assert specs.load(file).data == docs[0].data


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_name_is_the_file_stem(file):
    docs = loaded(file)
    if len(docs) == 1 and not docs[0].data.get("sweep"):
        assert docs[0].data["name"] == file.stem
    else:  # a multi-document file or a sweep: its runs are named after the file, qualified
        for s in docs:
            assert re.fullmatch(re.escape(file.stem) + r"([-_].+)?", s.data["name"]), s.data["name"]


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_starts_with_a_comment_that_says_how_to_run_it(file):
    comment = leading_comment(file)
    assert file.read_text().startswith("#"), f"{file.name} must start with a comment block"
    assert re.search(rf"kdgraph (run|sweep|validate) specs/{re.escape(file.name)}\b", comment), \
        f"{file.name}: the leading comment gives no command that runs it"


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_distillation_specs_quote_a_reported_number(file):
    if not any(is_table_distillation(s) for s in loaded(file)):
        pytest.skip("not a distillation spec on a dataset of the original tables")
    assert re.search(r"\b[5-9]\d\.\d{1,2}\b", leading_comment(file)), \
        f"{file.name}: the leading comment quotes no reported top-1 number"


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_from_spec_teacher_trains_the_named_model_on_the_same_data(file):
    for s in loaded(file):
        teacher = s.data.get("teacher") or {}
        ref = teacher.get("from_spec")
        if not ref:
            continue
        path, _, doc = ref.partition("#")
        tfile = file.parent / path if path else file
        assert tfile.exists(), f"{file.name}: teacher spec {tfile} does not exist"
        tdocs = [t for t in loaded(tfile) if not doc or t.data["name"] == doc]
        assert tdocs, f"{file.name}: no teacher spec {ref!r}"
        t = tdocs[0].data
        assert t["student"]["model"] == teacher["model"], "from_spec trains another model than teacher.model"
        assert not t.get("teacher"), "a from_spec teacher should be trained alone"
        assert t["data"]["dataset"] == s.data["data"]["dataset"]
        assert t["data"].get("options") == s.data["data"].get("options")


# ------------------------------------------------------------------------- the original's table specs
@pytest.mark.parametrize("stem", sorted(REPORTED))
def test_quotes_the_original_number(stem):
    comment = leading_comment(SPECS_DIR / f"{stem}.yaml")
    head = comment.split("\n#\n")[0]  # the first paragraph says what it trains and what was reported
    assert re.search(rf"\b{re.escape(REPORTED[stem])}\b", head), f"{stem}: should quote {REPORTED[stem]}"
    assert "report" in head.lower()
    if stem in HEO:
        assert HEO[stem] in comment and "Heo" in comment


@pytest.mark.parametrize("stem", sorted(REPORTED))
def test_uses_its_datasets_recipe(stem):
    (s,) = loaded(SPECS_DIR / f"{stem}.yaml")
    dataset = s.data["data"]["dataset"]
    (recipe,) = loaded(SPECS_DIR / f"{RECIPES[dataset]}.yaml")
    assert s.data["data"] == recipe.data["data"]
    assert s.data["train"] == recipe.data["train"]


def test_recipes():
    (c100,) = loaded(SPECS_DIR / "_recipe_cifar100.yaml")
    assert c100.data["data"]["batch_size"] == 128 and c100.data["data"]["root"] == "data/cifar100"
    t = c100.data["train"]
    assert t["epochs"] == 200
    opt = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    assert {k: t["optimizer"][k] for k in opt} == opt
    assert (t["schedule"]["name"], t["schedule"]["milestones"], t["schedule"]["gamma"]) == \
        ("multistep", [60, 120, 160], 0.2)
    (cinic,) = loaded(SPECS_DIR / "_recipe_cinic10.yaml")
    assert cinic.data["data"]["batch_size"] == 96 and cinic.data["data"]["root"] == "data/cinic10"
    t = cinic.data["train"]
    assert t["epochs"] == 140
    assert {k: t["optimizer"][k] for k in opt} == {**opt, "lr": 0.01}
    assert (t["schedule"]["name"], t["schedule"]["milestones"], t["schedule"]["gamma"]) == \
        ("multistep", [100, 120], 0.1)


@pytest.mark.parametrize("stem", sorted(k for k in REPORTED if k.split("_")[0] in ("kd", "at", "sp", "margin")))
def test_distillation_loss(stem):
    (s,) = loaded(SPECS_DIR / f"{stem}.yaml")
    method = "margin_relu" if stem.startswith("margin_relu") else stem.split("_")[0]
    loss = {t["method"]: t for t in s.data["loss"]}
    assert set(loss) == {"ce", method} and len(s.data["loss"]) == 2
    if method == "kd":
        # the original's table: alpha*CE + (1-alpha)*T^2*KL with alpha 0.8, T 4
        assert (loss["ce"]["weight"], loss["kd"]["weight"], loss["kd"]["temperature"]) == (0.8, 0.2, 4)
        comment = leading_comment(SPECS_DIR / f"{stem}.yaml")
        if stem not in SHORT_NAMES:
            assert "alpha" in comment and "0.1" in comment and "0.9" in comment, \
                "kd specs explain the alpha convention and the canonical ce 0.1 + kd 0.9"
    else:
        assert loss["ce"]["weight"] == 1.0
        assert loss[method]["weight"] == FEATURE_WEIGHTS[method]
        assert loss[method].get("positions") == "auto"


@pytest.mark.parametrize("short,full", sorted(SHORT_NAMES.items()))
def test_short_names_are_the_wrn_28_4_to_16_2_specs(short, full):
    (a,) = loaded(SPECS_DIR / f"{short}.yaml")
    (b,) = loaded(SPECS_DIR / f"{full}.yaml")
    assert without(a.data, "name", "description") == without(b.data, "name", "description")


# ---------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_semantic_check(file):
    problems = [p for s in loaded(file) for p in check(s)]
    assert not problems, "\n".join(":".join(map(str, p[:3])) + f": {p[3]}: {p[4]}" for p in problems)
