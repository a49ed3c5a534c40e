"""Nothing lost, nothing clobbered: the run directory's marker and writer lock, the order of its writes,
NaN, a full disk and damaged files (issue: safe specs and nothing lost).

Fault injection: ``KDGRAPH_CRASH_AT=FILE:PHASE[@N]`` makes a run SIGKILL itself when it writes FILE
(:func:`kdgraph.files.crash_point`); a small ``RLIMIT_FSIZE`` in a child process stands for a full disk.
One class per group; every probe ends in a clear message (exit 2) or in exactly the files an
uninterrupted run writes.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdgraph.app.cli import main
from kdgraph.app.launch import ENTRY, engine_command
from kdgraph.app.rundir import RunDir
from tests.conftest import tiny_spec, write_yaml

REPO = Path(__file__).resolve().parent.parent
# the children import tests.userpkg (a user's own terms): the repository on their path, as a user's package is
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
ENV.pop("KDGRAPH_CRASH_AT", None)


def kdgraph(args, cwd: Path, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``kdgraph ARGS`` in a child process (the installed entry, one torch thread)."""
    return subprocess.run([*engine_command(), *map(str, args)], cwd=cwd, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600, **kw)


def spec_file(tmp_path: Path, name: str = "r", **over) -> Path:
    """3 epochs of 2 steps (batch 64) on digits: a run of a few seconds whose best epoch moves."""
    over = {"data": {"batch_size": 64}, "train": {"epochs": 3, "max_steps_per_epoch": 2,
                                                  "schedule": {"name": "constant"}}, **over}
    return write_yaml(tmp_path / f"{name}.yaml", tiny_spec(name, **over))


def same(a, b, path="") -> None:
    """``a`` and ``b`` equal exactly (tensors bit for bit); ``seconds`` (wall time) is not compared."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        keys = set(a) - {"seconds", "wall_seconds", "started"}
        assert keys == set(b) - {"seconds", "wall_seconds", "started"}, path
        for k in keys:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}.{i}")
    else:
        assert a == b, (path, a, b)


def same_run(run: Path, ref: Path) -> None:
    """The files a resumed run ends with equal an uninterrupted run's: metrics, summary, both checkpoints."""
    for name in ("last", "best"):
        same(torch.load(RunDir(run).checkpoint(name), weights_only=True),
             torch.load(RunDir(ref).checkpoint(name), weights_only=True), name)
    same(RunDir(run).rows(), RunDir(ref).rows(), "metrics")
    keys = ("status", "epochs_done", "best_top1", "best_epoch", "final_top1", "teacher_top1")
    assert {k: RunDir(run).summary().get(k) for k in keys} == {k: RunDir(ref).summary().get(k) for k in keys}
    assert not [p for p in run.rglob("*.tmp")], "stale temporary files"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """``(spec file, run directory)`` of the uninterrupted run the interrupted ones are compared with."""
    root = tmp_path_factory.mktemp("reference")
    file = spec_file(root)
    done = kdgraph(["run", file, "--out", root / "ref"], root)
    assert done.returncode == 0, done.stderr
    return file, root / "ref"


# ------------------------------------------------------------------------------------------- the marker
class TestMarker:
    def test_out_into_a_folder_kdgraph_did_not_create(self, tmp_path, cli, write_spec):
        folder = tmp_path / "mine"
        folder.mkdir()
        (folder / "thesis.tex").write_text("years of work")
        (folder / "summary.json").write_text("{}")  # even with a file of a run's name
        for extra in ([], ["--force"], ["--resume"]):
            code, _, err = cli(["run", write_spec("x"), "--out", folder, *extra])
            assert code == 2 and "kdgraph did not create it" in err or "older kdgraph" in err, err
        assert sorted(p.name for p in folder.iterdir()) == ["summary.json", "thesis.tex"]
        assert (folder / "thesis.tex").read_text() == "years of work"

    def test_out_onto_a_file(self, tmp_path, cli, write_spec):
        (tmp_path / "f").write_text("x")
        code, _, err = cli(["run", write_spec("x"), "--out", tmp_path / "f", "--force"])
        assert code == 2 and "is a file" in err and (tmp_path / "f").read_text() == "x"

    def test_an_empty_folder_is_taken_and_marked(self, tmp_path, cli, write_spec):
        (tmp_path / "empty").mkdir()
        code, _, err = cli(["run", write_spec("x", train={"epochs": 1, "max_steps_per_epoch": 1}),
                            "--out", tmp_path / "empty"])
        assert code == 0, err
        assert RunDir(tmp_path / "empty").is_marked()

    def test_force_deletes_only_inside_a_marked_directory_never_through_a_link(self, tmp_path, cli, write_spec):
        file = write_spec("x", train={"epochs": 1, "max_steps_per_epoch": 1})
        run = tmp_path / "run"
        assert cli(["run", file, "--out", run])[0] == 0
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "keep.txt").write_text("keep")
        (run / "link").symlink_to(outside)  # a link inside the run: unlinked, not followed
        link = tmp_path / "run-link"
        link.symlink_to(run)
        code, _, err = cli(["run", file, "--out", link, "--force"])
        assert code == 2 and "symbolic link" in err and (run / "checkpoints" / "last.pt").exists()
        code, _, err = cli(["run", file, "--out", run, "--force"])
        assert code == 0, err
        assert (outside / "keep.txt").read_text() == "keep" and not (run / "link").exists()

    def test_protection_does_not_depend_on_a_readable_summary(self, tmp_path, cli, write_spec):
        file = write_spec("x", train={"epochs": 2, "max_steps_per_epoch": 1})
        run = tmp_path / "run"
        assert cli(["run", file, "--out", run])[0] == 0
        last = (run / "checkpoints" / "last.pt").read_bytes()
        for damage in ("garbage{", None):
            if damage is None:
                (run / "summary.json").unlink()
            else:
                (run / "summary.json").write_text(damage)
            code, _, err = cli(["run", file, "--out", run])
            assert code == 2 and "already holds a run" in err and "--force" in err, err
            assert (run / "checkpoints" / "last.pt").read_bytes() == last
        code, _, err = cli(["run", file, "--out", run, "--resume"])  # finished: nothing to redo, summary remade
        assert code == 0, err
        assert RunDir(run).summary()["status"] == "finished" and RunDir(run).summary()["epochs_done"] == 2

    def test_a_run_of_an_older_kdgraph_is_adopted_by_resume(self, tmp_path, cli, write_spec):
        file = write_spec("x", train={"epochs": 2, "max_steps_per_epoch": 1})
        run = tmp_path / "run"
        assert cli(["run", file, "--out", run, "--set", "train.epochs=1"])[0] == 0
        (run / RunDir.MARKER).unlink()
        code, _, err = cli(["run", file, "--out", run, "--force"])
        assert code == 2 and "--resume continues it" in err
        code, _, err = cli(["run", file, "--out", run, "--resume"])
        assert code == 0, err
        assert RunDir(run).is_marked() and RunDir(run).summary()["epochs_done"] == 2

    def test_a_sweep_directory_is_not_a_run(self, tmp_path, cli, write_spec):
        sweep_dir = tmp_path / "x"
        RunDir(sweep_dir).ensure()
        (sweep_dir / RunDir.SWEEP).write_text("{}")
        code, _, err = cli(["run", write_spec("x"), "--out", sweep_dir, "--force"])
        assert code == 2 and "sweep" in err and (sweep_dir / RunDir.SWEEP).exists()


# --------------------------------------------------------------------------------------------- the lock
HOLD = """
import sys, time
from kdgraph.app.rundir import RunDir
with RunDir(sys.argv[1]).writing():
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holding(path: Path, seconds: float = 120.0) -> subprocess.Popen:
    """A process holding ``path``'s writer lock (until killed, or ``seconds``)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


class TestLock:
    @pytest.mark.parametrize("extra", [["--resume"], ["--force"], []])
    def test_a_second_writer_is_refused_with_the_holders_pid(self, tmp_path, cli, write_spec, extra):
        run = tmp_path / "run"
        holder = holding(run)
        try:
            code, _, err = cli(["run", write_spec("x"), "--out", run, *extra])
            assert code == 2 and f"process {holder.pid}" in err and "one process writes a run at a time" in err
            assert RunDir(run).holder()["pid"] == holder.pid
        finally:
            holder.kill()
            holder.wait()
        assert RunDir(run).holder() is None  # the kernel released it with the process

    def test_two_real_runs_of_one_directory(self, tmp_path):
        file = spec_file(tmp_path, train={"epochs": 50, "max_steps_per_epoch": 4})
        first = subprocess.Popen([*engine_command(), "run", str(file), "--out", str(tmp_path / "run")], cwd=tmp_path,
                                 env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.time() + 300
            while RunDir(tmp_path / "run").holder() is None and first.poll() is None and time.time() < end:
                time.sleep(0.05)
            second = kdgraph(["run", file, "--out", tmp_path / "run", "--resume"], tmp_path)
            assert second.returncode == 2 and f"process {first.pid}" in second.stderr, second.stderr
        finally:
            first.kill()
            first.wait()

    def test_a_sweep_cell_and_the_ui_are_refused_too(self, tmp_path, monkeypatch):
        from kdgraph.ui.jobs import outside_activity

        run = tmp_path / "runs" / "x"
        holder = holding(run)
        try:
            assert f"process {holder.pid}" in outside_activity(run)
            from kdgraph.app import sweep

            (tmp_path / "s.yaml").write_text(
                "name: x\ndata: {dataset: digits, workers: 0}\nstudent: {model: wrn-10-1}\n"
                "train: {epochs: 1, max_steps_per_epoch: 1}\nlog: {tensorboard: false}\nsweep: {train.seed: [0, 1]}\n")
            with pytest.raises(Exception, match=f"process {holder.pid}"):
                sweep.run_sweep(tmp_path / "s.yaml", runs_dir=tmp_path / "runs", echo=lambda *_: None)
        finally:
            holder.kill()
            holder.wait()

    def test_the_teacher_lock_waits_and_is_reentrant(self, tmp_path):
        rd = RunDir(tmp_path / "t")
        holder = holding(rd.path, seconds=1.0)
        with rd.writing(wait=True):  # waits for the holder to end, then holds it
            assert rd.written_here() and rd.holder()["pid"] == os.getpid()
            with rd.writing():  # this process again: a from_spec teacher trained by the same process
                pass
            assert rd.written_here()
        holder.wait()
        assert not rd.written_here()


# ---------------------------------------------------------------------------------------- write ordering
CRASH_POINTS = ["last.pt:open@2", "last.pt:written@2", "last.pt:renamed@2", "best.pt:written@1",
                "best.pt:renamed@1", "metrics.jsonl:written@2", "summary.json:written@3", "last.pt:renamed@3"]


class TestWriteOrdering:
    @pytest.mark.parametrize("point", CRASH_POINTS)
    def test_a_kill_at_any_write_then_resume_equals_an_uninterrupted_run(self, tmp_path, reference, point):
        file, ref = reference
        killed = kdgraph(["run", file, "--out", tmp_path / "run"], tmp_path, {"KDGRAPH_CRASH_AT": point})
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed = kdgraph(["run", file, "--out", tmp_path / "run", "--resume"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        same_run(tmp_path / "run", ref)

    @pytest.mark.parametrize("point", ["last.pt:renamed@1", "metrics.jsonl:written@1"])
    def test_inside_a_pre_training_stage(self, tmp_path, teacher_ckpt, point):
        file = spec_file(tmp_path, "init", teacher={"model": "wrn-16-1", "checkpoint": str(teacher_ckpt)},
                         loss=[{"method": "ce"}, {"method": "tests.userpkg:InitHint"}],
                         train={"epochs": 2, "max_steps_per_epoch": 2, "schedule": {"name": "constant"}})
        assert kdgraph(["run", file, "--out", tmp_path / "ref"], tmp_path).returncode == 0
        killed = kdgraph(["run", file, "--out", tmp_path / "run"], tmp_path, {"KDGRAPH_CRASH_AT": point})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        resumed = kdgraph(["run", file, "--out", tmp_path / "run", "--resume"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        same_run(tmp_path / "run", tmp_path / "ref")
        assert RunDir(tmp_path / "run").rows()[0]["stage"] == "init"

    def test_metrics_rows_carry_in_the_checkpoint(self, reference):
        _, ref = reference
        saved = torch.load(RunDir(ref).last, weights_only=True)
        assert saved["state"]["rows"] == RunDir(ref).rows()


# ------------------------------------------------------------------------------------------- damaged files
class TestDamagedFiles:
    @pytest.fixture
    def stopped(self, tmp_path) -> tuple[Path, Path]:
        """A run killed after its first epoch: ``(spec file, run directory)``."""
        file = spec_file(tmp_path)
        killed = kdgraph(["run", file, "--out", tmp_path / "run"], tmp_path, {"KDGRAPH_CRASH_AT": "summary.json:renamed@2"})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        return file, tmp_path / "run"

    @pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not a zip", b"\x80\x02garbage"])
    def test_a_damaged_last_checkpoint_names_the_file_and_what_to_do(self, stopped, cli, damage):
        file, run = stopped
        RunDir(run).last.write_bytes(damage)
        code, out, err = cli(["run", file, "--out", run, "--resume"])
        assert code == 2 and "Traceback" not in out + err
        assert "last.pt" in err and "--force" in err and "good copy" in err

    def test_a_checkpoint_that_is_not_kdgraphs(self, stopped, cli):
        file, run = stopped
        torch.save({"weights": torch.zeros(2)}, RunDir(run).last)
        code, _, err = cli(["run", file, "--out", run, "--resume"])
        assert code == 2 and "not a kdgraph training checkpoint" in err

    @pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
    def test_damaged_metrics_and_summary_are_remade_from_the_checkpoint(self, stopped, cli, reference, name):
        file, run = stopped
        (run / name).write_text('{"epoch": 1, "lo\n\x00garbage')
        code, _, err = cli(["run", file, "--out", run, "--resume"])
        assert code == 0, err
        same_run(run, reference[1])

    def test_a_missing_best_checkpoint_of_the_last_epoch_is_remade(self, tmp_path, cli, reference):
        file, ref = reference
        killed = kdgraph(["run", file, "--out", tmp_path / "run"], tmp_path, {"KDGRAPH_CRASH_AT": "best.pt:open@1"})
        assert killed.returncode == -signal.SIGKILL
        assert not RunDir(tmp_path / "run").best.exists() and list((tmp_path / "run").rglob("*.tmp"))
        code, _, err = cli(["run", file, "--out", tmp_path / "run", "--resume"])
        assert code == 0, err
        same_run(tmp_path / "run", ref)


# ------------------------------------------------------------------------------------------------- NaN
class TestNonFinite:
    def test_non_finite_weights_are_never_saved(self, tmp_path, cli, write_spec):
        file = write_spec("nan", loss=[{"method": "ce"}, {"method": "tests.userpkg:PoisonWeights"}],
                          train={"epochs": 3, "max_steps_per_epoch": 2})
        run = tmp_path / "nan"
        code, out, err = cli(["run", file, "--out", run])
        assert code == 2 and "weights became non-finite" in err and "Traceback" not in out + err
        assert "the last good checkpoint is" in err and "(epoch 1;" in err
        saved = torch.load(RunDir(run).last, weights_only=True)
        assert saved["state"]["epoch"] == 1
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
        assert "NaN" not in (run / "metrics.jsonl").read_text()

    def test_resuming_from_non_finite_weights_is_refused(self, tmp_path, cli, write_spec):
        file = write_spec("x", train={"epochs": 2, "max_steps_per_epoch": 1})
        run = tmp_path / "run"
        assert cli(["run", file, "--out", run, "--set", "train.epochs=1"])[0] == 0
        saved = torch.load(RunDir(run).last, weights_only=True)
        next(iter(saved["model"].values())).view(-1)[:3] = float("nan")  # as an older kdgraph could save
        torch.save(saved, RunDir(run).last)
        code, _, err = cli(["run", file, "--out", run, "--resume"])
        assert code == 2 and "3 non-finite values" in err and "--force" in err


# ---------------------------------------------------------------------------------------------- full disk
def _small_files(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


class TestFullDisk:
    def test_a_failed_save_keeps_the_previous_checkpoint_and_exits_2(self, tmp_path, cli):
        file = spec_file(tmp_path)
        run = tmp_path / "run"
        assert cli(["run", file, "--out", run, "--set", "train.epochs=1"])[0] == 0
        before = RunDir(run).last.read_bytes()
        full = subprocess.run([*engine_command(), "run", str(file), "--out", str(run), "--resume"], cwd=tmp_path,
                              env=ENV, capture_output=True, text=True, timeout=600, preexec_fn=_small_files(200_000))
        assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr
        assert "could not write" in full.stderr and "nothing was lost" in full.stderr
        assert "the last good checkpoint is" in full.stderr and "(epoch 1;" in full.stderr and "--resume" in full.stderr
        assert RunDir(run).last.read_bytes() == before and not list(run.rglob("*.tmp"))
        code, _, err = cli(["run", file, "--out", run, "--resume"])  # space again: it goes on
        assert code == 0, err


# --------------------------------------------------------------------------------------- launching, sweep
class TestLaunch:
    def test_children_run_the_installed_kdgraph_whatever_the_folder_holds(self, tmp_path):
        (tmp_path / "kdgraph").mkdir()  # a checkout, or worse, in the folder a sweep or the UI starts from
        (tmp_path / "kdgraph" / "__init__.py").write_text("raise SystemExit('the wrong kdgraph')\n")
        (tmp_path / "kdgraph" / "__main__.py").write_text("raise SystemExit('the wrong kdgraph')\n")
        env = {**ENV, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())}
        wrong = subprocess.run([sys.executable, "-m", "kdgraph", "--version"], cwd=tmp_path, env=env,
                               capture_output=True, text=True)
        assert "the wrong kdgraph" in wrong.stderr  # what `python -m kdgraph` did
        right = subprocess.run([*engine_command(), "--version"], cwd=tmp_path, env=env, capture_output=True,
                               text=True)
        assert right.returncode == 0 and right.stdout.startswith("kdgraph "), right.stderr
        assert engine_command()[1:] == ["-c", ENTRY]

    def test_sweep_exits_non_zero_when_a_cell_failed(self, tmp_path, monkeypatch, capsys):
        from kdgraph.app import sweep

        fake = tmp_path / "fake.py"
        fake.write_text("import sys\nsys.exit(1 if 'train.seed=1' in sys.argv else 0)\n")
        monkeypatch.setattr(sweep, "engine_command", lambda: [sys.executable, str(fake)])
        (tmp_path / "s.yaml").write_text(
            "name: s\ndata: {dataset: digits, workers: 0}\nstudent: {model: wrn-10-1}\n"
            "train: {epochs: 1}\nlog: {tensorboard: false}\nsweep: {train.seed: [0, 1]}\n")
        assert main(["sweep", str(tmp_path / "s.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 1
        assert "1 cell(s) failed" in capsys.readouterr().out
        fake.write_text("import sys\nsys.exit(0)\n")
        assert main(["sweep", str(tmp_path / "s.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 0

    def test_report_out_onto_a_file(self, tmp_path, cli):
        from tests.test_sweep_report import fake_run

        fake_run(tmp_path / "runs" / "a", best=50.0)
        (tmp_path / "f").write_text("x")
        code, out, err = cli(["report", tmp_path / "runs" / "a", "--out", tmp_path / "f"])
        assert code == 2 and "is a file" in err and "Traceback" not in out + err
