"""The Runs and Sweeps tabs without Gradio: the runs folder as tables, curves, progress and log tails.

The runs folder is the source of truth: a run is a directory with a summary (written by the trainer:
:class:`~kdgraph.app.rundir.RunDir`) or one the UI launched (see :mod:`kdgraph.ui.jobs`); a sweep is a
directory with a sweep record (:mod:`kdgraph.app.grid`). The job records (plain dicts from :meth:`JobManager.snapshot`) add what only the launcher
knows: queued, running or stopping, the exit status, the GPUs.
"""
from __future__ import annotations

import html
import re
import shlex
import time
from pathlib import Path

import yaml

from kdgraph.app import charts
from kdgraph.app.format import duration, pct
from kdgraph.app.grid import SWEEP_FILE, grid_table
from kdgraph.app.launch import failure_reason
from kdgraph.app.rundir import STOPPED, RunDir
from kdgraph.errors import UserError

from .jobs import ACTIVE, LAUNCH_SPEC, OUTPUT_LOG, RECENT_SECONDS, check_name, run_path

RUN_HEADERS = ["run", "status", "epochs", "best top-1", "latest top-1", "teacher top-1", "student", "teacher",
               "methods", "device", "elapsed", "exit"]
RESUMABLE = ("stopped", "failed", "killed", "interrupted", "cancelled")
LOSS_KEYS = ("loss", "test_loss")
ACCURACY_KEYS = ("train_top1", "test_top1", "test_top5")


def tail(path: str | Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ("" when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def log_html(text: str, elem_class: str = "log-tail") -> str:
    """A log tail as a scroll box that stays at its end (new lines appear at the bottom, in view, however
    long the earlier attempts' output was); the launcher's ``=== `` attempt headers stand out."""
    from kdgraph.app.launch import HEADER

    lines = [f"<b>{html.escape(ln)}</b>" if ln.startswith(HEADER) else html.escape(ln) for ln in text.splitlines()]
    body = "\n".join(lines) if lines else "(no output yet)"
    return (f'<div class="{elem_class}" style="display:flex;flex-direction:column-reverse;overflow:auto;'
            f'max-height:330px;border:1px solid #ddd;border-radius:6px;background:#fafafa">'
            f'<pre style="margin:0;padding:8px 10px;font-size:12px;line-height:1.35;white-space:pre-wrap;'
            f'word-break:break-word">{body}</pre></div>')


def run_log(run_dir: str | Path) -> Path:
    """The file with a run's output: the launcher's ``output.log``, else the trainer's log."""
    run_dir = Path(run_dir)
    return run_dir / OUTPUT_LOG if (run_dir / OUTPUT_LOG).exists() else RunDir(run_dir).log_file


# ------------------------------------------------------------------------------------------------ runs
def _named(name: str) -> bool:
    try:
        check_name(name)
    except UserError:
        return False
    return True


def run_names(runs_dir: str | Path, jobs: dict[str, dict]) -> list[str]:
    """Runs of the folder, those running or queued first, then the most recently active: directories
    with a summary or launched by
    the UI (sweep directories are not runs; their cells are listed in the Sweeps tab), named as a spec's
    ``name`` can be (:func:`~kdgraph.ui.jobs.check_name`: what :func:`run_view` accepts)."""
    runs_dir = Path(runs_dir)
    found: dict[str, tuple[bool, float]] = {}
    now = time.time()
    if runs_dir.is_dir():
        for d in runs_dir.iterdir():
            known = jobs.get(d.name, {}).get("kind") == "run"
            rd = RunDir(d)
            if _named(d.name) and d.is_dir() and not (d / SWEEP_FILE).exists() and (rd.is_run() or known):
                stamps = [p.stat().st_mtime for p in (rd.summary_file, d / OUTPUT_LOG, d) if p.exists()]
                latest = max(stamps + [jobs.get(d.name, {}).get("submitted") or 0])
                job = jobs.get(d.name)
                active = (job["state"] in ACTIVE) if job else \
                    (rd.status() == "running" and now - rd.last_write() < RECENT_SECONDS)
                found[d.name] = (active, latest)
    return sorted(found, key=lambda n: (not found[n][0], -found[n][1], n))


def run_status(summary: dict, job: dict | None) -> str:
    """queued, running, stopping (the launcher's word while it acts), else the trainer's status --
    finished, stopped, failed -- or, for a process that ended without saying so in its summary, what its
    exit status tells: killed, stopped, failed, or interrupted when the status is unknown (it ended while
    no UI watched it)."""
    status = summary.get("status")
    if job and job["state"] in ACTIVE:
        return job["state"]
    if job and job["state"] == "cancelled" and not status:
        return "cancelled"
    if job and job["state"] == "ended" and status in (None, "running"):
        code = job.get("exit")
        if code is None:
            return "interrupted"
        if job.get("killed") or code < 0:
            return "killed"
        if code == STOPPED:
            return "stopped"
        return "failed" if code != 0 else "finished"
    return status or "unknown"


def _device(job: dict | None, summary: dict) -> str:
    """Where a run trains, in torch's words as the UI's process sees the GPUs: ``cpu``, ``cuda:1``
    (``cuda:0, cuda:1`` for several); a run the UI did not start: its summary's ``device``."""
    if job and job.get("assigned") is not None and job["state"] != "queued":
        return ", ".join(f"cuda:{g}" for g in job["assigned"]) or "cpu"
    if job and job["state"] == "queued":
        gpus = job.get("gpus")
        return "any GPU" if gpus is None else (", ".join(f"cuda:{g}" for g in gpus) or "cpu")
    return summary.get("device") or ""


def run_record(runs_dir: str | Path, name: str, job: dict | None) -> dict:
    """What the runs table and the run view show about one run."""
    rd = RunDir(Path(runs_dir) / name)
    summary = rd.summary()
    return {"name": name, "status": run_status(summary, job), "summary": summary,
            "epochs_done": summary.get("epochs_done"), "epochs": summary.get("epochs"),
            "best_top1": rd.best_top1(summary), "final_top1": summary.get("final_top1"),
            "teacher_top1": summary.get("teacher_top1"), "student": summary.get("student"),
            "teacher": summary.get("teacher"), "methods": summary.get("methods") or [],
            "device": _device(job, summary), "wall_seconds": summary.get("wall_seconds"),
            "exit": job.get("exit") if job and job["state"] == "ended" else None,
            "resumable": rd.last.exists() or (rd.path / LAUNCH_SPEC).exists()}


def runs_table(runs_dir: str | Path, jobs: dict[str, dict]) -> list[list[str]]:
    """One row of :data:`RUN_HEADERS` per run of :func:`run_names`."""
    rows = []
    for name in run_names(runs_dir, jobs):
        r = run_record(runs_dir, name, jobs.get(name))
        epochs = f"{r['epochs_done'] if r['epochs_done'] is not None else 0}/{r['epochs'] or '?'}"
        rows.append([name, r["status"], epochs, pct(r["best_top1"]), pct(r["final_top1"]),
                     pct(r["teacher_top1"]), r["student"] or "", r["teacher"] or "", "+".join(r["methods"]),
                     r["device"], duration(progress(r["summary"], [], jobs.get(name))["elapsed"]),
                     "" if r["exit"] is None else str(r["exit"])])
    return rows


def progress(summary: dict, metrics: list[dict], job: dict | None, now: float | None = None) -> dict:
    """``{"epoch", "epochs", "elapsed", "remaining"}`` in seconds. Elapsed is the wall time of the job's
    process (from its start to now, or to its end) plus its earlier attempts -- one clock, so it never goes
    back when the run stops (the summary's ``wall_seconds`` counts training only, without the start-up) --
    and the summary's ``wall_seconds`` for a run the UI did not start. Remaining is the mean time of the
    last epochs (up to 5) times the epochs left (None before the first epoch has ended, and once the run
    is not active)."""
    now = time.time() if now is None else now
    done = summary.get("epochs_done")
    done = len(metrics) if done is None else done
    total = summary.get("epochs")
    active = bool(job and job["state"] in ("running", "stopping") and job.get("started"))
    if active:
        elapsed = (job.get("base_seconds") or 0.0) + now - job["started"]
        recent = [m["seconds"] for m in metrics if isinstance(m.get("seconds"), (int, float))][-5:]
        per_epoch = sum(recent) / len(recent) if recent else None
        remaining = per_epoch * max(total - done, 0) if per_epoch is not None and total else None
    else:
        elapsed, remaining = summary.get("wall_seconds"), None
        if job and job.get("started") and job.get("ended") and job["state"] == "ended":
            process = (job.get("base_seconds") or 0.0) + max(job["ended"] - job["started"], 0.0)
            elapsed = max(process, elapsed) if isinstance(elapsed, (int, float)) else process
    return {"epoch": done, "epochs": total, "elapsed": elapsed, "remaining": remaining}


def progress_text(p: dict, status: str) -> str:
    """``epoch 3/15 · elapsed 0:00:42 · about 0:02:10 left``."""
    parts = [f"epoch {p['epoch']}/{p['epochs'] or '?'}"]
    if p["elapsed"] is not None:
        parts.append(f"elapsed {duration(p['elapsed'])}")
    if p["remaining"] is not None:
        parts.append(f"about {duration(p['remaining'])} left")
    elif status in ("running", "stopping"):
        parts.append("time left: after the first epoch")
    return " · ".join(parts)


def term_weights(spec: dict | None) -> dict[str, tuple[float, float]]:
    """``{term name: (weight, warmup epochs)}`` of a run's spec ``loss:`` list (names as in its metrics:
    :func:`kdgraph.distiller.term_names`; an omitted weight is the method's canonical one); {} when unknown."""
    from kdgraph.distiller import term_names

    from .forms import method_class

    loss = (spec or {}).get("loss") if isinstance(spec, dict) else None
    if loss is None and isinstance(spec, dict) and "name" in spec:
        loss = [{"method": "ce"}]
    if not isinstance(loss, list) or not all(isinstance(t, dict) and isinstance(t.get("method"), str) for t in loss):
        return {}
    out = {}
    for name, term in zip(term_names(loss), loss):
        weight = term.get("weight")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            cls = method_class(term["method"])
            weight = getattr(cls, "default_weight", 1.0) if cls is not None else 1.0
        warmup = term.get("warmup_epochs") or 0
        out[name] = (float(weight), float(warmup) if isinstance(warmup, (int, float)) else 0.0)
    return out


def term_label(name: str, weight: float, warmup: float) -> str:
    """``1000·at``; ``≈1000·at`` for a term warmed up (its weight is the epoch's average estimate)."""
    return f"{'≈' if warmup > 0 else ''}{weight:g}·{name}"


def curves(metrics: list[dict], weights: dict[str, tuple[float, float]] | None = None,
           exact: bool = False) -> tuple[list[dict], list[dict]]:
    """Long-format rows ``{"epoch", "value", "series"}`` for the loss plot (train loss, each term, test loss)
    and the accuracy plot (train and test top-1, test top-5).

    With the run's ``weights`` (:func:`term_weights`), each term is drawn as its weighted contribution to
    ``loss`` (the metrics hold the unweighted term), labelled ``WEIGHT·NAME`` -- the parts add up to the
    total; a term with ``warmup_epochs`` w counts ``weight·min(1, (epoch - 0.5)/w)`` (the epoch's average
    weight; with ``exact``, for rows at a point in training such as ``steps.jsonl``'s, ``min(1, epoch/w)``)
    and its label starts with ≈. A term without a known weight keeps its ``loss/NAME`` label."""
    loss, acc = [], []
    weights = weights or {}
    for m in metrics:
        for key, value in m.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith("loss/") and key[5:] in weights:
                weight, warmup = weights[key[5:]]
                at = m["epoch"] if exact else m["epoch"] - 0.5
                factor = weight * min(1.0, max(at, 0.0) / warmup) if warmup > 0 else weight
                loss.append({"epoch": m["epoch"], "value": float(value) * factor,
                             "series": term_label(key[5:], weight, warmup)})
            elif key in LOSS_KEYS or key.startswith("loss/"):
                loss.append({"epoch": m["epoch"], "value": float(value), "series": key})
            elif key in ACCURACY_KEYS:
                acc.append({"epoch": m["epoch"], "value": float(value), "series": key})
    return loss, acc


def _series(rows: list[dict], smoothing: float = 0.0) -> list[charts.Series]:
    """Chart series from long-format rows, in order of appearance; with ``smoothing``, each series is
    drawn smoothed over its faint raw values."""
    grouped: dict[str, tuple[list, list]] = {}
    for r in rows:
        xs, ys = grouped.setdefault(r["series"], ([], []))
        xs.append(r["epoch"])
        ys.append(r["value"])
    out = []
    for k, (label, (xs, ys)) in enumerate(grouped.items()):
        color = charts.PALETTE[k % len(charts.PALETTE)]
        if smoothing > 0:
            out.append(charts.Series(label, xs, ys, color=color, faint=True))
            ys = charts.smooth(ys, smoothing)
        out.append(charts.Series(label, xs, ys, color=color, dash="4 3" if label == "test_loss" else ""))
    return out


def epoch_charts(view: dict) -> tuple[str, str]:
    """The loss and accuracy charts (SVG) of a :func:`run_view`: one point per epoch."""
    loss = charts.line_chart(_series(view["loss"]), title="loss per epoch: the terms as weighted in it (≈: warm-up)",
                             y_title="loss", elem_class="loss-chart")
    acc = charts.line_chart(_series(view["accuracy"]), title="accuracy (%)", y_title=accuracy_title(view["accuracy"]),
                            elem_class="accuracy-chart")
    return loss, acc


def step_chart(view: dict, smoothing: float = 0.0) -> str:
    """The training loss every ``log.every`` steps (``steps.jsonl``), the terms weighted, optionally smoothed."""
    loss, _ = curves(view["steps"], view["weights"], exact=True)
    every = view.get("log_every")
    return charts.line_chart(_series(loss, smoothing), title="training loss per step" + (
        f" (mean of every {every} steps)" if every else ""), y_title="loss", elem_class="step-chart",
        empty="no step rows yet: one every log.every steps (steps.jsonl)")


METRICS = {"test_top1": "test top-1 (%)", "train_top1": "train top-1 (%)", "test_top5": "test top-5 (%)",
           "test_loss": "test loss", "loss": "training loss per epoch", "step:loss": "training loss per step"}


def compare_metrics(runs_dir: str | Path, names: list[str]) -> list[tuple[str, str]]:
    """``(label, key)`` of what runs ``names`` logged: :data:`METRICS`, then each term unweighted, per epoch
    (``loss/NAME``) and per step (``step:loss/NAME``)."""
    keys: dict[str, None] = {}
    for name in names:
        try:
            rd = RunDir(Path(runs_dir) / check_name(name))
        except UserError:
            continue
        for row in rd.metrics()[:1]:
            keys.update(dict.fromkeys(k for k in row if k in METRICS or k.startswith("loss/")))
        for row in rd.steps()[:1]:
            keys.update(dict.fromkeys("step:" + k for k in row if k == "loss" or k.startswith("loss/")))
    known = [(label, k) for k, label in METRICS.items() if k in keys or k == "test_top1"]
    terms = [(f"{k[5:]} (unweighted, per epoch)" if not k.startswith("step:") else
              f"{k[10:]} (unweighted, per step)", k) for k in keys if k not in METRICS]
    return known + terms


def compare_chart(runs_dir: str | Path, names: list[str], metric: str, smoothing: float = 0.0) -> str:
    """One line per run of ``metric`` (a key of :func:`compare_metrics`); step metrics smoothed by ``smoothing``."""
    series, step = [], metric.startswith("step:")
    key = metric[5:] if step else metric
    for k, name in enumerate(dict.fromkeys(names)):
        try:
            rd = RunDir(Path(runs_dir) / check_name(name))
        except UserError:
            continue
        rows = rd.steps() if step else rd.metrics()
        pts = [(r["epoch"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        color = charts.PALETTE[k % len(charts.PALETTE)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if step and smoothing > 0:
            series.append(charts.Series(name, xs, ys, color=color, faint=True))
            ys = charts.smooth(ys, smoothing)
        series.append(charts.Series(name, xs, ys, color=color))
    label = dict((v, lab) for lab, v in compare_metrics(runs_dir, names)).get(metric, metric)
    return charts.line_chart(series, title=f"{label}: {len(series)} run(s) compared", y_title=label,
                             elem_class="compare-chart", empty="select runs with this metric to compare")


def tensorboard_command(runs_dir: str | Path, names: list[str]) -> str | None:
    """The command that opens TensorBoard on the runs' event folders (one run: its ``tb/``; several:
    ``--logdir_spec NAME:DIR,...``), or None when none has TensorBoard events."""
    dirs = []
    for name in dict.fromkeys(names):
        try:
            tb = RunDir(Path(runs_dir) / check_name(name)).tensorboard_dir
        except UserError:
            continue
        if tb.is_dir():
            dirs.append((name, tb.resolve()))
    if not dirs:
        return None
    if len(dirs) == 1:
        return f"tensorboard --logdir {shlex.quote(str(dirs[0][1]))}"
    return "tensorboard --logdir_spec " + shlex.quote(",".join(f"{n}:{d}" for n, d in dirs))


def accuracy_title(rows: list[dict]) -> str:
    """The accuracy plot's y title from the series drawn: ``top-1 (%)`` or ``top-1 / top-5 (%)``."""
    top5 = any(r["series"].endswith("top5") for r in rows)
    return "top-1 / top-5 (%)" if top5 else "top-1 (%)"


TEACHER_FIRST = re.compile(r"teacher: training (\S+) first \(from_spec\) into (.+?)\s*$", re.M)


def teacher_first(log: str | Path, runs_dir: str | Path) -> str | None:
    """While a student's teacher trains first (``from_spec``), a line about it -- the teacher run's name and
    epoch from the directory the engine's log line names -- else None."""
    matches = TEACHER_FIRST.findall(tail(log, 200))
    if not matches:
        return None
    name, where = matches[-1]
    tdir = Path(where)
    summary = RunDir(tdir).summary()
    done = summary.get("epochs_done")
    done = len(RunDir(tdir).metrics()) if done is None and tdir.is_dir() else (done or 0)
    total = summary.get("epochs") or "?"
    line = f"training its teacher first: **{name}**, epoch {done}/{total}"
    try:
        inside = tdir.resolve().parent == Path(runs_dir).resolve()
    except OSError:
        inside = False
    if inside:
        line += f" — select run `{tdir.name}` to follow it"
    else:
        line += f" (in {tdir})"
    return line


def chance_note(summary: dict) -> str | None:
    """A warning when the teacher's top-1 is at or below chance level + 2 points (100 / classes; the number
    of classes from the dataset registry, when it says), else None."""
    top1, dataset = summary.get("teacher_top1"), summary.get("dataset")
    if not isinstance(top1, (int, float)) or not isinstance(dataset, str):
        return None
    try:
        from kdgraph.data import DATASETS

        classes = DATASETS.meta(dataset).get("num_classes")
    except Exception:  # noqa: BLE001 -- an unknown or custom dataset: no check
        return None
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        return None
    chance = 100.0 / classes
    if top1 > chance + 2:
        return None
    return (f"⚠ the teacher is at chance level ({top1:.2f}% top-1, chance {chance:.2f}% with {classes} classes) — "
            f"is its checkpoint right?")


def _spec_data(path: Path) -> dict | None:
    from kdgraph import spec as specs

    try:
        data = specs.load_yaml(path)[0][0]  # size, nesting and alias limits
    except UserError:
        return None
    return data if isinstance(data, dict) else None


def run_view(runs_dir: str | Path, name: str, job: dict | None, now: float | None = None) -> dict:
    """Everything about one run: ``name``, ``status``, ``exit`` (None while unknown), ``progress`` (see
    :func:`progress`), ``markdown`` (status, progress, accuracies, the error of a failure), ``loss`` and
    ``accuracy`` (curve rows), ``metrics`` (the run's metrics rows), ``log`` (its tail), ``summary``,
    ``spec`` (YAML text), ``can_stop`` and ``can_resume``.

    ``name`` must name a directory of the runs folder (:func:`~kdgraph.ui.jobs.check_name`): it may come
    from a page's free text or the API, and must not reach files elsewhere."""
    rd = RunDir(run_path(runs_dir, name))
    if not rd.path.is_dir():
        raise UserError(f"no run {name!r} in {runs_dir}")
    record = run_record(runs_dir, name, job)
    summary, status = record["summary"], record["status"]
    metrics = rd.metrics()
    lines = [f"### {name}: {status}" + (f" (exit status {record['exit']})" if record["exit"] is not None else "")]
    log = run_log(rd.path)
    lines.append(progress_text(progress(summary, metrics, job, now), status))
    if status in ACTIVE and not metrics:
        first = teacher_first(log, runs_dir)
        if first:
            lines.append(first)
    final = "final top-1" if status == "finished" else "latest top-1"
    accuracies = [f"{label} {pct(record[key])}%" for key, label in
                  [("best_top1", "best top-1"), ("final_top1", final), ("teacher_top1", "teacher top-1")]
                  if record[key] is not None]
    if accuracies:
        lines.append(" · ".join(accuracies))
    chance = chance_note(summary)
    if chance:
        lines.append(chance)
    if record["device"]:
        lines.append(f"device: {record['device']}")
    if status in ("failed", "killed", "interrupted"):
        reason = summary.get("error") or failure_reason(log) or (job or {}).get("note") or ""
        lines.append(f"**{status}**" + (f": {reason}" if reason else "") + " — see the log below")
    if job and job.get("note"):
        lines.append(job["note"])
    spec = rd.spec_file if rd.spec_file.exists() else rd.path / LAUNCH_SPEC
    data = _spec_data(spec) if spec.exists() else None
    weights = term_weights(data) if data else {}
    board = tensorboard_command(runs_dir, [name])
    if board:
        lines.append(f"TensorBoard: `{board}`")
    loss, acc = curves(metrics, weights or None)
    every = ((data or {}).get("log") or {}).get("every") if isinstance((data or {}).get("log"), dict) else None
    return {"name": name, "status": status, "exit": record["exit"], "progress": progress(summary, metrics, job, now),
            "markdown": "\n\n".join(lines), "loss": loss, "accuracy": acc, "metrics": metrics, "steps": rd.steps(),
            "weights": weights, "log_every": every, "log": tail(log, 200), "summary": summary,
            "spec": spec.read_text() if spec.exists() else "", "can_stop": status in ACTIVE,
            "can_resume": status in RESUMABLE and record["resumable"], "wiring": rd.wiring_file.is_file()}


# ---------------------------------------------------------------------------------------------- sweeps
def sweep_names(runs_dir: str | Path, jobs: dict[str, dict]) -> list[str]:
    """Sweep directories (with a sweep record, or launched by the UI), most recent first (with names
    :func:`sweep_view` accepts)."""
    runs_dir = Path(runs_dir)
    found: dict[str, float] = {}
    if runs_dir.is_dir():
        for d in runs_dir.iterdir():
            if _named(d.name) and d.is_dir() and \
                    ((d / SWEEP_FILE).exists() or jobs.get(d.name, {}).get("kind") == "sweep"):
                found[d.name] = max(p.stat().st_mtime for p in (d / SWEEP_FILE, d) if p.exists())
    return sorted(found, key=lambda n: (-found[n], n))


def grid_html(header: list[str], rows: list[list[str]]) -> str:
    """A sweep's grid of best top-1 as an HTML table (nothing until the sweep has written its grid)."""
    if not header:
        return ""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return (f'<table class="sweep-grid" style="border-collapse:collapse;font-size:13px"><thead><tr>{head}</tr>'
            f'</thead><tbody>{body}</tbody></table><style>.sweep-grid td,.sweep-grid th{{padding:3px 10px;'
            f'border:1px solid #ddd;text-align:right}}.sweep-grid th{{background:#f3f3f3}}</style>')


def sweep_view(runs_dir: str | Path, name: str, job: dict | None) -> dict:
    """The sweep panel: ``markdown`` (state and cell counts), ``header`` and ``rows`` of the grid of best
    top-1 (filled in as cells finish), ``heatmap`` (its path once the sweep is done, else None), ``log``.
    ``name`` must name a directory of the runs folder (as for :func:`run_view`)."""
    sweep_dir = run_path(runs_dir, name)
    if job is None and not sweep_dir.is_dir():
        raise UserError(f"no sweep {name!r} in {runs_dir}")
    state = job["state"] if job else "not started here"
    if job and job["state"] == "ended":
        state = f"ended (exit status {job['exit']})" if job.get("exit") is not None else "ended"
    active = bool(job and job["state"] in ACTIVE)
    lines = [f"### sweep {name}: {state}"]
    header, rows = [], []
    try:
        grid = grid_table(sweep_dir)
    except UserError:
        lines.append("waiting for the sweep to write its grid (sweep.json)…")
    else:
        header, rows = grid["header"], grid["rows"]
        states = grid["cell_states"]  # every cell (a seed axis is aggregated in the rows)
        counts = {s: states.count(s) for s in ("finished", "unfinished", "failed", "not run") if s in states}
        lines.append(f"{len(states)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    heatmap = sweep_dir / "heatmap.png"
    return {"markdown": "\n\n".join(lines), "header": header, "rows": rows,
            "heatmap": str(heatmap) if heatmap.exists() and not active else None,
            "log": tail(sweep_dir / OUTPUT_LOG, 200), "can_stop": active}
