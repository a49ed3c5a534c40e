"""The ready specs in ``specs/``: schema, names, comments, recipes, teachers, published numbers, semantics.

Every ``specs/**/*.yaml`` must load against the schema, be named by its set's rule, start with a comment
block that says how to run it, and pass :func:`kdgraph.spec.check.check` (models built on the meta device
and traced with fake tensors: no data, no weights). The sets:

* ``specs/original-code/``: the original Distillation project's tables as its code ran them;
* ``specs/original-paper/``: the same tables with each method as its paper defines it;
* ``specs/repdistiller/``: RepDistiller's 13 CIFAR-100 pairs with its recipe (tests/test_benchmark_specs.py).

A spec's ``expect`` holds a published number; its comment quotes it.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import pytest

from kdgraph import spec as specs
from kdgraph.spec.check import check

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
SPEC_FILES = sorted(SPECS_DIR.rglob("*.yaml"))
IDS = [str(f.relative_to(SPECS_DIR)) for f in SPEC_FILES]
CODE, PAPER = SPECS_DIR / "original-code", SPECS_DIR / "original-paper"

# The original project's reported best test top-1 (%), from its README.
_CIFAR = {"wrn-16-2": ("74.02", "73.10", "74.12", "75.41"),
          "wrn-16-4": ("78.56", "77.43", "78.67", "79.39"),
          "wrn-28-2": ("76.14", "75.41", "77.00", "77.86")}
_CINIC = {("2.0", "1.0"): ("85.78", "84.71", "85.32", "85.29"),
          ("2.0", "0.5"): ("80.34", "79.06", "79.15", "78.79"),
          ("1.0", "0.5"): ("80.29", "78.42", "79.02", "79.69")}
METHODS = ("kd", "at", "sp", "margin_relu")
REPORTED = {  # stem in the original-code set -> its number
    "teacher_wrn-28-4_cifar100": "79.17", "wrn-16-2_cifar100": "73.42", "wrn-16-4_cifar100": "77.24",
    "wrn-28-2_cifar100": "75.78", "shufflenetv2-orig-2.0_cinic10": "81.5", "shufflenetv2-orig-1.0_cinic10": "78.11",
    "shufflenetv2-orig-0.5_cinic10": "73.82",
    **{f"{m}_wrn-28-4_{s}": n for s, nums in _CIFAR.items() for m, n in zip(METHODS, nums)},
    **{f"{m}_shufflenetv2-orig-{t}_shufflenetv2-orig-{s}": n
       for (t, s), nums in _CINIC.items() for m, n in zip(METHODS, nums)},
}
#: Heo et al.'s official numbers: the expect of the paper set's margin_relu specs.
HEO = {"wrn-16-2": 75.92, "wrn-16-4": 79.11, "wrn-28-2": 78.02}
WRN_PRE = ["block1.0.relu1:pre", "block2.0.relu1:pre", "block3.0.relu1:pre", "relu:pre"]
SHUFFLE = ["pre", "stage2", "stage3", "stage4", "conv5"]


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


def one(file: Path) -> dict:
    (s,) = loaded(file)
    return s.data


def expected_name(file: Path) -> str:
    """The naming rule: the file stem; ``code-`` before it in original-code/, ``rd-...`` in repdistiller/."""
    rel = file.relative_to(SPECS_DIR)
    if rel.parts[0] == "original-code":
        return "code-" + file.stem
    if rel.parts[0] == "repdistiller":
        return "rd-" + file.stem + ("" if len(rel.parts) == 2 else "_" + rel.parts[1])
    return file.stem


# ---------------------------------------------------------------------------------------------- all
def test_the_three_sets_exist():
    assert {p.name for p in SPECS_DIR.iterdir() if p.is_dir()} >= {"original-code", "original-paper", "repdistiller"}
    assert {f"{stem}.yaml" for stem in REPORTED} <= {f.name for f in CODE.glob("*.yaml")}
    names = [s.data["name"] for f in SPEC_FILES for s in loaded(f)]
    assert len(names) == len(set(names)), "two specs share a run name"


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_schema_and_name(file):
    docs = loaded(file)  # raises SpecError with FILE:LINE:COL problems
    assert docs
    if len(docs) == 1 and not docs[0].data.get("sweep"):
        assert docs[0].data["name"] == expected_name(file)
    else:  # a multi-document file or a sweep: its runs are named after the file, qualified
        for s in docs:
            assert re.fullmatch(re.escape(file.stem) + r"([-_].+)?", s.data["name"]), s.data["name"]


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_starts_with_a_comment_that_says_how_to_run_it(file):
    comment = leading_comment(file)
    assert file.read_text().startswith("#"), f"{file.name} must start with a comment block"
    rel = file.relative_to(SPECS_DIR.parent)
    assert re.search(rf"kdgraph (run|sweep|validate) {re.escape(str(rel))}\b", comment), \
        f"{rel}: the leading comment gives no command that runs it"


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_a_published_number_is_quoted_where_it_is_expected(file):
    for s in loaded(file):
        expect = s.data.get("expect")
        if expect:
            assert re.search(rf"\b{expect['top1']:.2f}".rstrip("0").rstrip("."), leading_comment(file)), \
                f"{file.name}: the comment does not quote its expected {expect['top1']}"
            assert expect["source"] and expect["metric"] == "best_top1"


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


@pytest.mark.parametrize("file", SPEC_FILES, ids=IDS)
def test_semantic_check(file):
    problems = [p for s in loaded(file) for p in check(s)]
    assert not problems, "\n".join(":".join(map(str, p[:3])) + f": {p[3]}: {p[4]}" for p in problems)


# ------------------------------------------------------------------- the original code, as it ran
@pytest.mark.parametrize("stem", sorted(REPORTED))
def test_original_code_expects_the_reported_number(stem):
    data = one(CODE / f"{stem}.yaml")
    assert data["expect"]["top1"] == float(REPORTED[stem])
    assert "original Distillation project README" in data["expect"]["source"]


def test_original_code_recipes():
    opt = {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    recipes = {  # file -> (batch, epochs, lr, milestones, gamma)
        "_recipe_cifar100": (128, 200, 0.1, [60, 120, 160], 0.2),
        "_teacher_recipe_cifar100": (96, 140, 0.1, [31, 61, 91, 121], 0.1),  # simple_train.py: x0.1 every 30
        "_recipe_cinic10": (96, 140, 0.01, [100, 120], 0.1),
        "_teacher_recipe_cinic10": (96, 140, 0.01, [31, 61, 91, 121], 0.1),
    }
    for stem, (batch, epochs, lr, milestones, gamma) in recipes.items():
        d = one(CODE / f"{stem}.yaml")
        t = d["train"]
        assert (d["data"]["batch_size"], t["epochs"], t["optimizer"]["lr"]) == (batch, epochs, lr), stem
        assert {k: t["optimizer"][k] for k in opt} == opt
        assert (t["schedule"]["name"], t["schedule"]["milestones"], t["schedule"]["gamma"]) == \
            ("multistep", milestones, gamma), stem
        assert d["data"]["options"] == ({"crop": "resized"} if "cinic" in stem else {})
    # students alone and teachers were trained with the teacher script
    for stem in REPORTED:
        if "_wrn-28-4_" not in stem and "_shufflenetv2-orig-" not in stem[3:]:
            base = "_teacher_recipe_cinic10" if "cinic" in stem else "_teacher_recipe_cifar100"
            assert one(CODE / f"{stem}.yaml")["train"] == one(CODE / f"{base}.yaml")["train"], stem


@pytest.mark.parametrize("stem", sorted(k for k in REPORTED if k.split("_")[0] in ("kd", "at", "sp", "margin")))
def test_original_code_losses(stem):
    data = one(CODE / f"{stem}.yaml")
    cinic = "shufflenetv2" in stem
    method = "margin_relu" if stem.startswith("margin_relu") else stem.split("_")[0]
    loss = {t["method"]: t for t in data["loss"]}
    assert set(loss) == {"ce", method} and len(data["loss"]) == 2
    assert data["train"] == one(CODE / ("_recipe_cinic10.yaml" if cinic else "_recipe_cifar100.yaml"))["train"]
    if cinic:
        assert data["student"]["model"].startswith("shufflenetv2-orig-")
    positions = [t for t, _ in loss[method].get("positions", [])]
    if method == "kd":  # alpha 0.8 on CE; T 4 on CIFAR-100, 16 in the CINIC-10 scripts
        assert (loss["ce"]["weight"], loss["kd"]["weight"], loss["kd"]["temperature"]) == \
            (0.8, 0.2, 16 if cinic else 4)
    elif method == "at":
        assert (loss["at"]["weight"], loss["at"]["form"]) == (30, "distillation-project")
        assert positions == (SHUFFLE if cinic else WRN_PRE)
    elif method == "sp":
        assert loss["sp"]["weight"] == 3000 and positions == (SHUFFLE if cinic else ["conv1", "block1", "block2",
                                                                                    "block3"])
    else:
        m = loss["margin_relu"]
        assert (m["weight"], m["teacher_bn"], positions) == (1e-3, "eval", SHUFFLE if cinic else WRN_PRE)
        assert m["margin"] == (-1.0 if cinic else pytest.approx(-0.7978845608, abs=1e-10))
    for t, s in loss[method].get("positions", []):
        assert t == s


# ------------------------------------------------------------------- the methods as papers define
def test_original_paper_recipes():
    c100, cinic = one(PAPER / "_recipe_cifar100.yaml"), one(PAPER / "_recipe_cinic10.yaml")
    assert (c100["data"]["batch_size"], c100["train"]["epochs"], c100["train"]["schedule"]["milestones"]) == \
        (128, 200, [60, 120, 160])
    assert (cinic["data"]["batch_size"], cinic["train"]["epochs"], cinic["data"]["options"]) == (96, 140, {})
    for file in PAPER.glob("*.yaml"):
        data = one(file)
        base = c100 if data["data"]["dataset"] == "cifar100" else cinic
        assert data["data"] == base["data"] and data["train"] == base["train"], file.name
        assert not data["student"]["model"].startswith("shufflenetv2-orig")


@pytest.mark.parametrize("file", sorted(f for f in PAPER.glob("*.yaml") if f.stem.split("_")[0] in
                                        ("kd", "at", "sp", "margin")), ids=lambda f: f.stem)
def test_original_paper_losses(file):
    data = one(file)
    method = "margin_relu" if file.stem.startswith("margin_relu") else file.stem.split("_")[0]
    loss = {t["method"]: t for t in data["loss"]}
    assert set(loss) == {"ce", method}
    if method == "kd":  # the README's alpha: the weight of the KD term
        assert (loss["ce"]["weight"], loss["kd"]["weight"], loss["kd"]["temperature"]) == (0.2, 0.8, 4)
    else:
        assert loss["ce"]["weight"] == 1.0 and loss[method]["positions"] == "auto"
        assert loss[method]["weight"] == {"at": 1000, "sp": 3000, "margin_relu": 1e-3}[method]
        assert not set(loss[method]) & {"form", "margin", "teacher_bn"}
    student = data["student"]["model"]
    if method == "margin_relu" and student in HEO:
        assert data["expect"]["top1"] == HEO[student] and "Heo" in data["expect"]["source"]
    else:
        assert data.get("expect") is None, "the original's numbers are not this configuration's"
    code = CODE / file.name.replace("shufflenetv2-", "shufflenetv2-orig-")
    assert code.exists() and f"original-code/{code.name}" in leading_comment(file)


@pytest.mark.parametrize("method", METHODS)
def test_short_names_are_the_wrn_28_4_to_16_2_paper_specs(method):
    a, b = one(SPECS_DIR / f"{method}_wrn.yaml"), one(PAPER / f"{method}_wrn-28-4_wrn-16-2.yaml")
    keep = ("name", "description", "teacher")
    assert {k: v for k, v in a.items() if k not in keep} == {k: v for k, v in b.items() if k not in keep}
    assert a["teacher"]["from_spec"] == "original-paper/teacher_wrn-28-4_cifar100.yaml"
