"""What the framework offers a term: spec keys every term takes (init_epochs, lr_scale), optimizer groups by
lr_scale, the pre-training stage's loss, parameters and modes, sample indices, the gather helper."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdgraph import Distiller
from kdgraph.data.digits import digits_split
from kdgraph.distiller import TermProblems
from kdgraph.distributed import gather_tensors
from kdgraph.losses import LOSSES, term_params
from kdgraph.models import build_model
from tests.conftest import tiny_spec, write_yaml


@pytest.fixture(scope="module")
def batch():
    x, y, *_ = digits_split(16)
    return x[:32], y[:32], torch.arange(32)


def _distiller(loss, student="tests.userpkg:Net"):
    torch.manual_seed(0)
    s = build_model(student, num_classes=10)
    t = build_model("wrn-10-1", num_classes=10)
    return Distiller(s, t, loss, input_shape=(3, 16, 16), log=lambda _: None)


def test_every_method_takes_init_epochs_and_lr_scale():
    staged = {"ft": 30, "fsp": 30, "ab": 30}  # methods with a pre-training stage (RepDistiller's 30 epochs)
    for name in LOSSES:
        params = term_params(LOSSES.get(name))
        assert params["init_epochs"] == staged.get(name, 0) and params["lr_scale"] == 1.0, name
    from tests.userpkg import InitHint
    assert term_params(InitHint)["init_epochs"] == 1  # a class default


def test_init_epochs_and_lr_scale_are_checked_and_set(batch):
    d = _distiller([{"method": "ce"}, {"method": "fitnet", "lr_scale": 10, "init_epochs": 2}])
    assert d.terms[1].lr_scale == 10.0 and d.terms[1].init_epochs == 2 and d.init_epochs == 2
    with pytest.raises(TermProblems) as e:
        _distiller([{"method": "kd", "init_epochs": 1.5}, {"method": "at", "lr_scale": 0}])
    paths = [p for p, _ in e.value.problems]
    assert ("loss", 0, "init_epochs") in paths and ("loss", 1, "lr_scale") in paths


def test_param_groups_scale_each_terms_own_parameters(batch):
    d = _distiller([{"method": "ce"}, {"method": "fitnet", "lr_scale": 10}])
    d.setup(batch[0])
    groups = d.param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in d.student.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in d.terms[1].parameters()}
    plain = _distiller([{"method": "ce"}, {"method": "fitnet"}])
    plain.setup(batch[0])
    (group,) = plain.param_groups()  # one group: an optimizer state of an older checkpoint still loads
    assert len(group["params"]) == len(plain.trainable_parameters())


def test_the_init_stage_trains_init_parameters_on_init_loss(batch):
    x, y, index = batch
    d = _distiller([{"method": "ce"}, {"method": "tests.userpkg:InitHint", "init_epochs": 2},
                    {"method": "tests.userpkg:InitHint", "train_student": True}])
    d.setup(x)
    assert d.init_epochs == 2
    assert d.init_active(-2.0) == [1] and d.init_active(-1.0) == [1, 2] and d.init_active(-0.5) == [1, 2]
    d.init_mode(-2.0)
    assert not d.student.training and d.terms.training and not d.teacher.training
    d.init_mode(-1.0)  # the second term trains the student's first conv: the student is in train mode
    assert d.student.training
    loss, parts, logits = d(x, y, -1.0, index, init=True)
    assert set(parts) == {"inithint", "inithint_1"} and not logits.requires_grad
    torch.testing.assert_close(loss, parts["inithint"] + parts["inithint_1"])
    groups = d.init_param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in list(d.terms[1].parameters()) + list(d.terms[2].parameters())
                       + list(d.student.conv1.parameters())}
    loss.backward()
    assert d.student.fc.weight.grad is None  # the classifier is not part of the stage
    # outside the stage: the weighted distillation loss of every term
    d.train()
    loss, parts, _ = d(x, y, 0.0, index)
    assert set(parts) == {"ce", "inithint", "inithint_1"}


def test_terms_see_sample_indices(batch):
    from tests.userpkg import IndexSpy

    x, y, index = batch
    IndexSpy.seen = []
    d = _distiller([{"method": "tests.userpkg:IndexSpy"}])
    d.setup(x)
    d(x, y, 0.0, index)
    d(x, y, 0.0)
    assert torch.equal(IndexSpy.seen[0], index) and IndexSpy.seen[1] is None


def test_gather_in_one_process_is_the_detached_tensors():
    a = torch.randn(3, 2, requires_grad=True)
    (g,) = gather_tensors(a)
    assert torch.equal(g, a) and not g.requires_grad


# --------------------------------------------------------------------------------------- through kdgraph run
def _rows(run_dir, stage=None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows
            if stage is None or r.get("stage", "distill") == stage]


def _init_spec(name: str, tmp_path, **extra_terms) -> Path:
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(1)
        torch.save(build_model("wrn-16-1", num_classes=10).state_dict(), teacher)
    loss = [{"method": "ce"}, {"method": "tests.userpkg:InitHint", "init_epochs": 2, "lr_scale": 3},
            {"method": "tests.userpkg:InitHint", "train_student": True}, *extra_terms.values()]
    return write_yaml(tmp_path / f"{name}.yaml", tiny_spec(
        name, teacher={"model": "wrn-16-1", "checkpoint": str(teacher)}, loss=loss,
        train={"epochs": 2, "max_steps_per_epoch": 4, "schedule": {"name": "constant"}},
        log={"tensorboard": True}))


def test_the_init_stage_runs_first_is_logged_and_trains_only_its_parameters(cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    file = _init_spec("init", tmp_path)
    code, out, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 0, err
    run = tmp_path / "init"
    rows = _rows(run)
    assert [(r.get("stage", "distill"), r["epoch"]) for r in rows] == [("init", -1), ("init", 0), ("distill", 1),
                                                                       ("distill", 2)]
    first, second = rows[0], rows[1]
    assert first["init_epoch"] == 1 and set(first) >= {"loss/inithint"} and "loss/inithint_1" not in first
    assert second["loss"] == pytest.approx(second["loss/inithint"] + second["loss/inithint_1"])
    assert "test_top1" not in first and "test_top1" in rows[2]
    assert "init epoch 1/2 (pre-training)" in out and "inithint pre-trains for 2 epoch(s)" in out
    from kdgraph.app.rundir import RunDir
    assert [r["epoch"] for r in RunDir(run).metrics()] == [1, 2]  # readers see the distillation epochs
    assert [r["init_epoch"] for r in RunDir(run).metrics("init")] == [1, 2]
    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("init/loss")] == [1, 2] and "test_top1" in events.Tags()["scalars"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init_epochs"] == 2 and summary["init_epochs_done"] == 2 and summary["epochs_done"] == 2
    # distillation's optimiser: the student at the spec's rate, the first hint's connector at 3x
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert [(g["lr"], g["lr_scale"]) for g in saved["optimizer"]["param_groups"]] == [(0.05, 1.0), (0.05 * 3, 3.0)]


def test_a_run_stopped_in_the_init_stage_resumes_it_bit_exactly(cli, tmp_path, monkeypatch):
    from tests.userpkg import SelfStop

    stop = {"method": "tests.userpkg:SelfStop", "at": -1.5, "init_epochs": 2}  # fires in init epoch 1
    monkeypatch.setattr(SelfStop, "fired", True)
    assert cli(["run", _init_spec("whole", tmp_path, stop=stop), "--runs-dir", tmp_path])[0] == 0
    monkeypatch.setattr(SelfStop, "fired", False)
    file = _init_spec("cut", tmp_path, stop=stop)
    assert cli(["run", file, "--runs-dir", tmp_path])[0] == 130
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["state"]["epoch"] == -2 and saved["state"]["step"] == 3
    assert len(saved["optimizer"]["param_groups"]) == 2  # the init stage's optimiser: student conv1 + hints
    code, out, err = cli(["run", file, "--runs-dir", tmp_path, "--resume"])
    assert code == 0, err
    assert "resuming" in out and "at init epoch 1, step 3" in out
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("whole", "cut"))
    for part in ("model", "terms"):
        for k, v in a[part].items():
            assert torch.equal(b[part][k], v), k


def test_the_readme_memory_bank_example_trains_and_resumes(cli, tmp_path, monkeypatch):
    """README "Add your own": the RunningTargets term, run by kdgraph run; its bank is saved in the checkpoint."""
    import re
    import sys
    import types

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class RunningTargets" in b)
    module = types.ModuleType("readme_bank")
    exec(compile(code, "README.md", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "readme_bank", module)
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("wrn-10-1", num_classes=10).state_dict(), teacher)
    file = write_yaml(tmp_path / "bank.yaml", tiny_spec(
        "bank", teacher={"model": "wrn-10-1", "checkpoint": str(teacher)},
        loss=[{"method": "ce"}, {"method": "readme_bank:RunningTargets"}], train={"epochs": 1}))
    code_, _, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code_ == 0, err
    bank = torch.load(tmp_path / "bank" / "checkpoints" / "last.pt", weights_only=True)["terms"]["1.bank"]
    assert bank.shape == (1437, 10) and (bank != 0.1).any(dim=1).sum() == 4 * 32  # the rows seen were updated
