"""``kdgraph export``: the student alone, in each format, checked against its checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from kdgraph.app import export as export_mod
from kdgraph.app.rundir import RunDir
from kdgraph.errors import UserError
from kdgraph.models import build_model
from tests.conftest import tiny_spec, write_yaml


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, teacher_ckpt):
    """A distillation run with a connector (fitnet's 1x1 conv + BN), one epoch of two steps."""
    from kdgraph.app.cli import main

    root = tmp_path_factory.mktemp("export")
    spec = tiny_spec("distilled", teacher={"model": "wrn-16-1", "checkpoint": str(teacher_ckpt)},
                     loss=[{"method": "ce"}, {"method": "fitnet"}], train={"epochs": 1, "max_steps_per_epoch": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(write_yaml(root / "d.yaml", spec)), "--runs-dir", str(root)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "distilled"


def test_state_dict_is_the_student_alone(run_dir, cli):
    code, out, err = cli(["export", run_dir])
    assert code == 0, err
    assert "outputs match the checkpoint's" in out
    saved = torch.load(run_dir / "export" / "student.pt", map_location="cpu", weights_only=True)
    student = build_model("wrn-10-1", num_classes=10)
    assert saved.keys() == student.state_dict().keys()  # no teacher, no connector
    assert any(k.startswith("terms.") or "align" in k for k in
               torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["terms"])  # they were there
    student.load_state_dict(saved)
    record = json.loads((run_dir / "export" / "export.json").read_text())["state_dict"]
    assert record["max_abs_diff"] == 0.0 and record["same_top1"] == 1.0 and record["checkpoint"].endswith("best.pt")


@pytest.mark.parametrize("fmt", ["torchscript", "exported", "onnx"])
def test_each_format_loads_back_and_matches(run_dir, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="ONNX export needs onnx and onnxscript: pip install 'kdgraph[export]'")
        pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript: pip install 'kdgraph[export]'")
    record = export_mod.export(run_dir, fmt, "last", batch=4, echo=lambda _: None)
    assert record["max_abs_diff"] <= record["tolerance"] and record["same_top1"] == 1.0
    assert record["file"].endswith(export_mod.FORMATS[fmt])
    assert sorted(p.name for p in (run_dir / "export").iterdir() if "tmp" in p.name or p.suffix == ".data") == []
    records = json.loads((run_dir / "export" / "export.json").read_text())
    assert records[fmt]["checkpoint"].endswith("last.pt")


def test_a_mismatch_is_an_error_and_a_run_without_checkpoint_says_so(run_dir, tmp_path, monkeypatch, cli):
    def off_by_one(student, x, file):
        file.write_bytes(b"")
        return student(x) + 1.0, "a broken writer"

    monkeypatch.setitem(export_mod.WRITERS, "state_dict", off_by_one)
    with pytest.raises(UserError, match="do not deploy"):
        export_mod.export(run_dir, "state_dict", echo=lambda _: None)
    young = tmp_path / "young"
    RunDir(young).create({"name": "young", "data": {"dataset": "digits"}, "student": {"model": "wrn-10-1"}})
    code, _, err = cli(["export", young])
    assert code == 2 and "no best checkpoint" in err and "Traceback" not in err
    code, _, err = cli(["export", tmp_path])
    assert code == 2 and "not a run directory" in err
