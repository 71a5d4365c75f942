"""Writing a file whole or not at all, safe with several writers (workers sharing one run folder)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """This thread's temporary file for ``path``: hidden, beside it, named by host, process and thread."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_native_id()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through this process's own temporary file, then rename it into place.

    A reader sees the old file or the new one, never a part; two writers of one file (workers finishing together
    on one run folder, even on several hosts over a shared file system) each rename a complete file and the last
    one wins. On error (disk full, read-only folder) the temporary file is removed and the OSError propagates; the
    old file is untouched.
    """
    tmp = temporary_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
