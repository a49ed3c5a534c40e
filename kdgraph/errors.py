"""Errors a user can act on.

Anything derived from :class:`UserError` is printed by the CLI as a plain message (no traceback) and the
process exits with status 2.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake the user can fix (bad spec, unknown name, missing file...)."""


class SpecError(UserError):
    """One or more problems in a spec; ``problems`` holds ``(file, line, col, path, message)`` tuples."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(format_problem(*p) for p in self.problems))


def format_problem(file, line, col, path, message) -> str:
    where = f"{file or '<spec>'}:{line or 1}:{col or 1}"
    return f"{where}: {path or '<root>'}: {message}"


def closest(name: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The ``n`` candidates closest to ``name`` (difflib ratio), best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=cutoff)
    if not found:  # fall back on substring matches, useful for long layer names
        found = [c for c in candidates if name and (name in c or c in name)][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    found = closest(name, candidates, n=n)
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""
