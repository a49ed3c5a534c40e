"""HTML views of the Build tab: the layer tables and the wiring picture of the form's spec.

Plain HTML strings (no Gradio), cheap to send: a layer table of a few hundred rows is one string, and
the wiring picture is the SVG of :mod:`kdgraph.app.wiring`, cached per (loss terms, models, data).
"""
from __future__ import annotations

import html
import json

from . import forms


def layer_html(rows: list[dict] | None, text: str = "", pre: bool = True, role: str = "") -> str:
    """A model's layer table (name, op, kind, shape) as a scrolling HTML table, filtered as
    :func:`~kdgraph.ui.forms.layer_table` filters (``text`` in the name or op; ``pre`` entries or not)."""
    if rows is None:
        return f'<div class="layers empty">no {html.escape(role)} traced</div>'
    table = forms.layer_table(rows, text, pre)
    body = "".join(
        f'<tr class="{"pre" if r[2] == "pre" else r[2]}"><td>{html.escape(r[0])}</td><td>{html.escape(r[1])}</td>'
        f'<td>{html.escape(r[2])}</td><td>{html.escape(r[3])}</td></tr>' for r in table)
    head = "".join(f"<th>{h}</th>" for h in forms.LAYER_HEADERS)
    return (f'<div class="layers" data-rows="{len(table)}" style="max-height:420px;overflow:auto;'
            f'border:1px solid #ddd;border-radius:6px"><table style="width:100%;border-collapse:collapse;'
            f'font-size:12px"><thead style="position:sticky;top:0;background:#f3f3f3"><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>'
            '<style>.layers td,.layers th{padding:2px 6px;text-align:left;border-bottom:1px solid #eee;'
            'word-break:break-all}.layers tr.pre td{font-style:italic;color:#555}'
            '.layers tr.block td{font-weight:600}</style>')


def _model_key(form: dict, role: str) -> tuple[str, str]:
    return str(form.get(f"{role}.model") or "").strip(), str(form.get(f"{role}.kwargs") or "").strip()


def wiring_html(form: dict, teacher_rows: list[dict] | None, student_rows: list[dict] | None) -> str:
    """The wiring picture (SVG) of the form's loss terms between its two traced models, or why there is
    none; cached per (loss terms, models, data, leaf modules): the layer rows follow from the last three."""
    if student_rows is None:
        return '<div class="wiring empty">the wiring appears once the student traces</div>'
    loss = _form_loss(form)
    key = json.dumps({"loss": loss, "t": _model_key(form, "teacher") if teacher_rows is not None else None,
                      "s": _model_key(form, "student"), "data": [form.get("data.dataset"), form.get("data.options")],
                      "leaf": form.get("trace.leaf_modules")}, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = _draw(form, loss, teacher_rows, student_rows)
        while len(_CACHE) > 32:
            _CACHE.pop(next(iter(_CACHE)))
    return _CACHE[key]


_CACHE: dict[str, str] = {}  # wiring_html's latest pictures, oldest first


def _form_loss(form: dict) -> list[dict]:
    """The form's loss terms; a weight that cannot be read is left out (drawn at the method's default)."""
    count = min(int(form.get("loss.count") or 0), forms.MAX_TERMS)
    loss = [forms.term_from_form(form, i) for i in range(count)]
    return [{k: v for k, v in t.items() if not (k == "weight" and isinstance(v, str))} for t in loss]


def _draw(form: dict, loss: list[dict], teacher_rows, student_rows) -> str:
    from kdgraph.app import wiring

    num_classes, shape, _ = forms.trace_inputs({"dataset": str(form.get("data.dataset") or "").strip(),
                                                "options": _options(form)})
    drawn = wiring.from_rows(loss, teacher_rows, student_rows, input_shape=shape, num_classes=num_classes,
                             student=_model_key(form, "student")[0],
                             teacher=_model_key(form, "teacher")[0] if teacher_rows is not None else None)
    pairs = len([k for k in drawn.links if k.teacher != wiring.LOGITS])
    return (f'<div class="wiring" data-pairs="{pairs}" data-links="{len(drawn.links)}" '
            f'style="overflow:auto">{wiring.svg(drawn, fluid=True)}</div>')


def _options(form: dict) -> dict:
    try:
        return forms._from_form("mapping", form.get("data.options"), "data.options")
    except ValueError:
        return {}
