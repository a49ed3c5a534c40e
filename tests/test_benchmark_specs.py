"""specs/repdistiller/: RepDistiller's 13 CIFAR-100 pairs with its recipe, each spec with its published number,
and a one-epoch fake-data run of every benchmark spec.

The published table below was read off RepDistiller's README (independently of the generator of the specs);
each spec's ``expect`` must equal it. The runs: every spec of the three sets (original-code, original-paper,
repdistiller) trains one epoch of two steps on fake data, its teacher first -- a small subset by default,
all of them with::

    python -m pytest -m benchmark tests/test_benchmark_specs.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdgraph import spec as specs
from kdgraph.losses import LOSSES

SPECS = Path(__file__).resolve().parent.parent / "specs"
RD = SPECS / "repdistiller"

PAIRS = {  # folder -> (RepDistiller's teacher, student)
    "wrn-40-2_wrn-16-2": ("wrn_40_2", "wrn_16_2"), "wrn-40-2_wrn-40-1": ("wrn_40_2", "wrn_40_1"),
    "resnet56_resnet20": ("resnet56", "resnet20"), "resnet110_resnet20": ("resnet110", "resnet20"),
    "resnet110_resnet32": ("resnet110", "resnet32"), "resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "vgg13_vgg8": ("vgg13", "vgg8"), "vgg13_mobilenetv2-0.5": ("vgg13", "MobileNetV2"),
    "resnet50-cifar_mobilenetv2-0.5": ("ResNet50", "MobileNetV2"), "resnet50-cifar_vgg8": ("ResNet50", "vgg8"),
    "resnet32x4_shufflev1": ("resnet32x4", "ShuffleV1"), "resnet32x4_shufflev2-1.0": ("resnet32x4", "ShuffleV2"),
    "wrn-40-2_shufflev1": ("wrn_40_2", "ShuffleV1"),
}
# RepDistiller README, CIFAR-100: teacher, student alone, then KD FitNet AT SP CC VID RKD PKT AB FT FSP NST CRD
COLUMNS = ("teacher", "student", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd")
TABLE = {
    "wrn-40-2_wrn-16-2": (75.61, 73.26, 74.92, 73.58, 74.08, 73.83, 73.56, 74.11, 73.35, 74.54, 72.50, 73.25, 72.91,
                          73.68, 75.48),
    "wrn-40-2_wrn-40-1": (75.61, 71.98, 73.54, 72.24, 72.77, 72.43, 72.21, 73.30, 72.22, 73.45, 72.38, 71.59, None,
                          72.24, 74.14),
    "resnet56_resnet20": (72.34, 69.06, 70.66, 69.21, 70.55, 69.67, 69.63, 70.38, 69.61, 70.34, 69.47, 69.84, 69.95,
                          69.60, 71.16),
    "resnet110_resnet20": (74.31, 69.06, 70.67, 68.99, 70.22, 70.04, 69.48, 70.16, 69.25, 70.25, 69.53, 70.22, 70.11,
                           69.53, 71.46),
    "resnet110_resnet32": (74.31, 71.14, 73.08, 71.06, 72.31, 72.69, 71.48, 72.61, 71.82, 72.61, 70.98, 72.37, 71.89,
                           71.96, 73.48),
    "resnet32x4_resnet8x4": (79.42, 72.50, 73.33, 73.50, 73.44, 72.94, 72.97, 73.09, 71.90, 73.64, 73.17, 72.86,
                             72.62, 73.30, 75.51),
    "vgg13_vgg8": (74.64, 70.36, 72.98, 71.02, 71.43, 72.68, 70.71, 71.23, 71.48, 72.88, 70.94, 70.58, 70.23, 71.53,
                   73.94),
    "vgg13_mobilenetv2-0.5": (74.64, 64.60, 67.37, 64.14, 59.40, 66.30, 64.86, 65.56, 64.52, 67.13, 66.06, 61.78,
                              None, 58.16, 69.73),
    "resnet50-cifar_mobilenetv2-0.5": (79.34, 64.60, 67.35, 63.16, 58.58, 68.08, 65.43, 67.57, 64.43, 66.52, 67.20,
                                       60.99, None, 64.96, 69.11),
    "resnet50-cifar_vgg8": (79.34, 70.36, 73.81, 70.69, 71.84, 73.34, 70.25, 70.30, 71.50, 73.01, 70.65, 70.29, None,
                            71.28, 74.30),
    "resnet32x4_shufflev1": (79.42, 70.50, 74.07, 73.59, 71.73, 73.48, 71.14, 73.38, 72.28, 74.10, 73.55, 71.75, None,
                             74.12, 75.11),
    "resnet32x4_shufflev2-1.0": (79.42, 71.82, 74.45, 73.54, 72.73, 74.56, 71.29, 73.40, 73.21, 74.69, 74.31, 72.50,
                                 None, 74.68, 75.65),
    "wrn-40-2_shufflev1": (75.61, 70.50, 74.83, 73.73, 73.32, 74.52, 71.38, 73.61, 72.21, 73.89, 73.34, 72.03, None,
                           74.89, 76.05),
}
SMALL_LR = {"mobilenetv2-0.5", "shufflev1", "shufflev2-1.0"}  # RepDistiller trains these at lr 0.01
#: (method -> the loss RepDistiller/mdistiller/the authors run, beyond ``ce``)
WEIGHTS = {"kd": 0.9, "fitnet": 100, "at": 1000, "sp": 3000, "nst": 50, "pkt": 30000, "rkd": 1, "crd": 0.8,
           "vid": 1, "cc": 0.02, "ab": 1, "ft": 200, "fsp": 50, "margin_relu": 1e-3}
DKD = {"resnet56_resnet20": 71.97, "resnet110_resnet32": 74.11, "resnet32x4_resnet8x4": 76.32,
       "wrn-40-2_wrn-16-2": 76.23, "wrn-40-2_wrn-40-1": 74.81, "vgg13_vgg8": 74.68, "resnet32x4_shufflev1": 76.45,
       "wrn-40-2_shufflev1": 76.70, "vgg13_mobilenetv2-0.5": 69.71, "resnet50-cifar_mobilenetv2-0.5": 70.35,
       "resnet32x4_shufflev2-1.0": 77.07}  # mdistiller README
DKD_BETA = {"resnet56_resnet20": 2, "resnet110_resnet32": 2, "wrn-40-2_wrn-16-2": 6, "wrn-40-2_wrn-40-1": 6,
            "vgg13_vgg8": 6, "vgg13_mobilenetv2-0.5": 6}  # mdistiller's configs; 8 otherwise
REVIEWKD = {"resnet56_resnet20": 71.89, "resnet110_resnet32": 73.89, "resnet32x4_resnet8x4": 75.63,
            "wrn-40-2_wrn-16-2": 76.12, "wrn-40-2_wrn-40-1": 75.09, "resnet32x4_shufflev1": 77.45,
            "wrn-40-2_shufflev1": 77.14, "resnet32x4_shufflev2-1.0": 77.78}


def data(file: Path) -> dict:
    (s,) = specs.load_all(file)
    return s.data


KD_LS = {"wrn-40-2_wrn-16-2": 76.11, "resnet32x4_resnet8x4": 76.62}  # Sun et al. 2024 (literature.md)
DIST = {"resnet32x4_resnet8x4": 76.31}  # Huang et al. 2022 (literature.md)
#: the specs of each pair: a method of kdgraph each (kd_ls: kd with standardize: true)
SPEC_METHODS = {"kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "nst", "crd", "dkd", "reviewkd", "dist",
                "kd_ls", "srrl", "margin_relu"}


def methods_kdgraph_has() -> list[str]:
    return sorted(m for m in SPEC_METHODS if m.split("_")[0] in LOSSES or m in LOSSES)


def test_every_pair_has_every_method_and_the_published_numbers():
    assert {p.name for p in RD.iterdir() if p.is_dir()} == set(PAIRS) | {"vanilla"}
    assert SPEC_METHODS <= set(LOSSES.names()) | {"kd_ls"}
    for folder in PAIRS:
        assert {f.stem for f in (RD / folder).glob("*.yaml")} == SPEC_METHODS, folder
        for method in SPEC_METHODS:
            published = dict(zip(COLUMNS, TABLE[folder])).get(method)
            published = {"dkd": DKD, "reviewkd": REVIEWKD, "kd_ls": KD_LS, "dist": DIST}.get(
                method, {}).get(folder, published)
            expect = data(RD / folder / f"{method}.yaml").get("expect")
            assert (expect or {}).get("top1") == published, f"{folder}/{method}"


def test_the_recipe_and_the_pairs():
    for folder, (t, s) in PAIRS.items():
        teacher, student = folder.split("_", 1)
        for file in (RD / folder).glob("*.yaml"):
            d = data(file)
            assert (d["teacher"]["model"], d["student"]["model"]) == (teacher, student)
            assert d["teacher"]["from_spec"] == f"../vanilla/{teacher}.yaml"
            tr, dd = d["train"], d["data"]
            assert (tr["epochs"], tr["schedule"]["milestones"], tr["schedule"]["gamma"]) == (240, [150, 180, 210], 0.1)
            opt = tr["optimizer"]
            assert (opt["lr"], opt["momentum"], opt["nesterov"], opt["weight_decay"]) == \
                (0.01 if student in SMALL_LR else 0.05, 0.9, False, 5e-4)
            assert (dd["dataset"], dd["batch_size"]) == ("cifar100", 64)
            assert dd["options"] == {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761],
                                     "padding_mode": "constant"}
            assert f"{t}_vanilla/ckpt_epoch_240.pth" in file.read_text()  # how to use their teacher
    for teacher in {f.split("_", 1)[0] for f in PAIRS}:
        col = next(TABLE[f][0] for f in PAIRS if f.startswith(teacher + "_"))
        assert data(RD / "vanilla" / f"{teacher}.yaml")["expect"]["top1"] == col


@pytest.mark.parametrize("method", sorted(WEIGHTS))
def test_each_method_runs_as_repdistiller_runs_it(method):
    if method not in methods_kdgraph_has():
        pytest.skip(f"kdgraph has no {method} yet")
    for folder in PAIRS:
        loss = {t["method"]: t for t in data(RD / folder / f"{method}.yaml")["loss"]}
        assert loss["ce"]["weight"] == (0.1 if method == "kd" else 1.0)
        assert loss[method]["weight"] == WEIGHTS[method]


def test_kd_ls_is_kd_on_standardized_logits_with_its_authors_recipe():
    for folder in PAIRS:
        ce, kd = data(RD / folder / "kd_ls.yaml")["loss"]
        assert (ce["weight"], kd["method"], kd["weight"], kd["temperature"], kd["standardize"]) == \
            (0.1, "kd", 9, 2, True)


def test_dkd_and_reviewkd_per_pair_settings():
    for folder in PAIRS:
        dkd = data(RD / folder / "dkd.yaml")["loss"][1]
        assert (dkd["alpha"], dkd["beta"], dkd["temperature"]) == (1.0, DKD_BETA.get(folder, 8), 4)
        review = data(RD / folder / "reviewkd.yaml")["loss"][1]
        assert review["weight"] == {"resnet56_resnet20": 0.6, "resnet110_resnet32": 1.0,
                                    "resnet32x4_shufflev2-1.0": 8.0}.get(folder, 5.0)


# ------------------------------------------------------------------------------------ fake-data runs
def benchmark_specs() -> list[Path]:
    files = sorted(RD.glob("*/*.yaml")) + sorted((SPECS / "original-code").glob("*.yaml")) + \
        sorted((SPECS / "original-paper").glob("*.yaml"))
    return [f for f in files if not f.name.startswith("_")]


def _smoke_args(file: Path, runs: Path) -> list[str]:
    classes = 100 if data(file)["data"]["dataset"] == "cifar100" else 10
    sets = {"data.dataset": "fake", "data.options": f"{{num_classes: {classes}, train_size: 32, test_size: 16}}",
            "data.batch_size": 8, "data.workers": 0, "data.loader": "workers", "train.epochs": 1,
            "train.max_steps_per_epoch": 2, "train.device": "cpu", "log.tensorboard": "false"}
    return ["run", str(file), "--runs-dir", str(runs)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


#: the default suite's subset: RepDistiller's recipe and preprocessing, and the original code's replay
#: options (constant margins, eval-mode teacher BN, its AT, its ShuffleNetV2) -- small teachers
QUICK = ["repdistiller/resnet56_resnet20/kd.yaml", "original-code/margin_relu_wrn-28-4_wrn-16-2.yaml",
         "original-code/at_shufflenetv2-orig-1.0_shufflenetv2-orig-0.5.yaml"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("benchmark-runs")  # shared: each teacher trains once


def _run(file: Path, runs: Path, cli) -> None:
    code, out, err = cli(_smoke_args(file, runs))
    assert code == 0, err[-2000:]
    name = data(file)["name"]
    summary = json.loads((runs / name / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 1


@pytest.mark.parametrize("rel", QUICK)
def test_a_benchmark_spec_runs_one_epoch_on_fake_data(rel, runs, cli):
    _run(SPECS / rel, runs, cli)


@pytest.mark.benchmark
@pytest.mark.parametrize("file", benchmark_specs(), ids=lambda f: str(f.relative_to(SPECS)))
def test_every_benchmark_spec_runs_one_epoch_on_fake_data(file, runs, cli):
    _run(file, runs, cli)
