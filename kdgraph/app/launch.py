"""Starting ``kdgraph`` commands as processes of their own: one launcher for sweeps and the UI's job queue.

:func:`start` appends a header line (``=== DATE WHERE COMMAND``) to a log file and runs the command in a
new session (its own process group, so a signal to the launcher's group does not reach it, and it can
be stopped as a whole), its output and errors going to that log after the header.
:func:`failure_reason` reads the error of the last attempt back from such a log.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

HEADER = "=== "  # starts the line written before each attempt


# ``python -m kdgraph`` puts the current directory first on sys.path, so a ``kdgraph`` folder there (a
# checkout, say) would be imported instead of the installed package; this entry takes it off first.
ENTRY = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
         "from kdgraph.app.cli import main; sys.exit(main())")


def engine_command() -> list[str]:
    """The command prefix that runs the installed kdgraph (the one this process imported, whatever the
    current directory holds) in a new process: ``python -c ENTRY``."""
    return [sys.executable, "-c", ENTRY]


def policy_options() -> list[str]:
    """This process's import policy (:func:`kdgraph.registry.set_import_policy`) as the options that give
    a child ``kdgraph run`` or ``sweep`` the same: none, ``--no-imports`` or ``--allow-imports PKG,...``."""
    from ..registry import import_policy

    allowed, _ = import_policy()
    if allowed is None:
        return []
    return ["--allow-imports", ",".join(allowed)] if allowed else ["--no-imports"]


def where(env: Mapping[str, str]) -> str:
    """Where a process runs, for its log header: ``CUDA_VISIBLE_DEVICES=...`` or ``CPU``."""
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={gpus}" if gpus else "CPU"


def start(cmd: Sequence[str], log: str | Path, env: Mapping[str, str]) -> subprocess.Popen:
    """Run ``cmd`` with environment ``env`` in a new session, appending its output to ``log`` after a header.

    Raises ``OSError`` when the command cannot be started (the header is in the log then).
    """
    with open(log, "a") as out:
        out.write(f"{HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} {where(env)} {shlex.join(cmd)}\n")
        out.flush()
        return subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(env), start_new_session=True)


_ERROR_LINE = re.compile(r"^(kdgraph: error:|[\w.]*(Error|Exception|Interrupt)\b|\S+:\d+:\d+: )")


def failure_reason(log: str | Path) -> str:
    """The error message of the last attempt in a launcher's log (else its last line; "" without a log)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith(HEADER)]
    lines = lines[starts[-1] + 1:] if starts else lines
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    return (errors or lines or [""])[-1][:300]
