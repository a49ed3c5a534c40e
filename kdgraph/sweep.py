"""Grid search: a spec's ``sweep:`` block maps key paths to value lists, and every combination is a run.

::

    sweep:
      loss.1.temperature: [2, 4, 8, 16]           # one key
      "loss.1.weight,loss.0.weight":               # linked keys move together; label = first key's value
        [[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]]

The grid is the product of the entries (first = table rows, second = table columns, further entries are
folded into the row label). Each cell is an ordinary ``kdgraph run`` in ``RUNS_DIR/<spec name>/<cell>``,
started as a subprocess whose output goes to the cell's ``sweep.log``. The sweep directory holds
``sweep.json`` (keys, values, cells and their last exit codes), so :func:`write_grid` can rebuild
``grid.md``, ``grid.csv`` and ``heatmap.png`` from whatever cells exist, without the spec.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from .errors import SpecError, UserError, did_you_mean
from .report import best_top1, markdown_table, read_json, write_csv
from .spec import Spec, dotted, load, schema

SWEEP_FILE = "sweep.json"
LOG_FILE = "sweep.log"
STOPPED = 130  # the engine's exit code when stopped by SIGINT/SIGTERM
_MISSING = object()


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
        return [f"{path}={yaml_value(value)}" for path, value in self.values.items()]


def parse_path(text: str) -> tuple:
    """``"loss.1.weight"`` -> ``("loss", 1, "weight")``, the convention of ``--set``."""
    parts = text.strip().split(".")
    if not text.strip() or any(not p for p in parts):
        raise UserError(f"sweep: {text!r} is not a key path like loss.1.weight")
    return tuple(int(p) if p.isdigit() else p for p in parts)


def format_value(value: Any) -> str:
    """A short, stable text for a swept value (used in cell names and table headers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return str(value) if not isinstance(value, float) or math.isfinite(value) else yaml_value(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def yaml_value(value: Any) -> str:
    """``value`` as YAML flow text that ``--set`` parses back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


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
def _resolve(sch: dict, root: dict) -> dict:
    while "$ref" in sch:
        sch = root["$defs"][sch["$ref"].rsplit("/", 1)[-1]]
    return sch


def _method_params(term: Any) -> list[str]:
    """The parameters of a loss term's method (besides the schema's method, weight, positions...)."""
    from .losses import LOSSES, term_params

    try:
        return list(term_params(LOSSES.get(term["method"])))
    except (UserError, KeyError, TypeError):
        return []


def spec_paths(data: dict) -> tuple[list[str], set[str]]:
    """``(paths, open)``: every key path a ``--set`` may change in ``data`` (its own keys, the schema's,
    loss parameters), and those that are free-form mappings (``data.options``, ``student.kwargs``...)
    where any key goes."""
    root = schema()
    out: list[str] = []
    free: set[str] = set()

    def walk(node: Any, sch: dict, prefix: tuple) -> None:
        sch = _resolve(sch, root)
        if isinstance(node, list):
            children = [(i, item, sch.get("items", {})) for i, item in enumerate(node)]
        elif isinstance(node, dict) or (node is _MISSING and "properties" in sch):
            props = sch.get("properties", {})
            if sch.get("type") == "object" and not props:
                free.add(dotted(prefix))
            keys = list(node) if isinstance(node, dict) else []
            if prefix[:1] == ("loss",) and len(prefix) == 2:
                keys += _method_params(node)
            keys += list(props)
            children = [(k, node.get(k, _MISSING) if isinstance(node, dict) else _MISSING, props.get(k, {}))
                        for k in dict.fromkeys(keys)]
        else:
            if node is _MISSING and sch.get("type") == "object":
                free.add(dotted(prefix))
            return
        for key, child, child_sch in children:
            path = prefix + (key,)
            if path[0] not in ("sweep", "extends"):
                out.append(dotted(path))
                walk(child, child_sch, path)

    walk(data, root, ())
    return out, free


def check_paths(spec: Spec, axes: Iterable[Axis]) -> None:
    """Raise a :class:`SpecError` naming each swept path the spec does not have, with suggestions."""
    known, free = spec_paths(spec.data)
    problems = []
    for axis in axes:
        for path in axis.paths:
            if dotted(path) not in known and not any(dotted(path[:i]) in free for i in range(1, len(path))):
                hint = did_you_mean(dotted(path), known) or " (lists are indexed from 0, e.g. loss.1.weight)"
                problems.append((*spec.where(("sweep", axis.key, "<key>")), f"sweep.{axis.key}",
                                 f"no key path {dotted(path)!r} in the spec{hint}"))
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
def engine_command() -> list[str]:
    """The command that runs one spec (``python -m kdgraph``); tests replace it with a fake engine."""
    return [sys.executable, "-m", "kdgraph"]


def cell_command(spec_file: str | Path, overrides: Sequence[str], cell: Cell, cell_dir: Path, *,
                 resume: bool = False, runs_dir: str | Path | None = None) -> list[str]:
    """The ``kdgraph run`` command line of one cell (``--resume`` continues an unfinished cell)."""
    cmd = [*engine_command(), "run", str(spec_file)]
    for override in [*overrides, *cell.overrides, "sweep=null"]:
        cmd += ["--set", override]
    cmd += ["--out", str(cell_dir)]
    if runs_dir is not None:  # where a from_spec teacher is trained
        cmd += ["--runs-dir", str(runs_dir)]
    if resume:
        cmd.append("--resume")
    return cmd


def cell_status(cell_dir: Path) -> str | None:
    """The ``status`` in a cell's ``summary.json``, or None without one."""
    summary = read_json(Path(cell_dir) / "summary.json")
    return summary.get("status") if summary else None


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


_ERROR_LINE = re.compile(r"^(kdgraph: error:|[\w.]*(Error|Exception|Interrupt)\b|\S+:\d+:\d+: )")


def failure_reason(log: Path) -> str:
    """The error message of the last attempt in a cell's ``sweep.log`` (else its last line)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("=== ")]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    return (errors or lines or [""])[-1][:300]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class _Runner:
    """Runs cells on a pool of slots; stops cleanly (forwarding SIGINT to the cells) when interrupted."""

    def __init__(self, slots: list[dict]):
        self.slots: queue.Queue = queue.Queue()
        for slot in slots:
            self.slots.put(slot)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}

    def run(self, cell: Cell, cmd: list[str], cell_dir: Path, on_start: Callable,
            fresh: bool = False) -> tuple[int | None, float]:
        """Run one cell (``fresh``: delete its directory first); ``(exit code, seconds)``, exit code None
        when the sweep stopped before the cell started."""
        slot = self.slots.get()
        try:
            if self.stop.is_set():
                return None, 0.0
            if fresh:
                shutil.rmtree(cell_dir, ignore_errors=True)
            cell_dir.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **slot}
            where = f"CUDA_VISIBLE_DEVICES={slot['CUDA_VISIBLE_DEVICES']} " if slot.get("CUDA_VISIBLE_DEVICES") else ""
            start = time.time()
            with open(cell_dir / LOG_FILE, "a") as log:
                log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {where}{shlex.join(cmd)}\n")
                log.flush()
                with self.lock:
                    if self.stop.is_set():
                        return None, 0.0
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=True)
                    self.procs[cell.name] = proc
                on_start(cell, slot)
                code = proc.wait()
            with self.lock:
                self.procs.pop(cell.name, None)
            return code, time.time() - start
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


def run_sweep(spec_file: str | Path, overrides: Sequence[str] = (), *, jobs: int | None = None,
              devices: str | Sequence | None = None, runs_dir: str | Path = "runs", force: bool = False,
              echo: Callable[[str], Any] = print) -> Path:
    """Run every cell of the spec's sweep that is not finished yet, then write the grid; return the sweep dir.

    ``overrides`` (``--set`` texts) apply to every cell. With CUDA, cells run one per GPU at a time
    (``devices`` such as ``"0,1"``, default all visible); on CPU they run one at a time, or ``jobs`` at a
    time (the first cell alone when it must train a ``from_spec`` teacher the others share). Finished cells
    are skipped; an unfinished one continues with ``--resume`` (from its checkpoint when it has one);
    ``force`` deletes each cell's directory and runs it again. A failing cell is recorded (its output is in
    its ``sweep.log``) and the others go on. Ctrl-C (or SIGTERM) stops the running cells after their
    checkpoint, writes the grid and re-raises ``KeyboardInterrupt``.
    """
    from .spec.check import check

    spec = load(spec_file, overrides)
    if not spec.get("sweep"):
        raise UserError(f"{spec_file}: the spec has no sweep: block (key paths mapped to lists of values)")
    axes = parse_sweep(spec["sweep"])
    check_paths(spec, axes)
    problems = check(spec)
    if problems:
        raise SpecError(problems)
    cells = grid_cells(axes)
    slots = _slots(str(spec.data.get("train", {}).get("device", "auto")), jobs, devices)

    sweep_dir = Path(runs_dir) / spec["name"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state = sweep_record(spec["name"], spec_file, overrides, axes, cells, read_json(sweep_dir / SWEEP_FILE))
    _write_json(sweep_dir / SWEEP_FILE, state)

    todo = [c for c in cells if force or cell_status(sweep_dir / c.name) != "finished"]
    shape = " x ".join(str(len(a.values)) for a in axes)
    where = (f"{len(slots)} GPU(s): {', '.join(s['CUDA_VISIBLE_DEVICES'] for s in slots)}"
             if slots[0].get("CUDA_VISIBLE_DEVICES") else f"CPU, {len(slots)} at a time")
    echo(f"sweep {spec['name']}: {len(cells)} cells ({shape}), {len(cells) - len(todo)} finished, "
         f"{len(todo)} to run on {where}; cells in {sweep_dir}")

    failed = _run_cells(spec, spec_file, overrides, todo, sweep_dir, state, slots, force, runs_dir, echo)
    if failed:
        echo(f"{len(failed)} cell(s) failed: {', '.join(failed)} (see each cell's {LOG_FILE})")
    write_grid(sweep_dir, echo=echo)
    return sweep_dir


def _teacher_pending(spec: Spec, runs_dir: str | Path) -> bool:
    """Whether the first cell will train a ``from_spec`` teacher that the other cells then share."""
    teacher = spec.data.get("teacher") or {}
    if not teacher.get("from_spec") or (teacher.get("checkpoint") and Path(teacher["checkpoint"]).exists()):
        return False
    try:
        from .engine import _teacher_spec

        _, teacher_dir = _teacher_spec(spec, Path(runs_dir))
    except Exception:  # noqa: BLE001 - the cell itself reports a broken teacher spec
        return True
    return cell_status(teacher_dir) != "finished"


def _run_cells(spec: Spec, spec_file, overrides, todo: list[Cell], sweep_dir: Path, state: dict,
               slots: list[dict], force: bool, runs_dir, echo: Callable) -> list[str]:
    """Run ``todo`` on ``slots``, recording each exit in ``sweep.json``; return the failed cells' names."""
    bar = _progress(len(todo), echo)
    say = bar.write if bar else echo
    runner = _Runner(slots)
    failed: list[str] = []
    done = 0

    def on_start(cell: Cell, slot: dict) -> None:
        if not bar:
            gpu = f" on GPU {slot['CUDA_VISIBLE_DEVICES']}" if slot.get("CUDA_VISIBLE_DEVICES") else ""
            say(f"start {cell.name}{gpu}")

    def finish(cell: Cell, code: int | None, seconds: float) -> None:
        nonlocal done
        if code is None:  # never started
            return
        done += 1
        state["cells"][cell.name].update(exit=code, ended=time.time(), seconds=round(seconds, 1))
        _write_json(sweep_dir / SWEEP_FILE, state)
        log = sweep_dir / cell.name / LOG_FILE
        if code == 0:
            best = best_top1(sweep_dir / cell.name, read_json(sweep_dir / cell.name / "summary.json") or {})
            result = f"finished, best top-1 {best:.2f}" if best is not None else "finished"
        elif code == STOPPED:
            result = "stopped (the next sweep resumes it)"
        else:
            failed.append(cell.name)
            result = f"FAILED (exit {code}): {failure_reason(log)} [log: {log}]"
        say(f"[{done}/{len(todo)}] {cell.name}: {result} ({seconds:.0f}s)")
        if bar:
            bar.update(1)

    def submit(pool, cell: Cell):
        cell_dir = sweep_dir / cell.name
        started = (cell_dir / "summary.json", cell_dir / "checkpoints" / "last.pt")
        resume = not force and any(p.exists() for p in started)  # the engine refuses to restart without it
        cmd = cell_command(spec_file, overrides, cell, cell_dir, resume=resume, runs_dir=runs_dir)
        return pool.submit(runner.run, cell, cmd, cell_dir, on_start, fresh=force)

    # with several slots, a teacher still to be trained (from_spec) is trained once, by the first cell alone
    batches = [todo]
    if len(slots) > 1 and len(todo) > 1 and _teacher_pending(spec, runs_dir):
        say("the first cell runs alone: it trains the teacher (teacher.from_spec) that the other cells share")
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
                        finish(futures[future], *future.result())
            except KeyboardInterrupt:
                say("interrupted: stopping the running cells (each writes a checkpoint first)...")
                runner.interrupt()
                for future, cell in futures.items():
                    if future not in handled:
                        finish(cell, *future.result())
                write_grid(sweep_dir, echo=echo)
                raise
    finally:
        _restore_sigterm(previous)
        if bar:
            bar.close()
    return failed


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


# ---------------------------------------------------------------------------------------- the table
def cell_result(cell_dir: Path, record: dict) -> tuple[str, float | None]:
    """``(state, best top-1)`` of a cell; state is finished, unfinished, failed or not run.

    A failed last attempt (recorded in ``sweep.json``) counts unless the summary was written after it
    (the cell was fixed by hand, e.g. ``kdgraph run --resume``).
    """
    summary_file = Path(cell_dir) / "summary.json"
    summary = read_json(summary_file)
    code = record.get("exit")
    failed_at = (record.get("ended") or 0.0) if code not in (None, 0, STOPPED) else None
    if summary and (failed_at is None or summary_file.stat().st_mtime > failed_at):
        status = summary.get("status")
        if status == "failed":
            return "failed", None
        best = best_top1(cell_dir, summary)
        if status == "finished":
            return "finished", best
        return ("unfinished", best) if best is not None else ("not run", None)
    return ("failed", None) if failed_at is not None else ("not run", None)


def _cell_text(state: str, best: float | None) -> str:
    if state == "failed":
        return "failed"
    if best is None:
        return ""
    return f"{best:.2f}" + ("*" if state == "unfinished" else "")


def grid_table(sweep_dir: str | Path) -> dict:
    """The grid of a sweep dir as ``{"header", "rows" (texts), "values" (floats or None), "states", ...}``."""
    sweep_dir = Path(sweep_dir)
    info = read_json(sweep_dir / SWEEP_FILE)
    if not info:
        raise UserError(f"{sweep_dir}: no {SWEEP_FILE} here (not a sweep directory)")
    labels, vlabels = info["labels"], info["value_labels"]
    by_index = {tuple(c["index"]): (name, c) for name, c in info["cells"].items()}
    n_cols = len(vlabels[1]) if len(labels) > 1 else 1
    extra = list(range(2, len(labels)))
    row_keys = list(itertools.product(range(len(vlabels[0])), *(range(len(vlabels[k])) for k in extra)))

    header = [", ".join([labels[0]] + [labels[k] for k in extra]) + (f" \\ {labels[1]}" if len(labels) > 1 else "")]
    header += list(vlabels[1]) if len(labels) > 1 else ["best top-1"]
    rows, values, states = [], [], []
    for rk in row_keys:
        label = ", ".join([vlabels[0][rk[0]]] + [f"{labels[k]}={vlabels[k][i]}" for k, i in zip(extra, rk[1:])])
        texts, nums, sts = [label], [], []
        for col in range(n_cols):
            index = (rk[0], col, *rk[1:]) if len(labels) > 1 else (rk[0],)
            name, record = by_index[index]
            state, best = cell_result(sweep_dir / name, record)
            texts.append(_cell_text(state, best))
            nums.append(best if state != "failed" else None)
            sts.append(state)
        rows.append(texts)
        values.append(nums)
        states.append(sts)
    return {"name": info["name"], "header": header, "rows": rows, "values": values, "states": states,
            "row_title": header[0].split(" \\ ")[0], "col_title": labels[1] if len(labels) > 1 else ""}


def write_grid(sweep_dir: str | Path, echo: Callable[[str], Any] | None = print) -> str:
    """Rebuild ``grid.md``, ``grid.csv`` and ``heatmap.png`` from the cells there; return the Markdown table."""
    sweep_dir = Path(sweep_dir)
    grid = grid_table(sweep_dir)
    table = markdown_table(grid["header"], grid["rows"])
    notes = []
    if any("unfinished" in s for s in grid["states"]):
        notes.append("\\* unfinished: best top-1 so far.")
    text = f"Best test top-1 (%) of sweep {grid['name']}.\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes)
    (sweep_dir / "grid.md").write_text(text)
    write_csv(sweep_dir / "grid.csv", grid["header"], grid["rows"])
    _heatmap(grid, sweep_dir / "heatmap.png")
    if echo:
        echo(table + ("\n" + "\n".join(notes) if notes else ""))
    return table


def _heatmap(grid: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    vals = np.array([[np.nan if v is None else v for v in row] for row in grid["values"]], dtype=float)
    n_rows, n_cols = vals.shape
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * n_cols, 1.2 + 0.6 * n_rows))
    finite = vals[np.isfinite(vals)]
    image = ax.imshow(np.ma.masked_invalid(vals), cmap="viridis", aspect="auto",
                      vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    if finite.size:
        fig.colorbar(image, ax=ax, label="best test top-1 (%)")
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for r in range(n_rows):
        for c in range(n_cols):
            state, text = grid["states"][r][c], grid["rows"][r][c + 1]
            if state == "failed":
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, facecolor="lightgray", edgecolor="firebrick",
                                       hatch="xx", linewidth=1))
                ax.text(c, r, "failed", ha="center", va="center", color="firebrick", fontweight="bold",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 2})
            elif text:
                ax.text(c, r, text, ha="center", va="center", color="white" if vals[r, c] < mid else "black")
    ax.set_xticks(range(n_cols), grid["header"][1:])
    ax.set_yticks(range(n_rows), [row[0] for row in grid["rows"]])
    ax.set_xlabel(grid["col_title"])
    ax.set_ylabel(grid["row_title"])
    ax.set_title(f"{grid['name']}: best test top-1 (%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
