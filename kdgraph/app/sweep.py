"""Grid search: a spec's ``sweep:`` block maps key paths to value lists, and every combination is a run.

::

    sweep:
      loss.1.temperature: [2, 4, 8, 16]           # one key
      "loss.1.weight,loss.0.weight":               # linked keys move together; label = first key's value
        [[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]]

The grid is the product of the entries (first = table rows, second = table columns, further entries are
folded into the row label). Each cell is an ordinary ``kdgraph run`` in ``RUNS_DIR/<spec name>/<cell>``,
started as a subprocess (:mod:`~kdgraph.app.launch`) whose output goes to the cell's ``sweep.log``. The
sweep directory's record (:mod:`~kdgraph.app.grid`) keeps the keys, values, cells and their last exit
codes, from which :func:`~kdgraph.app.grid.write_grid` renders the grid.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .. import spec as specs
from ..errors import SpecError, UserError
from ..spec import Spec, dotted, flow_text, load
from ..spec.paths import parse_path, path_problem, spec_paths
from .grid import SEED_KEY, read_sweep, write_grid, write_sweep
from .launch import engine_command, failure_reason, policy_options, start
from .rundir import STOPPED, RunDir, teacher_dir

LOG_FILE = RunDir.SWEEP_LOG  # in each cell's directory: the launcher's log of its attempts


# ------------------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """One entry of the sweep block: one key path, or several linked ones that move together."""

    key: str                      # as written in the spec, e.g. "loss.1.weight,loss.0.weight"
    paths: tuple[tuple, ...]      # the parsed key paths
    values: tuple[tuple, ...]     # per value of the entry: one value per path
    label: str = ""               # short name used in cell names and table headers

    @property
    def linked(self) -> bool:
        return len(self.paths) > 1

    def value_label(self, i: int) -> str:
        """The readable form of value ``i`` (the first path's value for linked keys)."""
        return format_value(self.values[i][0])


@dataclass(frozen=True)
class Cell:
    """One grid point: its index per axis, its name and the ``--set`` overrides that make it."""

    name: str
    index: tuple[int, ...]
    values: dict                  # dotted key path -> value

    @property
    def overrides(self) -> list[str]:
        return [f"{path}={flow_text(value)}" for path, value in self.values.items()]


def format_value(value: Any) -> str:
    """A short, stable text for a swept value (used in cell names and table headers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value) if not isinstance(value, float) or math.isfinite(value) else flow_text(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def safe_name(text: str, limit: int = 120) -> str:
    """A file-system-safe directory name: unusual characters become ``_``, long names get a hash."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text).lstrip(".") or "_"
    if len(name) > limit:
        name = f"{name[:limit - 9]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return name


def axis_labels(paths: Sequence[tuple]) -> list[str]:
    """Short labels for key paths: the last component, more of the path where two would clash.

    A label never starts with a list index (``loss.0.weight`` rather than ``0.weight``).
    """
    def label(path: tuple, n: int) -> str:
        start = max(len(path) - n, 0)
        while start > 0 and isinstance(path[start], int):
            start -= 1
        return dotted(path[start:])

    sizes = [1] * len(paths)
    while True:
        labels = [label(p, n) for p, n in zip(paths, sizes)]
        clashes = {lab for lab in labels if labels.count(lab) > 1}
        grow = [i for i, lab in enumerate(labels) if lab in clashes and sizes[i] < len(paths[i])]
        if not grow:
            return labels
        for i in grow:
            sizes[i] += 1


def parse_sweep(sweep: dict) -> list[Axis]:
    """The axes of a ``sweep:`` block (checks linked values and repeated paths, not the spec)."""
    if not isinstance(sweep, dict) or not sweep:
        raise UserError("sweep: expected a mapping of key paths to lists of values")
    raw = []
    for key, values in sweep.items():
        paths = tuple(parse_path(k) for k in str(key).split(","))
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep.{key}: expected a non-empty list of values")
        if len(paths) == 1:
            rows = tuple((v,) for v in values)
        else:
            bad = [v for v in values if not isinstance(v, list) or len(v) != len(paths)]
            if bad:
                raise UserError(f"sweep.{key}: linked keys take lists of {len(paths)} values each "
                                f"(one per key), e.g. [{', '.join(['...'] * len(paths))}]; got {bad[0]!r}")
            rows = tuple(tuple(v) for v in values)
        raw.append((str(key), paths, rows))
    seen: dict[tuple, str] = {}
    for key, paths, _ in raw:
        for p in paths:
            if p[0] == "sweep":
                raise UserError(f"sweep.{key}: the sweep block itself cannot be swept")
            if p in seen:
                raise UserError(f"sweep: {dotted(p)} appears in both {seen[p]!r} and {key!r}")
            seen[p] = key
    labels = axis_labels([paths[0] for _, paths, _ in raw])
    axes = [Axis(key, paths, rows, label) for (key, paths, rows), label in zip(raw, labels)]
    for axis in axes:
        texts = [axis.value_label(i) for i in range(len(axis.values))]
        dupes = sorted({t for t in texts if texts.count(t) > 1})
        if dupes:
            what = "the first values of linked keys" if axis.linked else "values"
            raise UserError(f"sweep.{axis.key}: {what} must differ (they name the cells); "
                            f"repeated: {', '.join(dupes)}")
    return axes


def grid_cells(axes: Sequence[Axis]) -> list[Cell]:
    """Every combination of the axes' values, in row-major order."""
    cells = []
    for index in itertools.product(*(range(len(a.values)) for a in axes)):
        values, parts = {}, []
        for axis, i in zip(axes, index):
            values.update({dotted(p): v for p, v in zip(axis.paths, axis.values[i])})
            parts.append(f"{axis.label}={axis.value_label(i)}")
        cells.append(Cell(safe_name(",".join(parts)), tuple(index), values))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise UserError(f"sweep: two cells would share the directory name {twice!r}; use values "
                        f"that differ once written as file names")
    return cells


# ----------------------------------------------------------------------------------- key path checks
def check_paths(spec: Spec, axes: Iterable[Axis]) -> None:
    """Raise a :class:`SpecError` naming each swept path the spec does not have, with suggestions."""
    known, free = spec_paths(spec.data)
    problems = [spec.problem(("sweep", axis.key, "<key>"), message) for axis in axes for path in axis.paths
                if (message := path_problem(path, known, free))]
    if problems:
        raise SpecError(problems)


def sweep_record(name: str, spec_file: str | Path, overrides: Sequence[str], axes: Sequence[Axis],
                 cells: Sequence[Cell], previous: dict | None = None) -> dict:
    """The content of ``sweep.json``; the last attempt of each cell (exit code, end time) is kept from
    ``previous``."""
    old_cells = (previous or {}).get("cells", {})
    return {
        "name": name, "spec": str(Path(spec_file).resolve()), "overrides": list(overrides),
        "keys": [a.key for a in axes], "labels": [a.label for a in axes],
        "values": [[list(v) if a.linked else v[0] for v in a.values] for a in axes],
        "value_labels": [[a.value_label(i) for i in range(len(a.values))] for a in axes],
        "cells": {c.name: {"index": list(c.index), "values": c.values,
                           **{k: v for k, v in old_cells.get(c.name, {}).items() if k in ("exit", "ended", "seconds")}}
                  for c in cells},
    }


# --------------------------------------------------------------------------------------- running
def cell_command(spec_file: str | Path, overrides: Sequence[str], cell: Cell, cell_dir: Path, *,
                 resume: bool = False, force: bool = False, runs_dir: str | Path | None = None,
                 imports: Sequence[str] = ()) -> list[str]:
    """The ``kdgraph run`` command line of one cell (``--resume`` continues an unfinished cell, ``--force``
    starts it over); ``imports``: the sweep's own import policy options, passed on."""
    cmd = [*engine_command(), "run", str(spec_file), *imports]
    for override in [*overrides, *cell.overrides, "sweep=null", "seeds=null"]:
        cmd += ["--set", override]
    cmd += ["--out", str(cell_dir)]
    if runs_dir is not None:  # where a from_spec teacher is trained
        cmd += ["--runs-dir", str(runs_dir)]
    if resume:
        cmd.append("--resume")
    elif force:
        cmd.append("--force")
    return cmd


def _slots(spec_device: str, jobs: int | None, devices: str | Sequence | None) -> list[dict]:
    """One environment patch per concurrent cell: a GPU each, or CPU workers sharing the cores."""
    if isinstance(devices, str):
        devices = [d for d in devices.replace(" ", "").split(",") if d]
    if devices is not None and [str(d).lower() for d in devices] == ["cpu"]:
        devices, use_cuda = [], False
    else:
        use_cuda = devices is not None or spec_device == "auto" or spec_device.startswith("cuda")
    ids: list[str] = []
    if use_cuda:
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        listed = [d.strip() for d in visible.split(",") if d.strip()] if visible is not None else None
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if devices is not None and not count:
            raise UserError(f"--devices {','.join(map(str, devices))}: CUDA is not available here")
        for d in devices if devices is not None else range(count):
            d = str(d)
            if not d.isdigit() or int(d) >= count:
                raise UserError(f"--devices: no CUDA device {d!r}; this machine shows {count} "
                                f"(use indices 0..{count - 1})")
            ids.append(listed[int(d)] if listed else d)
    if ids:
        return [{"CUDA_VISIBLE_DEVICES": i} for i in dict.fromkeys(ids)]
    n = max(1, int(jobs or 1))
    threads = str(max(1, (os.cpu_count() or 1) // n))
    return [{"OMP_NUM_THREADS": threads} if n > 1 else {} for _ in range(n)]


class _Runner:
    """Runs cells on a pool of slots; stops cleanly (forwarding SIGINT to the cells) when interrupted."""

    def __init__(self, slots: list[dict]):
        self.slots: queue.Queue = queue.Queue()
        for slot in slots:
            self.slots.put(slot)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}

    def run(self, cell: Cell, cmd: list[str], cell_dir: Path, on_start: Callable) -> tuple[int | None, float]:
        """Run one cell; ``(exit code, seconds)``, exit code None when the sweep stopped before the cell
        started. Its directory is made kdgraph's (marked) before the launcher's log goes in."""
        slot = self.slots.get()
        try:
            if self.stop.is_set():
                return None, 0.0
            RunDir(cell_dir).ensure(adopt=True)
            started = time.time()
            with self.lock:
                if self.stop.is_set():
                    return None, 0.0
                proc = start(cmd, cell_dir / LOG_FILE, {**os.environ, **slot})
                self.procs[cell.name] = proc
            on_start(cell, slot)
            code = proc.wait()
            with self.lock:
                self.procs.pop(cell.name, None)
            return code, time.time() - started
        finally:
            self.slots.put(slot)

    def interrupt(self) -> None:
        """Start no more cells and ask the running ones to checkpoint and stop."""
        with self.lock:
            self.stop.set()
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)


def _progress(total: int, echo: Callable):
    """A tqdm bar on a terminal (with the default ``echo``), else None (plain lines are echoed)."""
    if echo is not print or not sys.stderr.isatty() or not total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="cell", dynamic_ncols=True)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``"5"`` is seeds 0..4, ``"0,3,7"`` those seeds."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--seeds takes a count (5: seeds 0..4) or a list (0,3,7), not {text!r}") from None
    if len(seeds) == 1 and "," not in str(text):
        if seeds[0] < 1:
            raise UserError(f"--seeds {text}: give at least one seed")
        seeds = list(range(seeds[0]))
    if len(set(seeds)) != len(seeds) or not seeds:
        raise UserError(f"--seeds {text}: the seeds must differ")
    return seeds


def run_sweep(spec_file: str | Path, overrides: Sequence[str] = (), *, jobs: int | None = None,
              devices: str | Sequence | None = None, runs_dir: str | Path = "runs", force: bool = False,
              seeds: Sequence[int] | None = None, echo: Callable[[str], Any] = print) -> Path:
    """Run every cell of the spec's sweep that is not finished yet, then write the grid; return the sweep dir.

    ``overrides`` (``--set`` texts) apply to every cell. With CUDA, cells run one per GPU at a time
    (``devices`` such as ``"0,1"``, default all visible); on CPU they run one at a time, or ``jobs`` at a
    time (the first cell alone when it must train a ``from_spec`` teacher the others share). Finished cells
    are skipped; an unfinished one continues with ``--resume`` (from its checkpoint when it has one);
    ``force`` deletes each cell's directory and runs it again. A failing cell is recorded (its output is in
    its ``sweep.log``) and the others go on. Ctrl-C (or SIGTERM) stops the running cells after their
    checkpoint, writes the grid and re-raises ``KeyboardInterrupt``. ``seeds`` adds a ``train.seed`` axis
    (each cell once per seed; the grid shows mean ± std over them); a spec without a sweep block then
    sweeps its seeds alone. A spec's own ``seeds:`` list stands for ``seeds`` when it is not given.
    """
    from ..spec.check import check

    spec = load(spec_file, overrides)
    listed = spec.data.pop("seeds", None)  # a spec's own `seeds:` list is the seed axis too
    seeds = seeds or listed
    sweep = dict(spec.get("sweep") or {})
    if seeds:
        if SEED_KEY in sweep:
            raise UserError(f"--seeds: the sweep block of {spec_file} already varies {SEED_KEY}")
        sweep[SEED_KEY] = list(seeds)
    if not sweep:
        raise UserError(f"{spec_file}: the spec has no sweep: block (key paths mapped to lists of values); "
                        f"--seeds N runs it once per seed")
    spec.data["sweep"] = sweep
    axes = parse_sweep(sweep)
    check_paths(spec, axes)
    problems = check(spec)
    if problems:
        raise SpecError(problems)
    cells = grid_cells(axes)
    slots = _slots(str(spec.data.get("train", {}).get("device", "auto")), jobs, devices)

    sweep_dir = Path(runs_dir) / spec["name"]
    with RunDir(sweep_dir).writing(adopt=True):  # one sweep process at a time writes its directory
        return _sweep(spec, spec_file, overrides, axes, cells, slots, sweep_dir, force, runs_dir, echo)


def _sweep(spec: Spec, spec_file, overrides, axes, cells, slots, sweep_dir: Path, force: bool, runs_dir,
           echo: Callable) -> Path:
    record = sweep_record(spec["name"], spec_file, overrides, axes, cells, read_sweep(sweep_dir))
    write_sweep(sweep_dir, record)

    todo = [c for c in cells if force or RunDir(sweep_dir / c.name).status() != "finished"]
    shape = " x ".join(str(len(a.values)) for a in axes)
    where = (f"{len(slots)} GPU(s): {', '.join(s['CUDA_VISIBLE_DEVICES'] for s in slots)}"
             if slots[0].get("CUDA_VISIBLE_DEVICES") else f"CPU, {len(slots)} at a time")
    echo(f"sweep {spec['name']}: {len(cells)} cells ({shape}), {len(cells) - len(todo)} finished, "
         f"{len(todo)} to run on {where}; cells in {sweep_dir}")

    failed = _run_cells(spec, spec_file, overrides, todo, sweep_dir, record, slots, force, runs_dir, echo)
    if failed:
        echo(f"{len(failed)} cell(s) failed: {', '.join(failed)} (see each cell's {LOG_FILE})")
    write_grid(sweep_dir, echo=echo)
    return sweep_dir


def _teacher_pending(spec: Spec, runs_dir: str | Path) -> bool:
    """Whether the first cell will train a ``from_spec`` teacher that the other cells then share."""
    teacher = spec.data.get("teacher") or {}
    if not teacher.get("from_spec"):
        return False
    try:
        rd = teacher_dir(specs.teacher_spec(spec), runs_dir)
    except Exception:  # noqa: BLE001 - the cell itself reports a broken teacher spec
        return True
    return rd.status() != "finished"


class _Report:
    """What a sweep says as its cells start and end; records each end in the sweep's record."""

    def __init__(self, todo: list[Cell], sweep_dir: Path, record: dict, echo: Callable):
        self.total, self.sweep_dir, self.record = len(todo), sweep_dir, record
        self.bar = _progress(len(todo), echo)
        self.say = self.bar.write if self.bar else echo
        self.failed: list[str] = []
        self.done = 0

    def started(self, cell: Cell, slot: dict) -> None:
        if not self.bar:
            gpu = f" on GPU {slot['CUDA_VISIBLE_DEVICES']}" if slot.get("CUDA_VISIBLE_DEVICES") else ""
            self.say(f"start {cell.name}{gpu}")

    def ended(self, cell: Cell, code: int | None, seconds: float) -> None:
        if code is None:  # never started
            return
        self.done += 1
        self.record["cells"][cell.name].update(exit=code, ended=time.time(), seconds=round(seconds, 1))
        write_sweep(self.sweep_dir, self.record)
        if code == 0:
            best = RunDir(self.sweep_dir / cell.name).best_top1()
            result = f"finished, best top-1 {best:.2f}" if best is not None else "finished"
        elif code == STOPPED:
            result = "stopped (the next sweep resumes it)"
        else:
            log = self.sweep_dir / cell.name / LOG_FILE
            self.failed.append(cell.name)
            result = f"FAILED (exit {code}): {failure_reason(log)} [log: {log}]"
        self.say(f"[{self.done}/{self.total}] {cell.name}: {result} ({seconds:.0f}s)")
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def _run_cells(spec: Spec, spec_file, overrides, todo: list[Cell], sweep_dir: Path, record: dict,
               slots: list[dict], force: bool, runs_dir, echo: Callable) -> list[str]:
    """Run ``todo`` on ``slots``, recording each exit in the sweep's record; return the failed cells' names."""
    progress = _Report(todo, sweep_dir, record, echo)
    runner = _Runner(slots)

    def submit(pool, cell: Cell):
        cell_dir = sweep_dir / cell.name
        resume = not force and RunDir(cell_dir).started()  # the engine refuses to restart without it
        cmd = cell_command(spec_file, overrides, cell, cell_dir, resume=resume, force=force, runs_dir=runs_dir,
                           imports=policy_options())
        return pool.submit(runner.run, cell, cmd, cell_dir, progress.started)

    # with several slots, a teacher still to be trained (from_spec) is trained once, by the first cell alone
    batches = [todo]
    if len(slots) > 1 and len(todo) > 1 and _teacher_pending(spec, runs_dir):
        progress.say("the first cell runs alone: it trains the teacher (teacher.from_spec) that the other "
                     "cells share")
        batches = [todo[:1], todo[1:]]
    previous = _sigterm_as_interrupt()
    futures: dict = {}
    handled: set = set()
    try:
        with ThreadPoolExecutor(max_workers=len(slots)) as pool:
            try:
                for batch in batches:
                    batch_futures = {submit(pool, cell): cell for cell in batch}
                    futures.update(batch_futures)
                    for future in as_completed(batch_futures):
                        handled.add(future)
                        progress.ended(futures[future], *future.result())
            except KeyboardInterrupt:
                progress.say("interrupted: stopping the running cells (each writes a checkpoint first)...")
                runner.interrupt()
                for future, cell in futures.items():
                    if future not in handled:
                        progress.ended(cell, *future.result())
                write_grid(sweep_dir, echo=echo)
                raise
    finally:
        _restore_sigterm(previous)
        progress.close()
    return progress.failed


def _sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C while the sweep runs, so its cells are stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
