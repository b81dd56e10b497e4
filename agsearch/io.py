"""Files: read a text file with a one-line error, write a file atomically (temporary file, rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def read_text_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> str:
    """The UTF-8 text of ``path``; an unreadable or non-UTF-8 file raises ``error`` with one line
    naming the file and ``what`` it should have been (e.g. "prompt file")."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename, so a
    reader never sees a half-written file and a failed write leaves the old file intact."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
