"""The wiring of a distillation as a picture: both networks by stage, every pair of every term between them.

A :class:`Wiring` holds, for the teacher and the student, their stages (:func:`kdgraph.graph.stages`:
the values of one spatial size, named by the block that ends them, with the pre-activation point where
an activation ends the stage), the input and the head (pooling, embedding, classifier), and the links:
each (teacher tap, student tap) pair of each loss term -- as :func:`kdgraph.losses.build_terms`
resolved it, ``positions: auto`` included -- with the connector the term builds for it
(:meth:`kdgraph.losses.Term.connectors`: 1x1 conv + BN, pooling, none). Logit terms (``kd``, ``dkd``)
link the two heads; ``ce`` is listed in the legend.

:func:`from_rows` draws what a spec *would* wire, from traced layer tables, setting the terms up on
``meta`` tensors (no data, no weights); :func:`from_distiller` draws what a run *did* wire, from its
:class:`~kdgraph.Distiller`. :func:`svg` renders it (plain SVG, no dependencies), :func:`text` as lines.
``kdgraph show SPEC -o wiring.svg`` and the UI's Build tab use the first, ``kdgraph run`` writes the
second into the run directory (``wiring.svg``).

Example::

    w = from_spec(kdgraph.spec.load("specs/at_wrn.yaml"))
    Path("wiring.svg").write_text(svg(w))
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

from ..graph import PRE, stage_ends, stages

PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
LOGITS = "logits"  # the port of logit terms (kd, dkd): the model's output


@dataclass
class Box:
    """One block of a model's column: the input, a stage, or the head."""

    kind: str                      # input, stage or head
    title: str                     # the stage's block name (its output), "input" or "head"
    shape: tuple | None            # the value's shape without the batch (the stage end's; the logits')
    pre: str | None = None         # the stage's pre-activation point, where an activation ends it
    detail: str = ""               # a second line (the head: pooling -> embedding -> classifier)
    ports: list[str] = field(default_factory=list)  # the taps links attach to, in graph order


@dataclass
class Link:
    """One distillation pair: term ``term`` (its index, name and method) between two taps, and its connector."""

    term: int
    name: str
    method: str
    teacher: str
    student: str
    connector: str
    teacher_shape: tuple | None = None
    student_shape: tuple | None = None


@dataclass
class Wiring:
    """Both models' boxes and every link (see the module docstring); ``terms`` describe the legend."""

    student: str
    teacher: str | None
    input_shape: tuple
    student_boxes: list[Box]
    teacher_boxes: list[Box]
    links: list[Link]
    terms: list[dict]               # {"name", "method", "weight", "what"} per loss term, in spec order
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- building
def dims(shape) -> str:
    """``64x16x16`` for a shape (``?`` when unknown)."""
    return "x".join(map(str, shape)) if shape else "?"


def boxes(rows: list[dict], taps: Sequence[str], input_shape: Sequence[int]) -> list[Box]:
    """The input, stage and head boxes of one model's :func:`kdgraph.layers` table, each tap of ``taps``
    placed on the box it belongs to (the stage it is computed in; after the last stage: the head)."""
    index = {r["name"]: i for i, r in enumerate(rows)}
    groups = stages(rows)
    outs, pres = stage_ends(rows, pre=False), stage_ends(rows, pre=True)
    found = [Box("input", "input", tuple(input_shape))]
    for group, out, pre in zip(groups, outs, pres):
        shape = next((r["shape"] for r in rows if r["name"] == out), group[-1]["shape"])
        found.append(Box("stage", out, shape, pre=pre if pre.endswith(PRE) else None))
    found.append(_head(rows, groups))
    starts = [index[g[0]["name"]] for g in groups]
    last = index[groups[-1][-1]["name"]] if groups else -1
    for tap in taps:
        if tap == LOGITS:
            found[-1].ports.append(tap)
            continue
        i = index.get(tap, index.get(tap[: -len(PRE)], -1) if tap.endswith(PRE) else -1)
        if i > last or not groups:
            box = found[-1]
        else:
            box = found[1 + max((k for k, s in enumerate(starts) if s <= i), default=0)]
        box.ports.append(tap)
    order = {t: index.get(t, len(rows)) for t in taps}
    for box in found:
        box.ports = sorted(dict.fromkeys(box.ports), key=lambda t: order.get(t, len(rows) + 1))
    return found


def _head(rows: list[dict], groups: list[list[dict]]) -> Box:
    """The head box: what follows the last stage, as ``avgpool → 128 → fc`` (its last Linear's input width)."""
    linear = [r for r in rows if r["op"] == "Linear" and r["kind"] == "module"]
    shape = rows[-1]["shape"] if rows else None
    if not linear:
        return Box("head", "head", shape, detail="output")
    tail = rows[rows.index(linear[-1]) - 1] if rows.index(linear[-1]) > 0 else None
    pooled = [r["name"] for r in rows if "Pool" in r["op"] and r["kind"] == "module"
              and groups and r["shape"] is not None and len(r["shape"]) == 3 and r["shape"][1:] == (1, 1)]
    parts = ([pooled[-1]] if pooled else []) + ([dims(tail["shape"])] if tail else []) + [linear[-1]["name"]]
    return Box("head", "head", linear[-1]["shape"], detail=" → ".join(parts))


def _legend(name: str, term) -> dict:
    if term.features is not None:
        what = f"{len(term.pairs)} pair(s)" if term.pairs else "no pairs"
    elif term.needs_teacher:
        what = "logits"
    else:
        what = "labels (student only)"
    return {"name": name, "method": type(term).__name__, "weight": term.weight, "what": what}


def tap_shapes(rows: list[dict]) -> dict:
    """Tap name -> shape of a :func:`kdgraph.layers` table, with ``BLOCK:pre`` (a block's input) for its blocks."""
    shapes = {r["name"]: r["shape"] for r in rows}
    shapes.update({r["name"] + PRE: r["input"] for r in rows if r["kind"] == "block" and r.get("input")})
    return shapes


def assemble(terms, names: Sequence[str], teacher_rows: list[dict] | None, student_rows: list[dict],
             input_shape: Sequence[int], student: str, teacher: str | None, notes: Sequence[str] = ()) -> Wiring:
    """The :class:`Wiring` of built terms (their ``pairs`` resolved, and set up for their connectors)."""
    t_shapes, s_shapes = tap_shapes(teacher_rows or []), tap_shapes(student_rows)
    links, legend = [], []
    for i, (name, term) in enumerate(zip(names, terms)):
        legend.append(_legend(name, term))
        method = legend[-1]["method"]
        if term.features is None:
            if term.needs_teacher and teacher_rows is not None:
                links.append(Link(i, name, method, LOGITS, LOGITS, "none"))
            continue
        try:
            connectors = list(term.connectors())
        except Exception:  # noqa: BLE001 -- a user's term that cannot describe itself before its setup
            connectors = []
        connectors += ["set up at run time"] * (len(term.pairs) - len(connectors))
        for (t, s), conn in zip(term.pairs, connectors):
            links.append(Link(i, name, method, t, s, conn, t_shapes.get(t), s_shapes.get(s)))
    t_taps = [link.teacher for link in links]
    s_taps = [link.student for link in links]
    return Wiring(student=student, teacher=teacher, input_shape=tuple(input_shape),
                  student_boxes=boxes(student_rows, s_taps, input_shape),
                  teacher_boxes=boxes(teacher_rows, t_taps, input_shape) if teacher_rows is not None else [],
                  links=links, terms=legend, notes=list(notes))


def setup_on_meta(terms, teacher_rows: list[dict] | None, student_rows: list[dict], num_classes: int) -> list[str]:
    """Set each feature term up on ``meta`` tensors shaped like its traced positions (its connectors are
    built; nothing is computed, no data is read). Returns notes for terms that could not be set up this way."""
    import torch

    from ..losses import Setup

    shapes = {("teacher", n): tuple(v) for n, v in tap_shapes(teacher_rows or []).items() if v}
    shapes.update({("student", n): tuple(v) for n, v in tap_shapes(student_rows).items() if v})
    notes = []
    for term in terms:
        if term.features is None or not term.pairs:
            continue
        if any(("teacher", t) not in shapes or ("student", s) not in shapes for t, s in term.pairs):
            notes.append(f"{type(term).__name__}: a position has no traced shape; connectors are built at run time")
            continue
        samples = 2 * max(num_classes, 2)
        ctx = Setup(student=None, teacher=None, teacher_node=None, log=lambda _: None,
                    student_shapes={s: shapes[("student", s)] for _, s in term.pairs},
                    teacher_shapes={t: shapes[("teacher", t)] for t, _ in term.pairs},
                    teacher_features=lambda names: {n: torch.empty(8, *shapes[("teacher", n)], device="meta")
                                                    for n in names},
                    num_samples=samples, targets=torch.arange(samples) % num_classes)
        try:
            with torch.device("meta"):
                term.setup(ctx)
        except Exception:  # noqa: BLE001 -- a term whose setup needs real data or weights: it says so itself
            pass           # (Term.connectors before setup)
    return notes


def from_rows(loss: list[dict], teacher_rows: list[dict] | None, student_rows: list[dict], *,
              input_shape: Sequence[int], num_classes: int, student: str, teacher: str | None) -> Wiring:
    """What a ``loss`` list wires between two traced models (:func:`kdgraph.layers` tables; no teacher:
    ``teacher_rows=None``). Terms with problems are left out and their problems are the notes."""
    from ..distiller import term_names
    from ..losses import build_terms

    names = term_names([t for t in loss if isinstance(t.get("method"), str)])
    good, notes = [], []
    for cfg, name in zip([t for t in loss if isinstance(t.get("method"), str)], names):
        terms, problems = build_terms([cfg], teacher_rows=teacher_rows if teacher_rows is not None else [],
                                      student_rows=student_rows, has_teacher=teacher_rows is not None)
        if problems or not terms:
            notes.append(f"{name}: " + (problems[0][1] if problems else "not drawn"))
            continue
        good.append((name, terms[0]))
    notes += setup_on_meta([t for _, t in good], teacher_rows, student_rows, num_classes)
    return assemble([t for _, t in good], [n for n, _ in good], teacher_rows, student_rows, input_shape,
                    student, teacher, notes)


def from_distiller(distiller, input_shape: Sequence[int], student: str, teacher: str | None) -> Wiring:
    """What a :class:`~kdgraph.Distiller` wired (after :meth:`~kdgraph.Distiller.setup`: its connectors)."""
    rows = distiller.layer_rows
    return assemble(list(distiller.terms), distiller.names, rows["teacher"], rows["student"], input_shape,
                    student, teacher)


def from_spec(spec) -> Wiring:
    """What a loaded spec (:class:`kdgraph.spec.Spec`, checked) wires, from its models traced on ``meta``."""
    from ..errors import UserError
    from ..graph import layers
    from ..spec.check import meta_model, static_dataset_info

    data = spec.data
    info = static_dataset_info(data["data"])
    if info is None:
        raise UserError(f"data.dataset {data['data']['dataset']!r} does not declare its input shape: "
                        f"`kdgraph show` cannot trace the models for it")
    num_classes, shape = info
    leaf = (data.get("trace") or {}).get("leaf_modules", [])
    rows = {role: layers(meta_model(data[role], num_classes).eval(), shape, leaf_modules=leaf)
            for role in ("teacher", "student") if data.get(role)}
    return from_rows(data["loss"], rows.get("teacher"), rows["student"], input_shape=shape,
                     num_classes=num_classes, student=data["student"]["model"],
                     teacher=(data.get("teacher") or {}).get("model"))


# ------------------------------------------------------------------------------------------- as text
def text(w: Wiring) -> str:
    """The wiring as lines of text: each link ``term: teacher tap (shape) -> student tap (shape) [connector]``."""
    head = f"teacher {w.teacher} -> student {w.student}" if w.teacher else f"student {w.student} (no teacher)"
    lines = [f"{head}, input {dims(w.input_shape)}"]
    for role, bxs in (("teacher", w.teacher_boxes), ("student", w.student_boxes)):
        if bxs:
            stages_ = [b for b in bxs if b.kind == "stage"]
            lines.append(f"  {role} stages: " + ", ".join(f"{b.title} {dims(b.shape)}" for b in stages_))
    for term in w.terms:
        lines.append(f"  {term['name']} (weight {term['weight']:g}): {term['what']}")
        for link in (k for k in w.links if k.name == term["name"]):
            lines.append(f"    {link.teacher} ({dims(link.teacher_shape) if link.teacher != LOGITS else 'output'}) -> "
                         f"{link.student} ({dims(link.student_shape) if link.student != LOGITS else 'output'})"
                         f"  connector: {link.connector}")
    lines += [f"  note: {n}" for n in w.notes]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- as SVG
COLUMN, GAP, MARGIN, TOP = 250, 300, 16, 62
TITLE_H, PORT_H, BOX_GAP = 36, 16, 14
CHAR_W = 6.3  # average width of an 11 px sans-serif character


def _fit(text_: str, width: float, char: float = CHAR_W) -> str:
    most = max(int(width / char), 4)
    return text_ if len(text_) <= most else text_[: most - 1] + "…"


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _box_height(box: Box | None) -> int:
    if box is None:
        return 0
    lines = 1 if box.kind == "input" else 2
    return 18 * lines + 4 + PORT_H * len(box.ports)


def _rows_of(w: Wiring) -> list[tuple[Box | None, Box | None]]:
    """Teacher and student boxes side by side: inputs, then stage i with stage i, then the heads."""
    t, s = w.teacher_boxes, w.student_boxes
    t_st, s_st = [b for b in t if b.kind == "stage"], [b for b in s if b.kind == "stage"]
    n = max(len(t_st), len(s_st))
    rows = [(t[0] if t else None, s[0])]
    rows += [(t_st[i] if i < len(t_st) else None, s_st[i] if i < len(s_st) else None) for i in range(n)]
    rows.append((t[-1] if t else None, s[-1]))
    return rows


def _draw_box(box: Box, x: float, y: float, side: str, ports: dict) -> list[str]:
    """SVG of one box; records each port's anchor point in ``ports``."""
    h = _box_height(box)
    fill = {"input": "#f4f4f4", "stage": "#eef4fb", "head": "#f6f1fa"}[box.kind]
    out = [f'<g class="box {box.kind}" data-role="{side}" data-name="{_esc(box.title)}">',
           f'<title>{_esc(box.title)} {_esc(dims(box.shape))}</title>',
           f'<rect x="{x}" y="{y}" width="{COLUMN}" height="{h}" rx="6" fill="{fill}" stroke="#8a9bb0"/>',
           f'<text x="{x + 8}" y="{y + 15}" class="t">{_esc(_fit(box.title, COLUMN - 90))}</text>',
           f'<text x="{x + COLUMN - 8}" y="{y + 15}" class="s" text-anchor="end">{_esc(dims(box.shape))}</text>']
    second = box.detail if box.kind == "head" else (f"pre-activation: {box.pre}" if box.pre else "")
    if box.kind != "input":
        out.append(f'<text x="{x + 8}" y="{y + 31}" class="d">{_esc(_fit(second, COLUMN - 16, 5.6))}</text>')
    for k, tap in enumerate(box.ports):
        py = y + 18 * (1 if box.kind == "input" else 2) + 4 + PORT_H * k + PORT_H / 2
        edge = x + COLUMN if side == "teacher" else x
        ports[(side, tap)] = (edge, py)
        tx = x + 22 if side == "student" else x + 8
        label = _fit(tap, COLUMN - 30, 5.9)
        anchor = "start" if side == "student" else "end"
        tx = x + 22 if side == "student" else x + COLUMN - 22
        out.append(f'<text x="{tx}" y="{py + 4}" class="p" text-anchor="{anchor}">{_esc(label)}</text>')
        if tap.endswith(PRE):  # a pre-activation point: a diamond
            out.append(f'<path class="port pre" d="M{edge - 5} {py} L{edge} {py - 5} L{edge + 5} {py} '
                       f'L{edge} {py + 5} Z" fill="#333"/>')
        else:
            out.append(f'<circle class="port" cx="{edge}" cy="{py}" r="4" fill="#333"/>')
    out.append("</g>")
    return out


def _links_svg(w: Wiring, ports: dict) -> tuple[list[str], list[str]]:
    """The links' curves and their labels (labels kept apart vertically)."""
    curves, labels, placed = [], [], []
    repeats: dict[tuple, int] = {}
    for link in w.links:
        a, b = ports.get(("teacher", link.teacher)), ports.get(("student", link.student))
        if a is None or b is None:
            continue
        k = repeats[(link.teacher, link.student)] = repeats.get((link.teacher, link.student), -1) + 1
        dy = 4 * k
        color = PALETTE[link.term % len(PALETTE)]
        (x1, y1), (x2, y2) = (a[0], a[1] + dy), (b[0], b[1] + dy)
        bend = (x2 - x1) * 0.45
        curves.append(f'<g class="pair" data-term="{_esc(link.name)}" data-method="{_esc(link.method)}" '
                      f'data-teacher="{_esc(link.teacher)}" data-student="{_esc(link.student)}">'
                      f'<title>{_esc(link.name)}: {_esc(link.teacher)} → {_esc(link.student)} '
                      f'(connector: {_esc(link.connector)})</title>'
                      f'<path d="M{x1} {y1} C{x1 + bend} {y1} {x2 - bend} {y2} {x2} {y2}" fill="none" '
                      f'stroke="{color}" stroke-width="2.2" opacity="0.85"/></g>')
        y = (y1 + y2) / 2
        while any(abs(y - p) < 15 for p in placed):
            y += 15
        placed.append(y)
        label = _fit(f"{link.name} · {link.connector}", GAP - 24, 5.9)
        width = len(label) * 5.9 + 10
        cx = (x1 + x2) / 2
        labels.append(f'<g class="label" data-term="{_esc(link.name)}"><rect x="{cx - width / 2}" y="{y - 9}" '
                      f'width="{width}" height="15" rx="3" fill="white" stroke="{color}" opacity="0.95"/>'
                      f'<text x="{cx}" y="{y + 2}" text-anchor="middle" class="l" fill="{color}">'
                      f'{_esc(label)}</text></g>')
    return curves, labels


def svg(w: Wiring, fluid: bool = False) -> str:
    """The picture as a standalone SVG document (teacher on the left, student on the right); ``fluid``:
    scaled to the width of its container (in a web page) instead of its own size in pixels."""
    has_teacher = bool(w.teacher_boxes)
    t_x = MARGIN
    s_x = MARGIN + (COLUMN + GAP if has_teacher else 0)
    width = s_x + COLUMN + MARGIN
    body, ports, y = [], {}, TOP
    for t_box, s_box in _rows_of(w):
        for box, x, side in ((t_box, t_x, "teacher"), (s_box, s_x, "student")):
            if box is not None and (side == "student" or has_teacher):
                body += _draw_box(box, x, y, side, ports)
        y += max(_box_height(t_box) if has_teacher else 0, _box_height(s_box)) + BOX_GAP
    curves, labels = _links_svg(w, ports)
    legend, y = _legend_svg(w, y + 6, width)
    title = (f"teacher {w.teacher} → student {w.student}" if has_teacher else f"student {w.student} (no teacher)")
    head = [f'<text x="{MARGIN}" y="22" class="h">{_esc(title)} · input {_esc(dims(w.input_shape))}</text>']
    if has_teacher:
        head.append(f'<text x="{t_x}" y="50" class="c">teacher: {_esc(_fit(w.teacher, COLUMN - 60))}</text>')
    head.append(f'<text x="{s_x}" y="50" class="c">student: {_esc(_fit(w.student, COLUMN - 60))}</text>')
    style = ("<style>text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;fill:#222}"
             ".h{font-size:14px;font-weight:600}.c{font-size:12px;font-weight:600;fill:#555}"
             ".t{font-size:12px;font-weight:600}.s{font-size:11px;fill:#555}.d{font-size:10px;fill:#777}"
             ".p{font-size:10.5px}.l{font-size:10.5px;font-weight:600}.n{font-size:11px;fill:#a33}</style>")
    size = f'width="100%" style="max-width:{width}px;height:auto"' if fluid else f'width="{width}" height="{y}"'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="kdgraph-wiring" viewBox="0 0 {width} {y}" '
            f'{size} role="img" aria-label="{_esc(title)}">{style}'
            f'<rect width="{width}" height="{y}" fill="white"/>'
            + "".join(head + body + curves + labels + legend) + "</svg>")


def _legend_svg(w: Wiring, y: float, width: float) -> tuple[list[str], float]:
    out = []
    for term in w.terms:
        i = w.terms.index(term)
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<g class="legend" data-term="{_esc(term["name"])}">'
                   f'<rect x="{MARGIN}" y="{y - 9}" width="18" height="4" fill="{color}"/>'
                   f'<text x="{MARGIN + 26}" y="{y - 3}" class="s">{_esc(term["name"])} × {term["weight"]:g} — '
                   f'{_esc(term["what"])}</text></g>')
        y += 17
    for note in w.notes:
        out.append(f'<text x="{MARGIN}" y="{y - 3}" class="n">⚠ {_esc(_fit(note, width - 2 * MARGIN, 6.0))}</text>')
        y += 17
    return out, y + 4
