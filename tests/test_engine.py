"""The training engine behind ``kdgraph run``: the run-dir contract, overwrite protection, kill/resume
exactness, NaN guard, teachers (checkpoint, state_dict, from_spec) and repeatability.

Everything trains tiny models on the offline ``digits`` data set on CPU, with one intra-op thread (several
threads on a loaded 2-core machine make small convolutions a hundred times slower).
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
from tests.conftest import tiny_spec as spec, write_yaml as write

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
ROW_KEYS = {"epoch", "lr", "loss", "loss/ce", "train_top1", "test_loss", "test_top1", "seconds"}
SUMMARY_KEYS = {"name", "status", "epochs", "epochs_done", "best_top1", "best_epoch", "final_top1", "teacher_top1",
                "teacher", "student", "methods", "student_params", "teacher_params", "wall_seconds", "device",
                "dataset"}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def weights(file: Path) -> dict:
    return torch.load(file, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def popen(args: list, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdgraph", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------------ contract
def test_plain_run_writes_the_contract_run_dir(tmp_path, cli, write_spec):
    file = write_spec("plain", log={"tensorboard": True, "every": 2})
    code, out, err = cli(["run", file, "--runs-dir", tmp_path / "runs"])
    assert code == 0, err
    run = tmp_path / "runs" / "plain"

    saved = yaml.safe_load((run / "spec.yaml").read_text())
    assert saved["name"] == "plain" and saved["train"]["epochs"] == 2
    assert saved["train"]["optimizer"]["momentum"] == 0.9  # resolved: defaults filled in
    assert [t["method"] for t in saved["loss"]] == ["ce"]

    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) == ROW_KEYS  # no test_top5 for 10 classes
        assert 0 <= r["train_top1"] <= 100 and 0 <= r["test_top1"] <= 100
        assert r["loss"] == pytest.approx(r["loss/ce"])
        assert r["seconds"] >= 0

    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["status"] == "finished"
    assert summary["name"] == "plain" and summary["dataset"] == "digits"
    assert summary["epochs"] == summary["epochs_done"] == 2
    assert summary["best_top1"] == max(r["test_top1"] for r in rows)
    assert summary["final_top1"] == rows[-1]["test_top1"]
    assert rows[summary["best_epoch"] - 1]["test_top1"] == summary["best_top1"]
    assert summary["student"] == "wrn-10-1" and summary["teacher"] is None and summary["teacher_top1"] is None
    assert summary["methods"] == ["ce"]
    assert summary["student_params"] == sum(p.numel() for p in build_model("wrn-10-1", 10).parameters())
    assert summary["teacher_params"] is None
    assert summary["device"] == "cpu"
    assert isinstance(summary["wall_seconds"], (int, float)) and summary["wall_seconds"] > 0

    for name in ("last.pt", "best.pt"):
        obj = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        model = build_model("wrn-10-1", num_classes=10)
        model.load_state_dict(obj["model"])
    assert list((run / "checkpoints").glob("*.tmp")) == []
    log = (run / "log.txt").read_text()
    assert "epoch 2/2" in log
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events under tb/"
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in steps] == [(2, 0.5), (4, 1.0), (6, 1.5), (8, 2.0)]  # log.every 2
    for epoch, row in enumerate(rows):  # windows of equal batches: their means average to the epoch's loss
        assert sum(r["loss"] for r in steps[2 * epoch:2 * epoch + 2]) / 2 == pytest.approx(row["loss"], rel=1e-6)
    assert (run / "wiring.svg").read_text().startswith("<svg")


def test_no_tensorboard_dir_when_disabled(tmp_path, cli, write_spec):
    file = write_spec("notb", train={"epochs": 1, "max_steps_per_epoch": 2})
    code, _, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 0, err
    assert not list((tmp_path / "notb").glob("tb/events*"))


def test_finished_run_is_not_overwritten_without_force(tmp_path, cli, write_spec):
    file = write_spec("once", train={"epochs": 1, "max_steps_per_epoch": 2})
    out_dir = tmp_path / "out"
    assert cli(["run", file, "--out", out_dir])[0] == 0
    before = (out_dir / "metrics.jsonl").read_text()
    code, out, err = cli(["run", file, "--out", out_dir])
    assert code == 2
    assert "--force" in err and "Traceback" not in err + out
    assert (out_dir / "metrics.jsonl").read_text() == before
    code, _, err = cli(["run", file, "--out", out_dir, "--force"])
    assert code == 0, err
    assert len(metrics(out_dir)) == 1  # started over, not appended
    assert json.loads((out_dir / "summary.json").read_text())["status"] == "finished"


# --------------------------------------------------------------------------------------- kill/resume
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, cli):
    # 3 epochs of 90 steps (batch 16): ~0.5 s an epoch on one thread, so the kill lands in epoch 2 or 3
    s = spec("kill", data={"batch_size": 16}, train={"epochs": 3, "max_steps_per_epoch": None})
    file = write(tmp_path / "kill.yaml", s)
    ref = tmp_path / "ref"
    assert cli(["run", file, "--out", ref])[0] == 0

    run = tmp_path / "killed"
    proc = popen(["run", file, "--out", run], tmp_path, tmp_path / "killed.log")
    # summary.json is rewritten last at an epoch's end (after metrics.jsonl and last.pt)
    wait_for(lambda: json.loads((run / "summary.json").read_text() if (run / "summary.json").exists() else "{}")
             .get("epochs_done", 0) >= 1, proc, "the first epoch's end")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    done = len(metrics(run))
    assert done < 3, "the run finished before it was killed; the test needs longer epochs"
    assert json.loads((run / "summary.json").read_text())["status"] == "running"

    code, _, err = cli(["run", file, "--out", run, "--resume"])
    assert code == 0, err
    assert without_seconds(metrics(run)) == without_seconds(metrics(ref))
    assert_same_weights(weights(run / "checkpoints" / "last.pt"), weights(ref / "checkpoints" / "last.pt"))
    assert_same_weights(weights(run / "checkpoints" / "best.pt"), weights(ref / "checkpoints" / "best.pt"))
    summary = json.loads((run / "summary.json").read_text())
    ref_summary = json.loads((ref / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_done"] == 3
    for k in ("best_top1", "best_epoch", "final_top1"):
        assert summary[k] == ref_summary[k], k


def test_sigterm_mid_epoch_stops_with_a_checkpoint_and_resumes_exactly(tmp_path, cli):
    # a full epoch (no max_steps_per_epoch) of 180 steps at batch 8; the stop lands early in epoch 1
    s = spec("term", data={"batch_size": 8}, train={"epochs": 2, "max_steps_per_epoch": None},
             log={"every": 10})
    file = write(tmp_path / "term.yaml", s)
    ref = tmp_path / "ref"
    assert cli(["run", file, "--out", ref])[0] == 0

    run = tmp_path / "term"
    proc = popen(["run", file, "--out", run], tmp_path, tmp_path / "term.log")
    log = run / "log.txt"
    wait_for(lambda: log.exists() and "epoch 1 step 20/" in log.read_text(), proc, "step 20 of epoch 1")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130, (tmp_path / "term.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped"
    saved = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] == 0 and saved["state"]["step"] > 0, "expected a mid-epoch checkpoint"
    assert "--resume" in log.read_text()

    code, _, err = cli(["run", file, "--out", run, "--resume"])
    assert code == 0, err
    assert without_seconds(metrics(run)) == without_seconds(metrics(ref))
    assert_same_weights(weights(run / "checkpoints" / "last.pt"), weights(ref / "checkpoints" / "last.pt"))
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    # the per-step loss too: the rows written before the stop, and those after it (their window was saved)
    assert (run / "steps.jsonl").read_text() == (ref / "steps.jsonl").read_text()


def test_stopped_run_is_not_restarted_without_resume_or_force(tmp_path, cli, write_spec):
    run = tmp_path / "r"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"name": "r", "status": "stopped"}))
    file = write_spec("r")
    code, _, err = cli(["run", file, "--out", run])
    assert code == 2 and "--resume" in err and "--force" in err


# ------------------------------------------------------------------------------------------------ NaN
def test_nan_loss_stops_with_a_clear_message(tmp_path, cli, write_spec):
    file = write_spec("nan", train={"optimizer": {"lr": 1.0e6}, "max_steps_per_epoch": 10})
    code, out, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 2
    assert "Traceback" not in out + err
    assert "loss became nan" in err or "loss became inf" in err
    assert "epoch 1" in err and "train.optimizer.lr" in err
    # it blew up in epoch 1: there is no good checkpoint to point at, and the message must not claim one
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()
    assert "no checkpoint was written yet" in err
    summary = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "loss became" in summary["error"]


def test_nan_after_a_good_epoch_names_the_existing_checkpoint(tmp_path, cli, write_spec):
    file = write_spec("nan2", loss=[{"method": "ce"}, {"method": "tests.userpkg:NaNLater"}])
    code, _, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 2
    last = tmp_path / "nan2" / "checkpoints" / "last.pt"
    assert f"the last good checkpoint is {last}" in err and "at epoch 2" in err
    assert torch.load(last, weights_only=True)["state"]["epoch"] == 1  # the good epoch-1 checkpoint
    assert json.loads((tmp_path / "nan2" / "summary.json").read_text())["status"] == "failed"
    assert len(metrics(tmp_path / "nan2")) == 1


# -------------------------------------------------------------------------------------------- teacher
def kd_spec(name: str, teacher: dict, **over) -> dict:
    over.setdefault("loss", [{"method": "ce", "weight": 0.1}, {"method": "kd"}])
    return spec(name, teacher={"model": "wrn-16-1", **teacher}, **over)


def test_teacher_checkpoint_missing_file(tmp_path, cli):
    missing = tmp_path / "nowhere" / "teacher.pt"
    file = write(tmp_path / "s.yaml", kd_spec("k", {"checkpoint": str(missing)}))
    code, out, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 2
    assert str(missing) in err and "Traceback" not in out + err


def test_teacher_checkpoint_of_another_architecture(tmp_path, cli, teacher_ckpt):
    file = write(tmp_path / "s.yaml", spec("k", teacher={"model": "wrn-10-1", "checkpoint": str(teacher_ckpt)},
                                           loss=[{"method": "ce"}, {"method": "kd"}]))
    code, out, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 2, err
    assert str(teacher_ckpt) in err and "Traceback" not in out + err
    assert "unexpected keys" in err and "block1.1." in err  # wrn-16 has 2 blocks a stage, wrn-10 one


def test_plain_state_dict_as_teacher_and_teacher_top1(tmp_path, cli, teacher_ckpt):
    teacher = build_model("wrn-16-1", num_classes=10)
    teacher.load_state_dict(weights(teacher_ckpt))
    plain = tmp_path / "plain_state.pt"
    torch.save(teacher.state_dict(), plain)
    file = write(tmp_path / "s.yaml", kd_spec("k", {"checkpoint": str(plain)}))
    code, out, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 0, err
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert summary["teacher"] == "wrn-16-1" and summary["methods"] == ["ce", "kd"]
    assert summary["teacher_params"] == sum(p.numel() for p in teacher.parameters())
    t_sum = json.loads((teacher_ckpt.parents[1] / "summary.json").read_text())
    assert summary["teacher_top1"] == pytest.approx(t_sum["best_top1"])  # same weights, same test set
    rows = metrics(tmp_path / "k")
    assert {"loss/ce", "loss/kd"} <= set(rows[0])
    assert "| k | wrn-10-1 | wrn-16-1 |" in out  # the summary table of a distillation


def test_a_repdistiller_teacher_file_loads_and_the_log_names_its_layout(tmp_path, cli, teacher_ckpt):
    """RepDistiller/mdistiller save ``{"model": state_dict, "epoch", "accuracy", "optimizer"}`` with their WRN
    key names (``blockN.layer.I``, ``convShortcut``): the same teacher, the same teacher top-1."""
    import re

    theirs = {re.sub(r"^block(\d)\.(\d+)\.", r"block\1.layer.\2.", k).replace(".shortcut.", ".convShortcut."): v
              for k, v in weights(teacher_ckpt).items()}
    file = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": theirs, "epoch": 240, "accuracy": 60.0, "optimizer": {"state": {}}}, file)
    code, out, err = cli(["run", write(tmp_path / "s.yaml", kd_spec("rd", {"checkpoint": str(file)})),
                          "--runs-dir", tmp_path])
    assert code == 0, err
    assert "keys mapped from the RepDistiller/mdistiller/Heo et al./Distillation WRN" in \
        (tmp_path / "rd" / "log.txt").read_text()
    t_sum = json.loads((teacher_ckpt.parents[1] / "summary.json").read_text())
    assert json.loads((tmp_path / "rd" / "summary.json").read_text())["teacher_top1"] == \
        pytest.approx(t_sum["best_top1"])


def test_from_spec_trains_the_teacher_first_then_reuses_it(tmp_path, cli):
    teacher = spec("tq", student={"model": "wrn-16-1"}, train={"epochs": 1, "max_steps_per_epoch": 3})
    student = kd_spec("sq", {"from_spec": "#tq"}, train={"epochs": 1, "max_steps_per_epoch": 2})
    write(tmp_path / "q.yaml", teacher, student)
    only = write(tmp_path / "sq.yaml", kd_spec("sq", {"from_spec": "q.yaml#tq"},
                                              train={"epochs": 1, "max_steps_per_epoch": 2}))
    runs = tmp_path / "runs"

    # the student alone: its teacher spec (a document of another file) is trained first
    code, out, err = cli(["run", only, "--runs-dir", runs])
    assert code == 0, err
    assert "training tq first" in out
    t_summary = json.loads((runs / "tq" / "summary.json").read_text())
    assert t_summary["status"] == "finished" and t_summary["student"] == "wrn-16-1"
    best = runs / "tq" / "checkpoints" / "best.pt"
    stamp = best.stat().st_mtime_ns
    first = json.loads((runs / "sq" / "summary.json").read_text())
    assert first["status"] == "finished" and first["teacher"] == "wrn-16-1"
    assert first["teacher_top1"] == pytest.approx(t_summary["best_top1"])  # the teacher's best.pt is used
    saved = yaml.safe_load((runs / "sq" / "spec.yaml").read_text())["teacher"]["from_spec"]
    assert Path(saved.partition("#")[0]) == (tmp_path / "q.yaml").resolve() and saved.endswith("#tq")

    # again: the finished teacher run is reused, not retrained
    code, out, err = cli(["run", only, "--runs-dir", runs, "--force"])
    assert code == 0, err
    assert "training tq first" not in out
    assert best.stat().st_mtime_ns == stamp, "the teacher was retrained"
    second = json.loads((runs / "sq" / "summary.json").read_text())
    assert second["teacher_top1"] == first["teacher_top1"]
    assert second["best_top1"] == first["best_top1"]  # same student spec, same teacher weights

    # a --set of data/train keys also applies to the teacher, which then trains into its own run dir
    code, out, err = cli(["run", only, "--runs-dir", runs, "--force", "--set", "train.max_steps_per_epoch=1"])
    assert code == 0, err
    assert best.stat().st_mtime_ns == stamp
    (smoke,) = [d for d in runs.iterdir() if d.name.startswith("tq-")]
    assert metrics(smoke)[0]["epoch"] == 1 and (smoke / "checkpoints" / "best.pt").exists()

    # both documents of one file, in order: the teacher, then the student referring to it by '#tq'
    code, out, err = cli(["run", tmp_path / "q.yaml", "--runs-dir", tmp_path / "runs2"])
    assert code == 0, err
    both = {n: json.loads((tmp_path / "runs2" / n / "summary.json").read_text()) for n in ("tq", "sq")}
    assert both["sq"]["teacher_top1"] == pytest.approx(both["tq"]["best_top1"])
    assert "| tq |" in out and "| sq |" in out  # the summary table of several runs


def test_a_from_spec_teacher_follows_the_students_data_set(tmp_path, cli):
    """A spec whose data differs from its teacher spec's (here digits resized to 12) trains a teacher on it."""
    write(tmp_path / "t.yaml", spec("tq", student={"model": "wrn-16-1"}, train={"epochs": 1, "max_steps_per_epoch": 2}))
    student = kd_spec("sq", {"from_spec": "t.yaml"}, data={"options": {"size": 12}},
                      train={"epochs": 1, "max_steps_per_epoch": 2})
    file = write(tmp_path / "s.yaml", student)
    runs = tmp_path / "runs"
    code, out, err = cli(["run", file, "--runs-dir", runs])
    assert code == 0, err
    (teacher_dir,) = [d for d in runs.iterdir() if d.name.startswith("tq-")]
    saved = yaml.safe_load((teacher_dir / "spec.yaml").read_text())
    assert saved["data"]["options"] == {"size": 12} and saved["train"]["max_steps_per_epoch"] == 2
    assert not (runs / "tq").exists()  # the real teacher's run dir is never used for another data set


# ---------------------------------------------------------------------------------------- repeatability
def test_same_spec_twice_gives_identical_metrics(tmp_path, cli, teacher_ckpt):
    file = write(tmp_path / "s.yaml", kd_spec("rep", {"checkpoint": str(teacher_ckpt)},
                                              loss=[{"method": "ce", "weight": 0.1}, {"method": "kd"},
                                                    {"method": "at"}]))
    assert cli(["run", file, "--out", tmp_path / "a"])[0] == 0
    assert cli(["run", file, "--out", tmp_path / "b"])[0] == 0
    assert without_seconds(metrics(tmp_path / "a")) == without_seconds(metrics(tmp_path / "b"))
    assert_same_weights(weights(tmp_path / "a" / "checkpoints" / "last.pt"),
                        weights(tmp_path / "b" / "checkpoints" / "last.pt"))


def test_minimal_spec_gets_optimizer_and_schedule_defaults(tmp_path, cli):
    # no train.optimizer / train.schedule: the schema's defaults (sgd, multistep) must apply
    file = write(tmp_path / "min.yaml", {"name": "min", "data": {"dataset": "digits", "workers": 0},
                                         "student": {"model": "wrn-10-1"},
                                         "train": {"epochs": 1, "max_steps_per_epoch": 2},
                                         "log": {"tensorboard": False}})
    code, out, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "min" / "spec.yaml").read_text())
    assert saved["train"]["optimizer"]["name"] == "sgd" and saved["train"]["schedule"]["name"] == "multistep"


def test_stop_message_names_the_runs_dir_and_its_command_resumes(tmp_path, cli, monkeypatch):
    # a term sends SIGTERM to this very process in the middle of epoch 1 (in-process: no start-up cost)
    from tests.userpkg import SelfStop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SelfStop, "fired", False)
    s = spec("selfstop", loss=[{"method": "ce"}, {"method": "tests.userpkg:SelfStop", "at": 0.5}],
             train={"max_steps_per_epoch": 6, "schedule": {"name": "constant"}})
    write(tmp_path / "selfstop.yaml", s)
    code, out, err = cli(["run", "selfstop.yaml", "--runs-dir", "elsewhere", "--set", "log.every=3"])
    assert code == 130
    run = tmp_path / "elsewhere" / "selfstop"
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped"
    # the signal arrives during step 4 (progress 3/6); that step completes, then the checkpoint is written
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 4
    line = next(l for l in out.splitlines() if "resume with:" in l)
    command = line.split("resume with: kdgraph ", 1)[1].split()
    assert command == ["run", "selfstop.yaml", "--set", "log.every=3", "--resume", "--runs-dir", "elsewhere"]
    code, out, err = cli(command)  # the printed command continues this run, not a new one in runs/
    assert code == 0, err
    assert not (tmp_path / "runs").exists()
    assert [r["epoch"] for r in metrics(run)] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_resume_after_a_kill_between_metrics_row_and_checkpoint_does_not_repeat_the_row(tmp_path, cli):
    # A SIGKILL at an epoch's end after metrics.jsonl got the row but before last.pt was replaced leaves
    # N rows and an epoch N-1 checkpoint. Built here from two runs of a constant-lr spec: the state after
    # epoch 1 of a 1-epoch run is the state after epoch 1 of the 2-epoch run (same seed and data order).
    s = spec("window", train={"epochs": 2, "schedule": {"name": "constant"}})
    file = write(tmp_path / "window.yaml", s)
    assert cli(["run", file, "--out", tmp_path / "ref"])[0] == 0
    run = tmp_path / "crashed"
    assert cli(["run", file, "--out", run, "--set", "train.epochs=1"])[0] == 0
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    with open(run / "metrics.jsonl", "a") as f:  # the epoch-2 row was written, then the process died
        f.write(ref_rows[1] + "\n")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running", "epochs": 2}))

    code, _, err = cli(["run", file, "--out", run, "--resume"])
    assert code == 0, err
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2], "a resumed epoch's metrics row was appended twice"
    assert without_seconds(rows) == without_seconds(metrics(tmp_path / "ref"))


# ------------------------------------------------------------------------------ resume, another process count
def test_a_checkpoint_of_two_ranks_resumes_on_one_two_or_three():
    from kdgraph.app.engine import rank_share

    sums = [{"loss": 3.0, "correct": 5, "seen": 8, "ce": 3.0}, {"loss": 1.0, "correct": 2, "seen": 8, "ce": 1.0}]
    ranks = [{"rng": {"rank": 0}, "sums": sums[0]}, {"rng": {"rank": 1}, "sums": sums[1]}]
    state = {"epoch": 3, "step": 5, "sums": sums[0]}  # the checkpoint's state is rank 0's
    # as many processes as wrote it: each continues its own streams and sums
    assert [rank_share(ranks, state, r, 2, seed=7) for r in range(2)] == [(ranks[r]["rng"], sums[r]) for r in range(2)]
    for world in (1, 3):
        shares = [rank_share(ranks, state, r, world, seed=7) for r in range(world)]
        # the epoch's totals are unchanged: rank 0 carries every writer's sums, the others start at zero
        assert {k: sum(s[k] for _, s in shares) for k in sums[0]} == {"loss": 4.0, "correct": 7, "seen": 16, "ce": 4.0}
        assert all(v == 0 for _, s in shares[1:] for v in s.values())
        # ranks the checkpoint had keep their random streams; a new rank gets a seed of (seed, rank, position)
        assert [rng for rng, _ in shares[:2]] == [ranks[r]["rng"] for r in range(min(world, 2))]
        if world == 3:
            assert shares[2][0] == 7 + 1000003 * 2 + 7919 * 3 + 5
    # at an epoch's end there are no partial sums to share
    assert rank_share(ranks, {**state, "sums": None}, 0, 1, seed=7) == ({"rank": 0}, None)
