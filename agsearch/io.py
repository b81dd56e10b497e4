"""Files: read a text file with a one-line error, write a file atomically (temporary file, rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MAX_TEXT_BYTES = 64 * 2**20  # policy, prompt, caption and coefficient files are far smaller


def read_text_file(path: str | os.PathLike, what: str, error: type[Exception] = ValueError,
                   max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path``, read up to ``max_bytes`` (a longer file or an endless one such
    as ``/dev/zero`` is refused, not read to the end); an unreadable, oversized or non-UTF-8 file
    raises ``error`` with one line naming the file and ``what`` it should have been (e.g. "prompt file")."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than the limit of {max_bytes // 2**20} MiB") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None


def parse_yaml(text: str, source: str, error: type[Exception] = ValueError):
    """``yaml.safe_load`` of ``text``; a syntax error raises ``error`` with one line naming ``source``
    and the line, an integer of more digits than Python converts too."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise error(f"{source}: invalid YAML{at}: {getattr(e, 'problem', e)}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise error(f"{source}: {str(e).split(';')[0]}") from None


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
