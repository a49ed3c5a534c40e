"""Reports over run directories: a table of runs, the original project's results layout, learning curves.

:func:`report` takes run directories or globs (a sweep directory stands for its cells) and writes
``report.md``, ``report.csv`` and ``curves.png``. When the runs include distillation runs, it adds a
pivot laid out like the original project's results tables: one row per teacher/student pair with the
teacher's accuracy and the student trained alone (a ``ce``-only run without teacher), one column per
distillation method, each cell the best test top-1.

Runs that differ only in their seed -- the runs of a spec's ``seeds:`` (their summary's ``group``) or the
cells of a sweep over ``train.seed`` -- are aggregated: ``mean ± std (n=K)`` in the pivots and in a table
of their own. A run whose spec has ``expect`` (a published number) is shown beside it, with the difference.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import UserError
from .format import duration, markdown_table, mean_std, pct, pct_spread, write_csv
from .grid import SEED_KEY, SWEEP_FILE, read_sweep, write_grid
from .rundir import RunDir

# the original project's column order first; other methods follow in order of appearance
METHOD_ORDER = ["kd", "dkd", "fitnet", "at", "sp", "nst", "pkt", "rkd", "margin_relu"]


# --------------------------------------------------------------------------------------- selection
def select_runs(paths: Iterable[str]) -> tuple[list[Path], list[Path], list[str]]:
    """``(run dirs, sweep dirs, notes)`` for paths or globs; a sweep dir contributes its cells."""
    runs: dict[Path, None] = {}
    sweeps: dict[Path, None] = {}
    notes = []
    for pattern in paths:
        matches = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
        if not matches or not Path(matches[0]).exists():
            notes.append(f"{pattern}: no such file or directory")
            continue
        for match in matches:
            path = Path(match)
            if path.name == RunDir.SUMMARY and path.is_file():  # e.g. the glob runs/*/ + RunDir.SUMMARY
                path = path.parent
            if RunDir(path).is_run():
                runs[path] = None
            elif (path / SWEEP_FILE).is_file():
                sweeps[path] = None
                for name in (read_sweep(path) or {}).get("cells", {}):
                    if RunDir(path / name).is_run():
                        runs[path / name] = None
            elif path.is_dir():
                notes.append(f"{path}: skipped, no {RunDir.SUMMARY} (not a run directory; "
                             f"select the runs inside with {path}/*)")
    return list(runs), list(sweeps), notes


def sweep_seed_groups(sweep_dirs: Iterable[Path]) -> dict[Path, str]:
    """The group of each cell of a sweep over ``train.seed``: the sweep's name and the cell's other values."""
    groups = {}
    for sweep_dir in sweep_dirs:
        info = read_sweep(sweep_dir) or {}
        if SEED_KEY not in info.get("keys", []):
            continue
        for name, cell in info.get("cells", {}).items():
            rest = ",".join(f"{k}={v}" for k, v in cell.get("values", {}).items() if k != SEED_KEY)
            groups[sweep_dir / name] = info["name"] + (f"/{rest}" if rest else "")
    return groups


def _common_parent(dirs: Sequence[Path]) -> Path:
    try:
        parent = Path(os.path.commonpath([str(d.resolve().parent) for d in dirs]))
    except ValueError:  # different drives
        return Path.cwd()
    return parent if parent != Path(parent.anchor) else Path.cwd()


# --------------------------------------------------------------------------------------------- rows
RUN_COLUMNS = ["name", "teacher", "student", "methods", "teacher top-1", "best top-1", "final top-1",
               "epochs", "wall time", "status"]
EXPECT_COLUMNS = ["published", "diff"]  # added when a run has a published number (its spec's expect)
CSV_COLUMNS = ["name", "teacher", "student", "methods", "teacher_top1", "best_top1", "final_top1",
               "epochs_done", "epochs", "wall_seconds", "status", "dataset", "seed", "group", "expected_top1",
               "path"]


def run_record(run_dir: Path, name: str, group: str | None = None) -> dict:
    """The report's facts about one run, from its summary; ``group`` names the runs it repeats with other
    seeds (default: its summary's ``group``, else its own name)."""
    rd = RunDir(run_dir)
    s = rd.summary()
    expect = s.get("expect") if isinstance(s.get("expect"), dict) else None
    return {"name": name, "path": str(run_dir), "teacher": s.get("teacher"), "student": s.get("student"),
            "methods": list(s.get("methods") or []), "teacher_top1": s.get("teacher_top1"),
            "best_top1": rd.best_top1(s), "final_top1": s.get("final_top1"),
            "epochs_done": s.get("epochs_done"), "epochs": s.get("epochs"),
            "wall_seconds": s.get("wall_seconds"), "status": s.get("status") or "unknown",
            "dataset": s.get("dataset"), "seed": s.get("seed"), "group": group or s.get("group") or name,
            "expected_top1": expect.get("top1") if expect else None,
            "expect_metric": (expect.get("metric") or "best_top1") if expect else None,
            "expect_source": expect.get("source") if expect else None}


def _diff(measured: float | None, expected: float | None) -> str:
    return f"{measured - expected:+.2f}" if isinstance(measured, (int, float)) and expected is not None else ""


def _run_row(r: dict, published: bool) -> list[str]:
    epochs = f"{r['epochs_done'] if r['epochs_done'] is not None else '?'}/{r['epochs'] or '?'}"
    row = [r["name"], r["teacher"] or "", r["student"] or "", "+".join(r["methods"]),
           pct(r["teacher_top1"]), pct(r["best_top1"]), pct(r["final_top1"]), epochs,
           duration(r["wall_seconds"]), r["status"]]
    if published:
        row += [pct(r["expected_top1"]), _diff(r.get(r["expect_metric"] or "best_top1"), r["expected_top1"])]
    return row


def seed_groups(records: Sequence[dict]) -> dict[str, list[dict]]:
    """The records by group (runs that differ only in their seed), in order of appearance."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r.get("group") or r.get("name"), []).append(r)
    return groups


GROUP_COLUMNS = ["runs", "teacher", "student", "methods", "seeds", "n", "teacher top-1", "best top-1",
                 "final top-1"]


def group_rows(records: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The table of repeated runs: one row per group of two or more, accuracies as ``mean ± std``, with
    the published number and the difference of the mean from it when the runs have one."""
    groups = [runs for runs in seed_groups(records).values() if len(runs) > 1]
    published = any(r["expected_top1"] is not None for runs in groups for r in runs)
    header = GROUP_COLUMNS + (EXPECT_COLUMNS if published else [])
    rows = []
    for runs in groups:
        first = runs[0]
        finished = [r for r in runs if r["best_top1"] is not None]
        row = [first["group"], first["teacher"] or "", first["student"] or "", "+".join(first["methods"]),
               ",".join(str(r["seed"]) if r["seed"] is not None else "?" for r in runs), str(len(finished)),
               *(pct_spread([r[k] for r in runs]) for k in ("teacher_top1", "best_top1", "final_top1"))]
        if published:
            mean = mean_std([r.get(first["expect_metric"] or "best_top1") for r in runs])[0]
            row += [pct(first["expected_top1"]), _diff(mean, first["expected_top1"])]
        rows.append(row)
    return header, rows


def method_label(methods: Sequence[str]) -> str:
    """The distillation part of a run's loss: its methods other than ``ce``, joined by ``+``."""
    return "+".join(m for m in methods if m != "ce")


def pivot_tables(records: Sequence[dict]) -> list[dict]:
    """Per dataset, the original project's layout: ``{"dataset", "header", "rows"}``; [] without KD runs.

    A cell is the best top-1 of the runs of that pair and method, ``mean ± std (n=K)`` over the seeds of a
    group (the group with the best mean when several: ``(best of N)``; ``*`` when a run is unfinished).
    """
    distilled = [r for r in records if r["teacher"] and method_label(r["methods"]) and r["best_top1"] is not None]
    tables = []
    for dataset in dict.fromkeys(r["dataset"] for r in distilled):
        runs = [r for r in distilled if r["dataset"] == dataset]
        labels = sorted(dict.fromkeys(method_label(r["methods"]) for r in runs),  # stable: others keep their order
                        key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER))
        rows = []
        for teacher, student in dict.fromkeys((r["teacher"], r["student"]) for r in runs):
            pair = [r for r in runs if (r["teacher"], r["student"]) == (teacher, student)]
            teacher_acc = max((r["teacher_top1"] for r in pair if r["teacher_top1"] is not None), default=None)
            alone = [r for r in records if not r["teacher"] and set(r["methods"]) == {"ce"}
                     and r["student"] == student and r["dataset"] == dataset and r["best_top1"] is not None]
            row = [teacher, student, pct(teacher_acc), _best_text(alone)]
            row += [_best_text([r for r in pair if method_label(r["methods"]) == m]) for m in labels]
            rows.append(row)
        tables.append({"dataset": dataset, "header": ["Teacher", "Student", "Teacher acc", "Student acc", *labels],
                       "rows": rows})
    return tables


def _best_text(runs: Sequence[dict]) -> str:
    """The best group of ``runs``: its mean ± std (n=K) over seeds, or its one run's best top-1."""
    if not runs:
        return ""
    groups = list(seed_groups(runs).values())
    best = max(groups, key=lambda g: mean_std([r["best_top1"] for r in g])[0])
    values = [r["best_top1"] for r in best]
    text = pct_spread(values) + (f" (n={len(values)})" if len(values) > 1 else "")
    text += "*" if any(r["status"] != "finished" for r in best) else ""
    return text + (f" (best of {len(groups)})" if len(groups) > 1 else "")


# ------------------------------------------------------------------------------------------- curves
def plot_curves(runs: Sequence[tuple[str, list[dict]]], path: Path) -> bool:
    """Test top-1 and train loss against epoch, one line per run; False when there is nothing to plot."""
    runs = [(name, m) for name, m in runs if m]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, metrics in runs:
        epochs = [m["epoch"] for m in metrics]
        marker = "o" if len(epochs) < 3 else None
        acc_ax.plot(epochs, [m.get("test_top1") for m in metrics], marker=marker, label=name)
        loss_ax.plot(epochs, [m.get("loss") for m in metrics], marker=marker, label=name)
    acc_ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="Test accuracy")
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="Training loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = acc_ax.get_legend_handles_labels()
    ncol = min(len(labels), 4)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    rows = -(-len(labels) // ncol)
    fig.tight_layout(rect=(0, min(0.01 + 0.055 * rows, 0.5), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------- report
def _repeated_runs(records: Sequence[dict], echo: Callable[[str], Any]) -> list[str]:
    """The report.md section of repeated runs (printed too); none when no run was repeated."""
    header, rows = group_rows(records)
    if not rows:
        return []
    table = markdown_table(header, rows)
    echo(f"\nRepeated runs (mean ± std over seeds):\n{table}")
    return [f"## Repeated runs\n\nRuns that differ only in their seed: mean ± std over the seeds (sample standard "
            f"deviation; n: runs with a result).\n\n{table}\n"]


def _report_folder(out: Path) -> Path:
    """``out``, created if needed; a file there, or a folder that cannot be made, is a UserError."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder (report.md, report.csv and curves.png go there)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the report folder {out}: {e.strerror or e}") from None
    return out


def report(paths: list[str], out_dir: str | Path | None = None, echo: Callable[[str], Any] = print) -> dict:
    """Write ``report.md``, ``report.csv`` and ``curves.png`` for the runs in ``paths``; print the tables.

    Returns ``{"out_dir", "runs" (one record per run), "pivots", "grids" (refreshed sweep dirs), "files",
    "notes"}``. ``out_dir`` defaults to the common parent of the runs (or the current directory).
    """
    run_dirs, sweep_dirs, notes = select_runs(paths)
    for note in notes:
        echo(f"note: {note}")
    if not run_dirs:
        raise UserError(f"no runs to report in {' '.join(map(str, paths)) or '(nothing given)'}: "
                        f"give run directories (with a {RunDir.SUMMARY}), sweep directories or globs such as runs/*")
    parent = _common_parent(run_dirs)
    out = _report_folder(Path(out_dir) if out_dir is not None else parent)
    base = out.resolve()

    cells = sweep_seed_groups(sweep_dirs)
    records = [run_record(d, os.path.relpath(d.resolve(), parent), cells.get(d)) for d in run_dirs]
    pivots = pivot_tables(records)

    published = any(r["expected_top1"] is not None for r in records)
    runs_table = markdown_table(RUN_COLUMNS + (EXPECT_COLUMNS if published else []),
                                [_run_row(r, published) for r in records])
    sections = [f"# kdgraph report\n\n{len(records)} run(s); accuracies are test top-1 (%)"
                + ("; published: the number in the run's spec (`expect`), diff: measured - published" if published
                   else "") + f".\n\n{runs_table}\n"]
    echo(runs_table)
    sections += _repeated_runs(records, echo)
    for p in pivots:
        table = markdown_table(p["header"], p["rows"])
        sections.append(f"## Results on {p['dataset']}\n\nStudent acc: the student trained alone (ce only, no "
                        f"teacher); other columns: best top-1 with each distillation method.\n\n{table}\n")
        echo(f"\nResults on {p['dataset']}:\n{table}")
    for sweep_dir in sweep_dirs:
        table = write_grid(sweep_dir, echo=None)
        rel = os.path.relpath(sweep_dir.resolve(), base)
        sections.append(f"## Grid {rel}\n\n{table}\n\n![heatmap]({Path(rel) / 'heatmap.png'})\n")
        echo(f"\nGrid {sweep_dir}:\n{table}")

    if any("*" in section for section in sections[1:]):
        notes.append("\\* an unfinished run: its best top-1 so far")
    notes += [f"published numbers: {src}" for src in dict.fromkeys(r["expect_source"] for r in records if r["expect_source"])]
    files = {"report_md": out / "report.md", "report_csv": out / "report.csv", "curves": out / "curves.png"}
    if plot_curves([(r["name"], RunDir(r["path"]).metrics()) for r in records], files["curves"]):
        sections.append("## Learning curves\n\n![curves](curves.png)\n")
    else:
        files["curves"] = None
        notes.append(f"no {RunDir.METRICS} records: curves.png not written")
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    files["report_md"].write_text("\n".join(sections))
    write_csv(files["report_csv"], CSV_COLUMNS,
              [[r[c] if c != "methods" else "+".join(r[c]) for c in CSV_COLUMNS] for r in records])
    echo(f"\nwrote {files['report_md']}, {files['report_csv']}" + (f", {files['curves']}" if files["curves"] else ""))
    return {"out_dir": out, "runs": records, "pivots": pivots, "grids": sweep_dirs, "files": files, "notes": notes}
