"""The ``kdgraph`` command line: validate (FILE:LINE:COL problems, --set), schema, layers, models, --help."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdgraph.models import build_model

REPO = Path(__file__).resolve().parents[1]
PROBLEM = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>[\w.<>-]+): (?P<msg>.+)$")


@pytest.fixture
def teacher_pt(tmp_path, monkeypatch) -> Path:
    """``teacher.pt`` (a wrn-16-1 for 10 classes, as the specs below name) in the current directory."""
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save(build_model("wrn-16-1", num_classes=10).state_dict(), tmp_path / "teacher.pt")
    return tmp_path / "teacher.pt"


def problems(text: str) -> list[dict]:
    """Every line must be one ``FILE:LINE:COL: key.path: message`` problem."""
    lines = [l for l in text.splitlines() if l.strip()]
    found = [PROBLEM.match(l) for l in lines]
    assert all(found), f"not a FILE:LINE:COL: key.path: message line in:\n{text}"
    return [{**m.groupdict(), "line": int(m["line"]), "col": int(m["col"])} for m in found]


# A spec whose schema is broken (its semantic checks then do not run).
SCHEMA_BAD = """\
name: schema-bad
data: {dataset: digits, workers: 0}
student: {model: wrn-10-1}
train:
  epochs: 2
  epoch: 3
"""

# A spec that passes the schema but names a wrong method, a wrong method parameter and a wrong layer.
SEMANTIC_BAD = """\
name: semantic-bad
data: {dataset: digits, workers: 0}
teacher: {model: wrn-16-1, checkpoint: teacher.pt}
student: {model: wrn-10-1}
loss:
  - method: ce
  - method: kdd
  - method: kd
    temprature: 4
  - method: at
    positions: [[block2, blok2]]
"""

# kd without a teacher.
NO_TEACHER = """\
name: no-teacher
data: {dataset: digits, workers: 0}
student: {model: wrn-10-1}
loss:
  - method: ce
  - method: kd
"""

VALID = """\
name: valid
data: {dataset: digits, workers: 0}
teacher: {model: wrn-16-1, checkpoint: teacher.pt}
student: {model: wrn-10-1}
loss:
  - {method: ce, weight: 0.1}
  - {method: kd, temperature: 4}
  - method: at
    positions: [[block2, block2], [block3, block3]]
train: {epochs: 2}
"""


def test_validate_reports_each_problem_at_its_place(tmp_path, cli, monkeypatch, teacher_pt):
    monkeypatch.chdir(tmp_path)
    for name, text in [("schema_bad.yaml", SCHEMA_BAD), ("semantic_bad.yaml", SEMANTIC_BAD),
                       ("no_teacher.yaml", NO_TEACHER)]:
        Path(name).write_text(text)
    code, out, err = cli(["validate", "schema_bad.yaml", "semantic_bad.yaml", "no_teacher.yaml"])
    assert code == 2
    assert "Traceback" not in out + err
    got = problems(err)
    by_path = {(p["file"], p["path"]): p for p in got}
    assert len(got) == len(by_path) == 5, err  # one line per problem, no duplicates

    p = by_path[("schema_bad.yaml", "train.epoch")]
    assert (p["line"], p["col"]) == (6, 3)
    assert "unknown key 'epoch'" in p["msg"] and "did you mean 'epochs'" in p["msg"]

    p = by_path[("semantic_bad.yaml", "loss.1.method")]
    assert (p["line"], p["col"]) == (7, 13)
    assert "'kdd'" in p["msg"] and "did you mean" in p["msg"] and "'kd'" in p["msg"]

    p = by_path[("semantic_bad.yaml", "loss.2.temprature")]
    assert p["line"] == 9
    assert "no parameter 'temprature'" in p["msg"] and "did you mean 'temperature'" in p["msg"]

    p = by_path[("semantic_bad.yaml", "loss.3.positions.0.1")]
    assert p["line"] == 11 and p["col"] == 26  # the student tap 'blok2' itself
    assert "'blok2'" in p["msg"] and "student" in p["msg"] and "'block2'" in p["msg"]

    p = by_path[("no_teacher.yaml", "loss.1.method")]
    assert p["line"] == 6
    assert "teacher" in p["msg"]


def test_validate_a_valid_spec(tmp_path, cli, teacher_pt):
    file = tmp_path / "valid.yaml"
    file.write_text(VALID)
    code, out, err = cli(["validate", file])
    assert code == 0, err
    assert "1 spec(s) valid" in out


def test_validate_multi_document_file(tmp_path, cli, teacher_pt):
    file = tmp_path / "two.yaml"
    file.write_text(VALID + "---\n" + VALID.replace("name: valid", "name: valid2").replace("block3, block3",
                                                                                           "block3, blok3"))
    code, out, err = cli(["validate", file])
    assert code == 2
    (p,) = problems(err)
    assert p["path"] == "loss.2.positions.1.1" and p["line"] == 20  # the line in the file, second document


def test_set_overrides_apply_and_bad_values_point_at_set(tmp_path, cli, teacher_pt):
    file = tmp_path / "s.yaml"
    file.write_text(VALID.replace("epochs: 2", "epochs: -1"))
    code, _, err = cli(["validate", file])
    assert code == 2
    (p,) = problems(err)
    assert p["path"] == "train.epochs" and p["line"] == 10 and "minimum" in p["msg"]

    code, out, err = cli(["validate", file, "--set", "train.epochs=3"])
    assert code == 0, err

    code, out, err = cli(["validate", file, "--set", "train.epochs=three"])
    assert code == 2 and "Traceback" not in out + err
    (p,) = problems(err)
    assert p["file"] == "--set" and p["path"] == "train.epochs" and "integer" in p["msg"]

    # an override that fixes a semantic problem: kd without a teacher, replaced by a logit-free loss list
    nt = tmp_path / "nt.yaml"
    nt.write_text(NO_TEACHER)
    assert cli(["validate", nt])[0] == 2
    code, _, err = cli(["validate", nt, "--set", "loss=[{method: ce}]"])
    assert code == 0, err
    code, _, err = cli(["validate", nt, "--set", "loss.1.method=ce"])
    assert code == 0, err

    code, out, err = cli(["validate", file, "--set", "train.epochs"])  # no '='
    assert code == 2 and "KEY.PATH=VALUE" in err and "Traceback" not in out + err


def test_run_refuses_a_sweep_spec_unless_sweep_is_nulled(tmp_path, cli):
    file = tmp_path / "sw.yaml"
    file.write_text("name: sw\ndata: {dataset: digits, workers: 0}\nstudent: {model: wrn-10-1}\n"
                    "train: {epochs: 1, max_steps_per_epoch: 1, optimizer: {lr: 0.05}, schedule: {name: constant}}\n"
                    "log: {tensorboard: false}\n"
                    "sweep: {train.optimizer.lr: [0.1, 0.05]}\n")
    code, out, err = cli(["run", file, "--runs-dir", tmp_path / "runs"])
    assert code == 2 and "sweep" in err and "Traceback" not in out + err
    assert not (tmp_path / "runs" / "sw" / "metrics.jsonl").exists()
    code, out, err = cli(["run", file, "--runs-dir", tmp_path / "runs", "--set", "sweep=null"])
    assert code == 0, err
    assert (tmp_path / "runs" / "sw" / "summary.json").exists()


def test_run_out_takes_one_spec(tmp_path, cli, teacher_pt):
    file = tmp_path / "two.yaml"
    file.write_text(VALID + "---\n" + VALID.replace("name: valid", "name: valid2"))
    code, _, err = cli(["run", file, "--out", tmp_path / "x"])
    assert code == 2 and "--out" in err


def test_run_missing_spec_file(tmp_path, cli):
    code, out, err = cli(["run", tmp_path / "nope.yaml"])
    assert code == 2 and "nope.yaml" in err and "Traceback" not in out + err


# ------------------------------------------------------------------------------------------- schema
def test_schema_is_json_draft_2020_12(cli):
    code, out, _ = cli(["schema"])
    assert code == 0
    schema = json.loads(out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"name", "data", "student", "teacher", "loss", "train"} <= set(schema["properties"])
    import jsonschema
    jsonschema.Draft202012Validator.check_schema(schema)


# ------------------------------------------------------------------------------------------- layers
def test_layers_lists_pre_activation_taps_with_shapes(cli):
    code, out, _ = cli(["layers", "wrn-16-2"])
    assert code == 0
    line = next(l for l in out.splitlines() if l.split() and l.split()[0] == "block2.0.relu1:pre")
    assert line.split()[-1] == "32x32x32"
    assert "pre" in line.split()


def test_layers_json_and_filter(cli):
    code, out, _ = cli(["layers", "wrn-16-2", "--json", "--filter", "block2.0"])
    assert code == 0
    rows = json.loads(out)
    assert rows and all("block2.0" in r["name"] for r in rows)
    row = next(r for r in rows if r["name"] == "block2.0.relu1:pre")
    assert row["shape"] == [32, 32, 32] and row["kind"] == "pre"
    assert {"name", "op", "kind", "shape", "stage_pre"} == set(row)  # block2.0.relu1:pre ends WRN's first stage
    assert row["stage_pre"] == 0


def test_layers_torchvision_model_at_imagenet_size(cli):
    code, out, err = cli(["layers", "torchvision:resnet18", "--input-size", "3", "224", "224", "--json"])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["layer4"]["shape"] == [512, 7, 7] and rows["layer4"]["kind"] == "block"
    assert rows["fc"]["shape"] == [100]
    assert rows["layer1.0.relu:pre"]["shape"] == [64, 56, 56]


def test_layers_of_a_user_model_with_functional_inplace_relu(cli):
    code, out, err = cli(["layers", "tests.userpkg:Net", "--num-classes", "10"])
    assert code == 0, err
    names = {l.split()[0]: l.split()[-1] for l in out.splitlines() if l.split()}
    assert names["relu:pre"] == "8x32x32" and names["relu_1:pre"] == "16x16x16"
    assert names["fc"] == "10"


def test_layers_of_timm_and_hugging_face_models(cli, tmp_path):
    pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    code, out, err = cli(["layers", "timm:efficientnet_b0", "--json"])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["classifier"]["shape"] == [100] and rows["conv_stem"]["shape"] == [32, 16, 16]
    code, out, err = cli(["layers", "torchvision:convnext_tiny", "--input-size", "3", "64", "64", "--json"])
    assert code == 0, err
    assert {r["name"]: r for r in json.loads(out)}["features.1.0.mul"]["shape"] == [96, 16, 16]
    transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(tmp_path / "bert")
    model = f"hf:{tmp_path / 'bert'}"
    code, out, err = cli(["layers", model, "--input-size", "12", "--input-dtype", "long", "--json"])
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["bert.encoder.layer.0.output.dense"]["shape"] == [12, 16] and rows["classifier"]["shape"] == [100]
    code, out, err = cli(["layers", model, "--input-size", "12"])  # float inputs into an embedding
    assert code == 2 and "--input-dtype long" in err and "Traceback" not in out + err


def test_layers_unknown_model_suggests(cli):
    code, out, err = cli(["layers", "wrn-16-x"])
    assert code == 2
    assert "did you mean" in err and "wrn-16-2" in err and "Traceback" not in out + err
    code, out, err = cli(["layers", "torchvision:resnet181"])
    assert code == 2 and "resnet18" in err


# ------------------------------------------------------------------------------------------- models
def test_models_lists_parameter_counts(cli):
    code, out, _ = cli(["models"])
    assert code == 0
    line = next(l for l in out.splitlines() if l.split() and l.split()[0] == "wrn-16-2")
    expected = sum(p.numel() for p in build_model("wrn-16-2", num_classes=100).parameters())
    assert f"{expected:,}" in line
    code, out, _ = cli(["models", "--json"])
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["wrn-16-2"]["params"] == expected


def test_models_say_where_each_definition_comes_from(cli):
    code, out, _ = cli(["models"])
    lines = {l.split()[0]: l for l in out.splitlines() if l.split()}
    assert "812,836" in lines["mobilenetv2-0.5"] and "RepDistiller MobileNetV2 (mobile_half)" in lines["mobilenetv2-0.5"]
    assert "1,355,528" in lines["shufflev2-1.0"] and "1x1 stem" in lines["shufflev2-1.0"]
    assert "original Distillation project" in lines["shufflenetv2-orig-1.0"]


def test_layers_say_which_positions_auto_picks(cli):
    code, out, _ = cli(["layers", "vgg8"])
    assert code == 0
    auto = out[out.index("positions: auto picks"):]
    assert "the stages VGG declares (feature_info)" in auto
    rules = {l.split("  ")[1].strip(): l for l in auto.splitlines()[1:] if l.strip()}
    assert "block1, block2, block3, block4" in rules["stage outputs"] and "at" in rules["stage outputs"]
    assert "block1.2:pre, block2.2:pre, block3.2:pre, block4.2:pre" in rules["pre-activation stage ends"]
    assert "[sp]" in rules["last stage output"] and "block4" in rules["last stage output"]
    assert "flatten" in rules["embedding"] and "block2    [fitnet]" in rules["middle stage output"]
    code, out, _ = cli(["layers", "torchvision:resnet18", "--input-size", "3", "64", "64"])
    assert "positions: auto picks (the last value of each spatial size)" in out


# -------------------------------------------------------------------------------------- entry point
def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "kdgraph", "--help"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: kdgraph" in res.stdout
    for command in ("run", "validate", "schema", "layers", "models"):
        assert command in res.stdout


def test_tune_allocator_applies_on_glibc_and_respects_the_user(monkeypatch):
    import platform

    from kdgraph.allocator import tune_allocator

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    if platform.libc_ver()[0] == "glibc":
        assert tune_allocator() is True
    monkeypatch.setenv("KDGRAPH_MALLOC", "default")
    assert tune_allocator() is False
    monkeypatch.delenv("KDGRAPH_MALLOC")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_allocator() is False


def test_a_closed_pipe_is_not_an_error():
    """`kdgraph layers MODEL | head` ends quietly, without a BrokenPipeError traceback."""
    import subprocess

    p = subprocess.Popen([sys.executable, "-m", "kdgraph", "layers", "torchvision:densenet201", "--json",
                          "--input-size", "3", "64", "64"],  # 130 kB: more than a pipe buffer holds
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and p.returncode in (0, 141), err
