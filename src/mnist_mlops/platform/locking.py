"""One pipeline run at a time per project: a second run fails fast with a clear message.

The lock is taken in one place, by the flows themselves (`pipelines.tasks.pipeline_run`), so a
run started by a Prefect deployment (a schedule, a worker) excludes a manual one and vice versa.
The CLI only checks it (`ensure_free`) before it starts a Prefect server. It is not re-entrant:
a second holder, in this process or another, fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from mnist_mlops.errors import UserError


@contextmanager
def pipeline_lock(path: Path, wait_seconds: float = 0) -> Iterator[None]:
    """Hold an OS file lock (released by the kernel even if the holder is SIGKILLed).

    `wait_seconds=0` fails fast; a positive value waits that long for the holder to finish.
    """
    lock = FileLock(str(Path(path).resolve()))
    try:
        lock.acquire(timeout=wait_seconds)
    except Timeout:
        holder = path.with_suffix(".pid")
        who = holder.read_text().strip() if holder.exists() else "unknown"
        waited = f" (waited {wait_seconds:g}s)" if wait_seconds > 0 else ""
        raise UserError(f"another pipeline run holds {path.name} (pid {who}){waited}: "
                        "wait for it to finish") from None
    try:
        path.with_suffix(".pid").write_text(str(os.getpid()))
        yield
    finally:
        lock.release()


def ensure_free(path: Path) -> None:
    """Fail now, in the same one line, when another run holds the lock (taken and let go at once:
    the run takes it for itself)."""
    with pipeline_lock(path):
        pass
