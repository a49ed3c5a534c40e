"""A sweep directory's files: ``sweep.json`` (the grid and each cell's last exit) and the grid rendered
from the cells' runs as ``grid.md``, ``grid.csv`` and ``heatmap.png``.

:func:`write_grid` rebuilds the grid from whatever cells exist, without the spec, so ``kdgraph report``
and the UI can show a sweep that is still running, stopped or partly failed.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from .format import markdown_table, mean_std, pct_spread, write_csv
from .rundir import STOPPED, RunDir, read_json, write_json

SWEEP_FILE = RunDir.SWEEP
SEED_KEY = "train.seed"  # a sweep axis of seeds: aggregated (mean ± std), not a dimension of the grid


def read_sweep(sweep_dir: str | Path) -> dict | None:
    """The ``sweep.json`` of a sweep directory, or None (missing, unreadable, or not a sweep)."""
    return read_json(Path(sweep_dir) / SWEEP_FILE)


def write_sweep(sweep_dir: str | Path, record: dict) -> None:
    """Replace the ``sweep.json`` of a sweep directory, atomically."""
    write_json(Path(sweep_dir) / SWEEP_FILE, record)


def cell_result(cell_dir: Path, record: dict) -> tuple[str, float | None]:
    """``(state, best top-1)`` of a cell; state is finished, unfinished, failed or not run.

    A failed last attempt (recorded in ``sweep.json``) counts unless the summary was written after it
    (the cell was fixed by hand, e.g. ``kdgraph run --resume``).
    """
    rd = RunDir(cell_dir)
    summary = rd.summary()
    code = record.get("exit")
    failed_at = (record.get("ended") or 0.0) if code not in (None, 0, STOPPED) else None
    if summary and (failed_at is None or (rd.summary_time() or 0.0) > failed_at):
        status = summary.get("status")
        if status == "failed":
            return "failed", None
        best = rd.best_top1(summary)
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


def _seeds_text(results: list[tuple[str, float | None]]) -> tuple[str, float | None, str]:
    """``(text, mean, state)`` of one grid position over its seeds: ``mean ± std (n=K)``."""
    if len(results) == 1:
        state, best = results[0]
        return _cell_text(state, best), (best if state != "failed" else None), state
    bests = [b for st, b in results if st != "failed" and b is not None]
    failed = sum(st == "failed" for st, _ in results)
    if not bests:
        return ("failed" if failed else ""), None, "failed" if failed else "not run"
    mean, _, n = mean_std(bests)
    state = "unfinished" if any(st in ("unfinished", "not run") for st, _ in results) else "finished"
    text = f"{pct_spread(bests)} (n={n})" + ("*" if state == "unfinished" else "") + \
        (f" ({failed} failed)" if failed else "")
    return text, mean, state


def grid_table(sweep_dir: str | Path) -> dict:
    """The grid of a sweep dir as ``{"header", "rows" (texts), "values" (floats or None), "states" (per
    position), "cell_states" (per cell run), ...}``.

    A ``train.seed`` axis is not a dimension: each position shows ``mean ± std (n=K)`` of its cells'
    best top-1 over the seeds (the values: the means).
    """
    sweep_dir = Path(sweep_dir)
    info = read_sweep(sweep_dir)
    if not info:
        raise UserError(f"{sweep_dir}: no {SWEEP_FILE} here (not a sweep directory)")
    seeded = [i for i, key in enumerate(info["keys"]) if key == SEED_KEY]
    axes = [i for i in range(len(info["keys"])) if i not in seeded]
    labels = [info["labels"][i] for i in axes]
    vlabels = [info["value_labels"][i] for i in axes]
    groups: dict[tuple, list] = {}
    for name, c in info["cells"].items():
        groups.setdefault(tuple(c["index"][i] for i in axes), []).append(cell_result(sweep_dir / name, c))
    n_cols = len(vlabels[1]) if len(labels) > 1 else 1
    extra = list(range(2, len(labels)))
    row_keys = list(itertools.product(*(range(len(vlabels[k])) for k in [0, *extra]))) if labels else [()]

    title = ", ".join([labels[0]] + [labels[k] for k in extra]) if labels else "seeds"
    header = [title + (f" \\ {labels[1]}" if len(labels) > 1 else "")]
    header += list(vlabels[1]) if len(labels) > 1 else ["best top-1"]
    rows, values, states = [], [], []
    for rk in row_keys:
        label = ", ".join([vlabels[0][rk[0]]] + [f"{labels[k]}={vlabels[k][i]}" for k, i in zip(extra, rk[1:])]) \
            if labels else f"{len(info['values'][seeded[0]])} seeds" if seeded else "all"
        texts, nums, sts = [label], [], []
        for col in range(n_cols):
            index = (rk[0], col, *rk[1:]) if len(labels) > 1 else tuple(rk)
            text, value, state = _seeds_text(groups.get(index, [("not run", None)]))
            texts.append(text)
            nums.append(value)
            sts.append(state)
        rows.append(texts)
        values.append(nums)
        states.append(sts)
    return {"name": info["name"], "header": header, "rows": rows, "values": values, "states": states,
            "row_title": header[0].split(" \\ ")[0], "col_title": labels[1] if len(labels) > 1 else "",
            "seeds": len(info["values"][seeded[0]]) if seeded else 1,
            "cell_states": [state for results in groups.values() for state, _ in results]}


def write_grid(sweep_dir: str | Path, echo: Callable[[str], Any] | None = print) -> str:
    """Rebuild ``grid.md``, ``grid.csv`` and ``heatmap.png`` from the cells there; return the Markdown table."""
    sweep_dir = Path(sweep_dir)
    grid = grid_table(sweep_dir)
    table = markdown_table(grid["header"], grid["rows"])
    notes = []
    if any("unfinished" in s for s in grid["states"]):
        notes.append("\\* unfinished: best top-1 so far.")
    over = f", mean ± std over {grid['seeds']} seeds (n: the finished ones)" if grid["seeds"] > 1 else ""
    text = f"Best test top-1 (%) of sweep {grid['name']}{over}.\n\n{table}\n" + "".join(f"\n{n}\n" for n in notes)
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
    fig, ax = plt.subplots(figsize=(3.0 + (1.7 if grid["seeds"] > 1 else 1.1) * n_cols, 1.5 + 0.6 * n_rows))
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
                ax.text(c, r, text.replace(" (", "\n("), ha="center", va="center", fontsize="small" if "±" in text
                        else None, color="white" if vals[r, c] < mid else "black")
    ax.set_xticks(range(n_cols), grid["header"][1:])
    ax.set_yticks(range(n_rows), [row[0] for row in grid["rows"]])
    ax.set_xlabel(grid["col_title"])
    ax.set_ylabel(grid["row_title"])
    ax.set_title(f"{grid['name']}: best test top-1 (%)" + (f"\nmean ± std over {grid['seeds']} seeds"
                                                            if grid["seeds"] > 1 else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
