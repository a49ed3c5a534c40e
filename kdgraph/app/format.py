"""How numbers and tables are written for people: percentages, mean ± std, durations, Markdown tables, CSV files."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Iterable, Sequence


def pct(value: Any, missing: str = "") -> str:
    """An accuracy in percent with two decimals (``missing`` for anything but a number)."""
    return f"{value:.2f}" if isinstance(value, (int, float)) else missing


def mean_std(values: Iterable[Any]) -> tuple[float | None, float | None, int]:
    """``(mean, std, n)`` of the numbers among ``values`` (anything else is skipped): the sample standard
    deviation (n - 1 in the denominator), None for fewer than 2 numbers; the mean is None for none.

    >>> mean_std([71.0, 74.0, 68.0, None])
    (71.0, 3.0, 3)
    """
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    n = len(numbers)
    if not n:
        return None, None, 0
    mean = sum(numbers) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in numbers) / (n - 1)) if n > 1 else None
    return mean, std, n


def pct_spread(values: Iterable[Any], missing: str = "") -> str:
    """Accuracies of repeated runs as ``mean ± std`` (two decimals; one value alone as :func:`pct`).

    >>> pct_spread([71.0, 74.0, 68.0])
    '71.00 ± 3.00'
    """
    mean, std, _ = mean_std(values)
    return pct(mean, missing) + (f" ± {std:.2f}" if std is not None else "")


def duration(seconds: Any) -> str:
    """``H:MM:SS`` (empty for anything but a number; negative counts as 0)."""
    if not isinstance(seconds, (int, float)):
        return ""
    s = int(round(max(seconds, 0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], pad: bool = True) -> str:
    """A GitHub Markdown table; with ``pad``, columns are padded so that it reads as plain text too.

    >>> print(markdown_table(["run", "top-1"], [["kd", "71.20"]], pad=False))
    | run | top-1 |
    |---|---|
    | kd | 71.20 |
    """
    cells = [[str(h) for h in header]] + [["" if v is None else str(v).replace("|", "\\|") for v in row]
                                          for row in rows]
    if not pad:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
