"""Line charts as plain SVG: learning curves of one run or several overlaid (the UI's Runs tab).

No plotting library: the x axis counts epochs and gets whole-number ticks (``1 2 3``, never
``1.00 1.05``); a series with few points gets a marker on each point (a single epoch is a dot, not
nothing); every point has a tooltip with its value; ``smooth`` is TensorBoard's debiased exponential
moving average, drawn over the raw series.

Example::

    chart = line_chart([Series("kd: test_top1", [1, 2, 3], [61.0, 80.5, 88.1])], title="test top-1 (%)",
                       y_title="top-1 (%)")
    Path("curves.svg").write_text(chart)
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Sequence

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22"]
DASHES = ["", "6 3", "2 3", "8 3 2 3"]
MARKERS_UP_TO = 40  # series with at most this many points get a marker on each


@dataclass
class Series:
    """One line: ``label`` (legend and tooltips), points ``xs``/``ys``, its color and dash pattern
    (``""``: solid), and ``faint`` for a raw series drawn under its smoothed version."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = ""
    dash: str = ""
    faint: bool = False


def smooth(ys: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average with weight ``weight`` in [0, 1), debiased
    (the first values are not pulled towards 0). ``weight`` 0 returns the values unchanged."""
    if weight <= 0:
        return [float(y) for y in ys]
    out, last = [], 0.0
    for i, y in enumerate(ys):
        last = last * weight + (1 - weight) * float(y)
        out.append(last / (1 - weight ** (i + 1)))
    return out


def ticks(lo: float, hi: float, count: int = 6, integer: bool = False) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten;
    whole numbers only with ``integer``)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:  # one value: a range around it
        pad = 1 if integer else abs(lo) * 0.05 or 1
        lo, hi = (lo, lo + pad) if integer else (lo - pad, hi + pad)
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if integer:
        step = max(1, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    out, k = [], 0
    while first + k * step <= hi + step * 1e-9:
        out.append(round(first + k * step, 10))
        k += 1
    return out


def _label(v: float, step: float) -> str:
    if step >= 1 and float(v).is_integer():
        return f"{int(v)}"
    digits = max(0, -math.floor(math.log10(step)) if step > 0 else 2)
    return f"{v:.{min(digits, 6)}f}"


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def line_chart(series: Sequence[Series], *, title: str, y_title: str, x_title: str = "epoch",
               integer_x: bool = True, width: int = 620, height: int = 300, empty: str = "no data yet",
               elem_class: str = "") -> str:
    """An SVG chart of ``series`` (see the module docstring); ``empty`` is shown when there is no point."""
    series = [s for s in series if len(s.xs) and len(s.xs) == len(s.ys)]
    left, right, top, bottom = 58, 14, 28, 46
    legend_rows = math.ceil(len([s for s in series if not s.faint]) / 3)
    total_h = height + 16 * legend_rows + 8
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="kdgraph-chart {_esc(elem_class)}" '
           f'viewBox="0 0 {width} {total_h}" width="100%" style="max-width:{width}px" role="img" '
           f'aria-label="{_esc(title)}">',
           "<style>text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;font-size:11px;"
           "fill:#333}.ct{font-size:12.5px;font-weight:600}.ax{stroke:#999}.gr{stroke:#e6e6e6}</style>",
           f'<rect width="{width}" height="{total_h}" fill="white"/>',
           f'<text x="{left}" y="17" class="ct">{_esc(title)}</text>']
    points = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#888">{_esc(empty)}</text>')
        return "".join(out) + "</svg>"
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x_lo, x_hi = (min(0.0, min(xs)), max(xs)) if integer_x else (min(xs), max(xs))
    x_ticks = ticks(x_lo, max(x_hi, x_lo + 1), 8, integer_x)
    y_ticks = ticks(min(ys), max(ys), 6)
    x_lo, x_hi = min(x_ticks[0], x_lo), max(x_ticks[-1], x_hi)
    y_lo, y_hi = min(y_ticks[0], min(ys)), max(y_ticks[-1], max(ys))

    def px(x):
        return left + (x - x_lo) / ((x_hi - x_lo) or 1) * plot_w

    def py(y):
        return top + plot_h - (y - y_lo) / ((y_hi - y_lo) or 1) * plot_h

    out += _axes(x_ticks, y_ticks, px, py, left, top, plot_w, plot_h)
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 10}" text-anchor="middle">{_esc(x_title)}</text>')
    out.append(f'<text transform="translate(13 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'{_esc(y_title)}</text>')
    for i, s in enumerate(series):
        out += _series(s, s.color or PALETTE[i % len(PALETTE)], px, py)
    out += _legend([s for s in series if not s.faint], series, left, height, width)
    return "".join(out) + "</svg>"


def _axes(x_ticks, y_ticks, px, py, left, top, plot_w, plot_h) -> list[str]:
    out = []
    x_step = x_ticks[1] - x_ticks[0] if len(x_ticks) > 1 else 1
    y_step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1
    for v in y_ticks:
        y = py(v)
        out.append(f'<line class="gr" x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(v, y_step)}</text>')
    for v in x_ticks:
        x = px(v)
        out.append(f'<line class="ax" x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}"/>'
                   f'<text class="xt" x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                   f'{_label(v, x_step)}</text>')
    out.append(f'<line class="ax" x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}"/>'
               f'<line class="ax" x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}"/>')
    return out


def _series(s: Series, color: str, px, py) -> list[str]:
    pts = [(px(x), py(y), x, y) for x, y in zip(s.xs, s.ys) if math.isfinite(y)]
    opacity = 0.25 if s.faint else 1.0
    dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
    path = " ".join(f"{'M' if k == 0 else 'L'}{a:.1f} {b:.1f}" for k, (a, b, _, _) in enumerate(pts))
    out = [f'<g class="series{" faint" if s.faint else ""}" data-label="{_esc(s.label)}" data-points="{len(pts)}">',
           f'<path d="{path}" fill="none" stroke="{color}" stroke-width="{1.2 if s.faint else 2}"{dash} '
           f'opacity="{opacity}"/>']
    if not s.faint and len(pts) <= MARKERS_UP_TO:
        for a, b, x, y in pts:
            out.append(f'<circle class="marker" cx="{a:.1f}" cy="{b:.1f}" r="3.2" fill="{color}">'
                       f'<title>{_esc(s.label)}: {y:.4g} at {x:g}</title></circle>')
    out.append("</g>")
    return out


def _legend(shown: list[Series], everything: list[Series], left: int, height: int, width: int) -> list[str]:
    out, col_w = [], (width - left) / 3
    for k, s in enumerate(shown):
        color = s.color or PALETTE[everything.index(s) % len(PALETTE)]
        x, y = left + (k % 3) * col_w, height + 8 + 16 * (k // 3)
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        most = int((col_w - 30) / 6.2)
        label = s.label if len(s.label) <= most else s.label[: most - 1] + "…"
        out.append(f'<g class="legend-item"><line x1="{x}" x2="{x + 20}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="2.5"{dash}/><text x="{x + 25}" y="{y}">{_esc(label)}</text>'
                   f'<title>{_esc(s.label)}</title></g>')
    return out
