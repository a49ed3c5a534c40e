"""A run directory and every file in it: the one module that names them.

``kdgraph run`` writes, under ``runs/NAME`` (or ``--out DIR``):

* ``spec.yaml`` -- the resolved spec, the files it names made absolute;
* ``summary.json`` -- the run's state (status, epochs done, best and final top-1, ...), from its first second;
* ``metrics.jsonl`` -- one JSON line per epoch (pre-training epochs marked ``"stage": "init"``);
* ``steps.jsonl`` -- the training loss every ``log.every`` steps (mean over those steps, each term too);
* ``wiring.svg`` -- the picture of the distillation's wiring (:mod:`kdgraph.app.wiring`);
* ``checkpoints/last.pt`` (every epoch's end, and a stop) and ``checkpoints/best.pt`` (the best epoch);
* ``log.txt``, TensorBoard events in ``tb/``, and ``.lock`` (held while a ``from_spec`` teacher trains);
* ``export/`` -- the student alone, written by ``kdgraph export`` (:mod:`kdgraph.app.export`).

:class:`RunDir` gives their paths, reads them (a missing or half-written file reads as empty) and writes
them (JSON atomically: a reader sees the old file or the new one). A run's ``status`` is one of
:data:`STATUSES`; :data:`STOPPED` is the exit status of a run stopped by a signal after its checkpoint.
The engine, sweep, report, the command line and the UI go through this module for every run file.
(torch is imported only to read or write a checkpoint.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import yaml

from .. import files

STOPPED = 130  # exit status of a run stopped by SIGINT/SIGTERM after writing its checkpoint (128 + SIGINT)
STATUSES = ("running", "finished", "stopped", "failed")
EXIT_STATUS = {"finished": 0, "stopped": STOPPED, "failed": 1}  # what a run's last status implies


# ------------------------------------------------------------------------------------------ JSON files
def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing or unreadable (e.g. being rewritten)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


write_text = files.write_text  # replace a file's text atomically


def write_json(path: str | Path, data: Any, indent: int = 1) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically."""
    write_text(path, json.dumps(data, indent=indent) + "\n")


# ------------------------------------------------------------------------------------------ a run dir
class RunDir:
    """The files of one run directory; ``RunDir(path)`` itself touches nothing.

    Example::

        rd = RunDir("runs/quickstart-kd")
        rd.status(), rd.best_top1()          # "finished", 93.6
        [row["test_top1"] for row in rd.metrics()]
    """

    SUMMARY = "summary.json"
    METRICS = "metrics.jsonl"
    STEPS = "steps.jsonl"
    WIRING = "wiring.svg"
    EXPORT = "export"
    SPEC = "spec.yaml"
    LOG = "log.txt"
    TENSORBOARD = "tb"
    CHECKPOINTS = {"last": "last.pt", "best": "best.pt"}  # in the checkpoints/ folder
    LOCK = ".lock"

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------------------------- paths
    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def steps_file(self) -> Path:
        return self.path / self.STEPS

    @property
    def wiring_file(self) -> Path:
        return self.path / self.WIRING

    @property
    def export_dir(self) -> Path:
        return self.path / self.EXPORT

    @property
    def spec_file(self) -> Path:
        return self.path / self.SPEC

    @property
    def log_file(self) -> Path:
        return self.path / self.LOG

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    def checkpoint(self, which: str) -> Path:
        """The path of checkpoint ``which``: ``"last"`` or ``"best"``."""
        return self.path / "checkpoints" / self.CHECKPOINTS[which]

    @property
    def last(self) -> Path:
        return self.checkpoint("last")

    @property
    def best(self) -> Path:
        return self.checkpoint("best")

    # ------------------------------------------------------------------------------------- reading
    def is_run(self) -> bool:
        """Whether the directory holds a run (it has a summary)."""
        return self.summary_file.is_file()

    def started(self) -> bool:
        """Whether a run was started here (a summary or a checkpoint): ``kdgraph run`` needs ``--resume``
        or ``--force`` to go on."""
        return self.summary_file.exists() or self.last.exists()

    def summary(self) -> dict:
        """The run's summary ({} when there is none or it cannot be read)."""
        return read_json(self.summary_file) or {}

    def status(self) -> str | None:
        """``running``, ``finished``, ``stopped`` or ``failed`` (None without a summary)."""
        return self.summary().get("status")

    def exit_status(self) -> int | None:
        """The exit status the summary's status implies (for a process nobody saw end), else None."""
        return EXIT_STATUS.get(self.status())

    def summary_time(self) -> float | None:
        """When the summary was last written (a timestamp), or None without one."""
        try:
            return self.summary_file.stat().st_mtime
        except OSError:
            return None

    def last_write(self) -> float:
        """The latest modification time of the files a live run keeps writing (0.0 when none exists)."""
        stamps = []
        for path in (self.log_file, self.metrics_file, self.summary_file, self.last):
            try:
                stamps.append(path.stat().st_mtime)
            except OSError:
                pass
        return max(stamps, default=0.0)

    def metrics(self, stage: str = "distill") -> list[dict]:
        """The per-epoch rows of ``metrics.jsonl`` of ``stage``: ``distill`` (the epochs that train and test the
        student), or ``init`` (the terms' pre-training epochs, rows marked ``"stage": "init"``). A partly
        written last line is ignored."""
        return [r for r in _json_lines(self.metrics_file, "epoch") if r.get("stage", "distill") == stage]

    def steps(self) -> list[dict]:
        """The rows of ``steps.jsonl``: ``step`` (optimiser steps so far), ``epoch`` (epochs so far, a
        fraction), ``lr``, ``loss`` and ``loss/NAME`` (means over the steps since the previous row)."""
        return _json_lines(self.steps_file, "step")

    def best_top1(self, summary: dict | None = None) -> float | None:
        """The run's best test top-1: the summary's, else the best epoch's in ``metrics.jsonl``."""
        best = (self.summary() if summary is None else summary).get("best_top1")
        if isinstance(best, (int, float)):
            return float(best)
        return max((m["test_top1"] for m in self.metrics() if isinstance(m.get("test_top1"), (int, float))),
                   default=None)

    def load_checkpoint(self, which: str = "last") -> dict:
        """Checkpoint ``which``, loaded on the CPU with ``weights_only=True``."""
        from .. import checkpoint as ckpt

        return ckpt.load(self.checkpoint(which), map_location="cpu")

    # ------------------------------------------------------------------------------------- writing
    def create(self, spec_data: dict) -> None:
        """Make the directory (and ``checkpoints/``) and write the resolved spec."""
        self.last.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.spec_file, yaml.safe_dump(spec_data, sort_keys=False))

    def remove(self) -> None:
        """Delete the directory and everything in it (``--force``)."""
        shutil.rmtree(self.path)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary_file, summary, indent=2)

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def keep_metrics(self, epochs: int) -> None:
        """Drop the rows past epoch ``epochs`` (written after the checkpoint a run resumes from)."""
        _keep_lines(self.metrics_file, "epoch", epochs)

    def append_steps(self, row: dict) -> None:
        with open(self.steps_file, "a") as f:
            f.write(json.dumps(row) + "\n")

    def keep_steps(self, step: int) -> None:
        """Drop the step rows past optimiser step ``step`` (written after the checkpoint a run resumes from)."""
        _keep_lines(self.steps_file, "step", step)

    def write_wiring(self, svg: str) -> None:
        """Write the wiring picture (an SVG document), atomically."""
        write_text(self.wiring_file, svg)

    def save_checkpoint(self, which: str, obj: dict) -> None:
        """Write checkpoint ``which`` atomically."""
        from .. import checkpoint as ckpt

        ckpt.save_atomic(obj, self.checkpoint(which))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an advisory lock on the directory (a no-op where ``fcntl`` does not exist)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / self.LOCK, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _json_lines(path: Path, key: str) -> list[dict]:
    """The JSON objects with ``key`` of a JSON-lines file (a partly written last line is ignored)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and key in row:
            rows.append(row)
    return rows


def _keep_lines(path: Path, key: str, last: float) -> None:
    """Keep the lines of a JSON-lines file whose ``key`` is at most ``last`` (atomically)."""
    if path.exists():
        kept = [json.dumps(r) for r in _json_lines(path, key) if r[key] <= last]
        write_text(path, "".join(r + "\n" for r in kept))


def teacher_dir(teacher, runs_dir: str | Path) -> RunDir:
    """Where a ``from_spec`` teacher (a :class:`~kdgraph.spec.Spec` from :func:`kdgraph.spec.teacher_spec`)
    is trained: ``RUNS/NAME``, or ``RUNS/NAME-HASH`` when the student's spec changed it (its ``overrides``),
    so that a smoke run's teacher never overwrites the real teacher's run."""
    name = teacher.data["name"]
    if teacher.overrides:
        name += "-" + hashlib.sha1("\n".join(teacher.overrides).encode()).hexdigest()[:8]
    return RunDir(Path(runs_dir) / name)
