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
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)
