"""Distributed training through torchrun: two CPU processes with gloo.

A student without BatchNorm, no augmentation and a global batch split evenly over two ranks: each step
sees exactly the samples of the single-process step and DDP averages the two halves' gradients, so the
two-process run must reproduce the single-process metrics up to float summation order. Also: only rank 0
writes, a SIGTERM stops every rank at the same step with a checkpoint, and ``--resume`` continues exactly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdgraph.models import build_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def _spec(tmp: Path, name: str, epochs: int = 2, steps: int = 6, loss: list | None = None) -> Path:
    teacher = tmp / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(1)
        torch.save(build_model("wrn-10-1", num_classes=10).state_dict(), teacher)
    doc = {"name": name,
           "data": {"dataset": "digits", "workers": 0, "batch_size": 32, "test_batch_size": 128, "augment": False},
           "teacher": {"model": "wrn-10-1", "checkpoint": str(teacher)},
           "student": {"model": "tests.userpkg:PlainNet"},
           "loss": loss or [{"method": "ce", "weight": 0.5}, {"method": "kd", "weight": 0.5}],
           "train": {"epochs": epochs, "max_steps_per_epoch": steps, "device": "cpu",
                     "optimizer": {"lr": 0.1}, "schedule": {"name": "cosine"}},
           "log": {"tensorboard": False, "every": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _kdgraph(*args, nproc: int | None = None, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kdgraph", "run", *map(str, args)] + (["--nproc", str(nproc)] if nproc else [])
    return subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict], terms=("ce", "kd")) -> None:
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", *(f"loss/{t}" for t in terms), "train_top1", "test_loss", "test_top1"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-4), (key, ra, rb)


def test_two_gloo_processes_match_one_process(tmp_path):
    spec = _spec(tmp_path, "ddp")
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = _kdgraph(spec, "--out", one)
    out1 = p1.communicate(timeout=300)[0]
    assert p1.returncode == 0, out1
    p2 = _kdgraph(spec, "--out", two, nproc=2)
    out2 = p2.communicate(timeout=300)[0]
    assert p2.returncode == 0, out2

    _close(_rows(one), _rows(two))
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["status"] == "finished" and s2["device"] == "cpu x2"
    assert s2["best_top1"] == pytest.approx(s1["best_top1"], abs=1e-6)
    assert s2["teacher_top1"] == pytest.approx(s1["teacher_top1"], abs=1e-6)  # every test sample counted once
    # rank 0 alone writes: one line per epoch, one log header, the same checkpoint contents
    log = (two / "log.txt").read_text()
    assert log.count("x2 processes") == 1, log
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert len(b["ranks"]) == 2 and len(a["ranks"]) == 1
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)


def test_sigterm_stops_every_rank_and_resume_is_exact(tmp_path):
    spec = _spec(tmp_path, "ddp_stop", epochs=2, steps=40)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = _kdgraph(spec, "--out", whole, nproc=2)
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0, out

    p = _kdgraph(spec, "--out", cut, nproc=2)
    log = cut / "log.txt"
    deadline = time.time() + 300
    while time.time() < deadline and "epoch 1 step 5/" not in (log.read_text() if log.exists() else ""):
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGTERM)  # what the UI and schedulers do: the whole process group
    out = p.communicate(timeout=120)[0]
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "stopped", out
    state = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert state["epoch"] == 0 and 5 <= state["step"] < 40

    p = _kdgraph(spec, "--out", cut, "--resume", nproc=2)
    out = p.communicate(timeout=400)[0]
    assert p.returncode == 0, out
    assert json.loads((cut / "summary.json").read_text())["status"] == "finished"
    _close(_rows(whole), _rows(cut))


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    """Without agreement the finite ranks would wait forever in DDP's all-reduce for the one that raised."""
    doc = yaml.safe_load(_spec(tmp_path, "ddp_nan", epochs=1, steps=8).read_text())
    doc["loss"] = [{"method": "tests.userpkg:NaNOnRank1"}]
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(doc))
    p = _kdgraph(path, "--out", tmp_path / "nan", nproc=2)
    out = p.communicate(timeout=300)[0]
    assert p.returncode != 0
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed" and "non-finite on another process" in summary["error"], out


def test_crd_on_two_gloo_processes_matches_one_process(tmp_path):
    """CRD's memory banks under DDP: each rank gathers the whole batch's indices and embeddings, draws the same
    negatives (keyed by sample, not by rank) and applies the same update, so two processes reproduce one
    process's losses and banks. ``CheckedCRD`` fails the run if the ranks' banks ever differ."""
    loss = [{"method": "ce"}, {"method": "tests.userpkg:CheckedCRD", "negatives": 256}]
    spec = _spec(tmp_path, "crd", epochs=2, steps=4, loss=loss)
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, None), (two, 2)):
        p = _kdgraph(spec, "--out", out, nproc=nproc)
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log
    _close(_rows(one), _rows(two), terms=("ce", "checkedcrd"))
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)["terms"]
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)["terms"]
    assert a["1._extra_state"]["draws"] == b["1._extra_state"]["draws"] == 8
    assert a["1._extra_state"]["z"] == pytest.approx(b["1._extra_state"]["z"], rel=1e-5)
    for k in ("1.student_bank", "1.teacher_bank", "1.embed_student.weight", "1.embed_teacher.weight"):
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_two_ranks_keep_the_labels_one_process_keeps(tmp_path):
    """``data.labels`` under DDP: the ranks hide the labels one process hides. With a teacher-only loss the two
    runs are the same computation, so the labelled samples counted (summed over the ranks) and the train
    top-1 over them must agree exactly -- they would not if the ranks drew their subsets differently."""
    doc = yaml.safe_load(_spec(tmp_path, "ddp_labels", epochs=1, steps=8, loss=[{"method": "kd"}]).read_text())
    doc["data"]["labels"] = {"fraction": 0.3}
    spec = tmp_path / "labels.yaml"
    spec.write_text(yaml.safe_dump(doc))
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, None), (two, 2)):
        p = _kdgraph(spec, "--out", out, nproc=nproc)
        log = p.communicate(timeout=300)[0]
        assert p.returncode == 0, log
    _close(_rows(one), _rows(two), terms=("kd",))
    (a,), (b,) = _rows(one), _rows(two)
    assert a["labelled"] == b["labelled"] and 60 < a["labelled"] < 100  # ~30 % of 8 steps of 32
