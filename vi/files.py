"""Writing files so that a reader never sees half of one: the project's one atomic-write helper.

``atomic_write(path, data)`` writes to a temporary file in the destination folder, flushes it to
disk, gives it the permissions an ordinary ``open(path, "w")`` would (``0o666`` minus the
process's umask; ``tempfile.mkstemp`` alone would leave it owner-only), and renames it over
``path``. An interruption at any point leaves either the old file or the new one, never a
truncated mix; a write that fails (disk full, a file-size limit, a read-only folder) raises the
``OSError`` and leaves no temporary file behind.

Imports only the standard library, so the torch-free parts of the project (``check``,
``figures``) use it too.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "file_mode"]


def file_mode() -> int:
    """The mode a new regular file gets under the current umask (e.g. 0o644 for umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], None]) -> Path:
    """Atomically replace ``path`` with ``data``: text (UTF-8, ``\\n`` kept), bytes, or a
    function that writes the temporary file it is given (e.g. ``lambda p: torch.save(s, p)``).

    Creates missing parent folders. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
