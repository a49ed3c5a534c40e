"""A run directory and every file in it: the one module that names them.

``kdgraph run`` writes, under ``runs/NAME`` (or ``--out DIR``):

* ``spec.yaml`` -- the resolved spec, the files it names made absolute;
* ``summary.json`` -- the run's state (status, epochs done, best and final top-1, ...), from its first second;
* ``metrics.jsonl`` -- one JSON line per epoch (pre-training epochs marked ``"stage": "init"``);
* ``steps.jsonl`` -- the training loss every ``log.every`` steps (mean over those steps, each term too);
* ``wiring.svg`` -- the picture of the distillation's wiring (:mod:`kdgraph.app.wiring`);
* ``checkpoints/last.pt`` (every epoch's end, and a stop) and ``checkpoints/best.pt`` (the best epoch);
* ``log.txt``, TensorBoard events in ``tb/``;
* ``export/`` -- the student alone, written by ``kdgraph export`` (:mod:`kdgraph.app.export`);
* ``.kdgraph-run``, the marker written when kdgraph creates the directory, and ``.lock``, locked by the
  one process writing the run (it holds that process's PID).

:class:`RunDir` gives their paths, reads them (a missing or half-written file reads as empty) and writes
them (JSON atomically: a reader sees the old file or the new one). A run's ``status`` is one of
:data:`STATUSES`; :data:`STOPPED` is the exit status of a run stopped by a signal after its checkpoint.
The engine, sweep, report, the command line and the UI go through this module for every run file.
(torch is imported only to read or write a checkpoint.)

Nothing is lost or clobbered: kdgraph writes only into a new or empty directory, or one holding its
marker; :meth:`RunDir.writing` holds an exclusive lock for as long as a process writes a run, so a
second writer (a resume, ``--force``, a sweep cell, the UI) is refused with the holder's PID; and
:meth:`RunDir.clear` (``--force``) deletes only what is inside a marked directory, never through a
symbolic link. Overwrite protection rests on the marker and the lock, not on any file being readable.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from .. import files
from ..errors import UserError

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
    MARKER = ".kdgraph-run"
    SWEEP_LOG = "sweep.log"   # a sweep cell's launcher log (its attempts' output)
    UI_LOG = "output.log"     # a UI job's launcher log
    UI_SPEC = "launch.yaml"   # the spec the UI started a run with
    KEPT_BY_CLEAR = (LOCK, MARKER, SWEEP_LOG, UI_LOG, UI_SPEC)  # the launcher's files survive --force
    SWEEP = "sweep.json"      # a sweep's directory: its record (kdgraph.app.grid)

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

    def is_sweep(self) -> bool:
        """Whether the directory is a sweep's (it holds the sweep's record)."""
        return (self.path / self.SWEEP).is_file()

    def has_run_files(self) -> bool:
        """Whether the directory holds anything a run writes (more than the marker, the lock and a
        launcher's log and spec)."""
        try:
            return any(e.name not in self.KEPT_BY_CLEAR for e in os.scandir(self.path))
        except OSError:
            return False

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
        return [row for row in self.rows() if row.get("stage", "distill") == stage]

    def rows(self) -> list[dict]:
        """Every row of ``metrics.jsonl``, of any stage, in order (damaged lines are skipped: a resumed run
        rewrites the file from its checkpoint)."""
        return _json_lines(self.metrics_file, "epoch")

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

    def is_marked(self) -> bool:
        """Whether kdgraph created this directory (it holds the marker, a regular file)."""
        marker = self.path / self.MARKER
        return marker.is_file() and not marker.is_symlink()

    def ensure(self, adopt: bool = False) -> None:
        """Make the directory a run directory of kdgraph's: create it (parents too) with its marker, or
        accept an empty one or a marked one; ``adopt`` also marks a run written before markers existed (it
        has a summary or a last checkpoint). Anything else -- a file, a non-empty folder kdgraph did not
        create -- is refused: kdgraph never writes among files it did not make."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file, not a run directory: choose another --out")
        if self.is_marked():
            return
        if path.is_dir() and any(path.iterdir()) and not (adopt and self._kdgraphs()):
            if self._kdgraphs():
                raise UserError(f"{path} holds a run without kdgraph's {self.MARKER} marker (an older kdgraph's): "
                                f"--resume continues it; --force deletes only directories that carry the "
                                f"marker, so delete it yourself to start over, or write elsewhere with --out")
            raise UserError(f"{path} is not empty and kdgraph did not create it (no {self.MARKER} file): "
                            f"kdgraph writes a run only into a new or empty directory, or one of its own; "
                            f"choose another --out (nothing was changed)")
        path.mkdir(parents=True, exist_ok=True)
        write_text(path / self.MARKER, json.dumps({"kdgraph": "run directory", "created":
                                                   time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")

    def _kdgraphs(self) -> bool:
        """Whether an unmarked directory holds what kdgraph writes (a run of an older kdgraph, a sweep's
        record, or only a launcher's log and spec) -- what ``adopt`` accepts."""
        names = {e.name for e in os.scandir(self.path)}
        summary = self.summary()
        record = read_json(self.path / self.SWEEP) or {}
        return (self.last.is_file() or (summary.get("status") in STATUSES and "name" in summary)
                or isinstance(record.get("cells"), dict) or names <= set(self.KEPT_BY_CLEAR))

    @contextlib.contextmanager
    def writing(self, wait: bool = False, adopt: bool = False) -> Iterator[None]:
        """Hold this directory's exclusive writer lock for the block (see :meth:`ensure` for ``adopt``).

        Another process holding it is refused with its PID, or waited for with ``wait``; this process may
        take it again (a ``from_spec`` teacher of the same process). The lock is the kernel's (``flock``):
        a killed writer releases it. Stale temporary files of an interrupted write are removed. Where
        ``fcntl`` does not exist (Windows), there is no lock.
        """
        key = os.path.realpath(self.path)
        if key in _HELD:
            _HELD[key][1] += 1
            try:
                yield
            finally:
                _HELD[key][1] -= 1
            return
        self.ensure(adopt)
        fd = _lock(self.path / self.LOCK, wait, self)
        _HELD[key] = [fd, 1]
        try:
            files.remove_temporaries(self.path, self.last.parent)
            yield
        finally:
            del _HELD[key]
            if fd is not None:
                os.close(fd)  # releases the lock

    def written_here(self) -> bool:
        """Whether this process holds the directory's writer lock (:meth:`writing`)."""
        return os.path.realpath(self.path) in _HELD

    def holder(self) -> dict | None:
        """``{"pid", "host", "command", "since"}`` of the process writing this run, or None (no writer)."""
        try:
            import fcntl
            fd = os.open(self.path / self.LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except (ImportError, OSError):
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return None
            except BlockingIOError:
                return _holder_info(fd)
        finally:
            os.close(fd)

    def clear(self) -> None:
        """``--force``: delete what a run wrote here -- everything but the marker, the lock and the
        launcher's log and spec (:data:`KEPT_BY_CLEAR`) -- from a marked directory, not through links."""
        if self.path.is_symlink():
            raise UserError(f"{self.path} is a symbolic link (to {os.path.realpath(self.path)}): --force deletes "
                            f"only a run directory itself, never through a link; give --out the real directory")
        if not self.is_marked():
            raise UserError(f"{self.path} was not created by kdgraph (no {self.MARKER} file): --force deletes "
                            f"only run directories kdgraph created")
        for entry in os.scandir(self.path):
            if entry.name in self.KEPT_BY_CLEAR:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def write_summary(self, summary: dict) -> None:
        write_json(self.summary_file, summary, indent=2)

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace ``metrics.jsonl`` with ``rows``, atomically (a NaN is a ValueError: never written)."""
        write_text(self.metrics_file, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))

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

    # ------------------------------------------------------------------------------ write ordering
    def commit(self, checkpoint: dict, summary: dict, improved: bool) -> list[dict]:
        """End an epoch: ``last.pt`` first -- the commit point, holding the progress, the best epoch and
        every metrics row (``state["rows"]``) --, then what follows from it: ``best.pt`` when the epoch
        improved, ``metrics.jsonl``, ``summary.json`` (each written atomically). Killed anywhere in between,
        :meth:`settle` on resume remakes the rest from ``last.pt``, so nothing is lost or written twice.
        Returns the metrics rows that ``metrics.jsonl`` did not hold yet."""
        self.save_checkpoint("last", checkpoint)
        if improved:
            self.save_checkpoint("best", best_of(checkpoint))
        return self.settle(checkpoint, summary, check_best=False)

    def settle(self, checkpoint: dict, summary: dict, check_best: bool = True) -> list[dict]:
        """Bring ``best.pt`` (when ``check_best``), ``metrics.jsonl`` and ``summary`` (updated in place and
        written) in line with ``checkpoint``, the last one; the metrics rows that were missing."""
        state = checkpoint["state"]
        if check_best and state.get("best_epoch") == state["epoch"] and not state["step"] \
                and _epoch_of(self.best) != state["epoch"]:
            self.save_checkpoint("best", best_of(checkpoint))  # killed between last.pt and best.pt
        rows, have = state.get("rows"), self.rows()
        if rows is None:  # a checkpoint of an older kdgraph: keep the rows up to it
            rows = [r for r in have if r["epoch"] <= state["epoch"]]
        fresh = rows[len(have):] if have == rows[:len(have)] else rows
        if have != rows:
            self.write_metrics(rows)
        summary.update(epochs_done=max(0, state["epoch"]), best_top1=state["best"] if state["best"] >= 0 else None,
                       best_epoch=state["best_epoch"])
        trained = [r for r in rows if r.get("stage") != "init"]
        if trained:
            summary["final_top1"] = trained[-1]["test_top1"]
        if len(trained) < len(rows):  # rows of a pre-training stage (terms with init_epochs)
            summary["init_epochs_done"] = max(r["init_epoch"] for r in rows if r.get("stage") == "init")
        self.write_summary(summary)
        return fresh



_HELD: dict[str, list] = {}  # real path -> [lock file descriptor, depth] of the run dirs this process writes


def _lock(path: Path, wait: bool, rd: RunDir) -> int | None:
    """Lock ``path`` (created if needed, never through a link) for this process and write who holds it."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        info = _holder_info(fd)
        os.close(fd)
        who = (f"process {info['pid']} on {info.get('host', '?')} ({info.get('command', '?')}, since "
               f"{info.get('since', '?')})" if info else "another process")
        raise UserError(f"{rd.path} is being written by {who}: one process writes a run at a time. Wait for "
                        f"it to end, or stop it (kill -TERM {info['pid'] if info else 'PID'}) and --resume") from None
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n").encode())
    return fd


def _holder_info(fd: int) -> dict | None:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "pid" in info else None


def best_of(checkpoint: dict) -> dict:
    """The best checkpoint made from a last one: the same, without the optimiser's state."""
    return {k: v for k, v in checkpoint.items() if k not in ("optimizer", "scaler")}


def _epoch_of(path: Path) -> int | None:
    """The epoch a (best) checkpoint was written at, or None when it is missing or unreadable."""
    from .. import checkpoint as ckpt

    try:
        state = ckpt.load(path, mmap=True).get("state") or {}
    except (UserError, AttributeError):
        return None
    return state.get("epoch") if not state.get("step") else None


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
