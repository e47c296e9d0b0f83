"""The one atomic file write of the project: a temporary file in the target's folder, flushed and
fsynced, renamed over the target with `os.replace`, then the folder fsynced; on any failure the
temporary file is removed and the target is untouched. A reader sees the old file or the new one,
never a torn one, and a write that returned survives a power cut.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: makes a rename in them durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; whatever the block writes there replaces `path`
    atomically and durably when the block exits normally (the block must close its file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` by `data` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` by UTF-8 `text` atomically and durably."""
    write_bytes(path, text.encode("utf-8"))
