"""One pipeline run at a time per project: a second run fails fast with a clear message."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from mnist_mlops.errors import UserError


@contextmanager
def pipeline_lock(path: Path, wait_seconds: float = 0) -> Iterator[None]:
    """Hold an OS file lock (released by the kernel even if the holder is SIGKILLed)."""
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=wait_seconds)
    except Timeout:
        holder = path.with_suffix(".pid")
        who = holder.read_text().strip() if holder.exists() else "unknown"
        raise UserError(f"another pipeline run holds {path.name} (pid {who}): wait for it to finish") from None
    try:
        path.with_suffix(".pid").write_text(str(os.getpid()))
        yield
    finally:
        lock.release()
