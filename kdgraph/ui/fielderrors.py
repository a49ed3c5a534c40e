"""Each problem of the Build form shown at the field it is about.

The validator reports problems by key path (``loss.1.weight``, ``data.options.size``); the form by field
key. :func:`field_of` maps a key path to the form field showing it -- the parameter table of a loss term
for its parameters, the pairs table for its positions -- and :func:`error_css` renders the problems as
one stylesheet that outlines each field and writes its message under it (a ``::after`` box), so the
page marks every field with a single update and no widget is redrawn while the user types.
"""
from __future__ import annotations

import re

from .forms import FIELDS, MAX_TERMS

_TERM_KEYS = {"method", "weight", "positions", "pairs", "params"}


def elem_id(field: str) -> str:
    """The page element id of a form field (``loss.1.weight`` -> ``loss-1-weight``)."""
    return field.replace(".", "-")


def field_of(path: str, form: dict) -> str | None:
    """The form field a validator key path is about (None for the spec as a whole)."""
    parts = [p for p in str(path or "").split(".") if p]
    if not parts:
        return None
    if parts[0] == "loss" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < MAX_TERMS:
        i, rest = int(parts[1]), parts[2:]
        if not rest or rest[0] == "method":
            return f"loss.{i}.method"
        if rest[0] == "weight":
            return f"loss.{i}.weight"
        if rest[0] == "positions":
            return f"loss.{i}.pairs" if form.get(f"loss.{i}.positions") == "pairs" else f"loss.{i}.positions"
        return f"loss.{i}.params"
    if parts[0] == "loss":
        return "loss.count"
    for n in range(len(parts), 0, -1):  # the longest prefix that is a field: data.options.size -> data.options
        key = ".".join(parts[:n])
        if key in FIELDS:
            return key
    return None


def field_errors(problems: list[tuple], form_problems: list[tuple[str, str]], form: dict) -> dict[str, list[str]]:
    """``{field key: messages}`` from the validator's ``(file, line, col, key path, message)`` tuples and
    the form's ``(field key, message)`` pairs (a field's own reading problem first)."""
    out: dict[str, list[str]] = {}
    for key, message in form_problems:
        out.setdefault(key, []).append(re.sub(rf"^{re.escape(key)}:\s*", "", message))
    unreadable = set(out)  # the validator's word on a value the form could not read repeats the form's
    for _, _, _, path, message in problems:
        key = field_of(path, form)
        if key is not None and key not in unreadable and message not in out.get(key, []):
            out.setdefault(key, []).append(message)
    return out


def _css_text(text: str) -> str:
    """``text`` as a CSS string literal (quotes, backslashes, newlines and angle brackets escaped)."""
    return '"' + "".join(f"\\{ord(ch):x} " if ch in '"\\<>\n' else ch for ch in text) + '"'


def error_css(errors: dict[str, list[str]]) -> str:
    """A ``<style>`` element marking each field of ``errors`` and showing its messages under it."""
    rules = []
    for key, messages in errors.items():
        sel = "#" + elem_id(key)
        text = "\n".join(f"⚠ {m}" for m in messages)
        rules.append(f"{sel}{{outline:2px solid #d33;outline-offset:1px;border-radius:6px}}"
                     f"{sel}::after{{content:{_css_text(text)};display:block;white-space:pre-wrap;color:#b21;"
                     f"font-size:12px;line-height:1.35;padding:3px 6px 4px}}")
    fields = " ".join(elem_id(k) for k in errors)
    marker = f'<span class="field-errors" data-count="{len(errors)}" data-fields="{fields}"></span>'
    return marker + "<style>" + "".join(rules) + "</style>"
