"""Files written atomically: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import IO, Iterator

_TEMP_IDS = itertools.count()


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temporary file in the same folder, renamed over it on success: a reader
    sees the old file or the new one, never half of one; on an error the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{next(_TEMP_IDS)}.tmp")  # the umask's permissions
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            crash_point(path.name, "open")
            yield f
            f.flush()
            os.fsync(f.fileno())
        crash_point(path.name, "written")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    crash_point(path.name, "renamed")


_CRASHES: dict[str, int] = {}


def crash_point(name: str, phase: str) -> None:
    """Fault injection for the tests: with ``KDGRAPH_CRASH_AT=NAME:PHASE[@N]`` in the environment, the N-th
    (default first) time file ``NAME`` reaches ``PHASE`` (``open``: its temporary file created; ``written``:
    complete, not yet renamed; ``renamed``: in place) this process kills itself with SIGKILL -- as a power
    cut or the OOM killer would. Without the variable this does nothing."""
    target = os.environ.get("KDGRAPH_CRASH_AT")
    if not target:
        return
    where, _, nth = target.partition("@")
    if where != f"{name}:{phase}":
        return
    _CRASHES[where] = _CRASHES.get(where, 0) + 1
    if _CRASHES[where] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def remove_temporaries(*folders: str | Path) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folders`` (call it only
    where no other process writes); the removed paths."""
    removed = []
    for folder in folders:
        for tmp in Path(folder).glob(".*.tmp"):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
