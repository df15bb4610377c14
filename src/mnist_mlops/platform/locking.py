"""One pipeline run at a time per project: a second run fails fast with a clear message.

The lock is taken by `mnist-mlops run` and by the training flow itself, so a run started by
a Prefect deployment (a schedule, a worker) excludes a manual one and vice versa. It is
re-entrant within one process: the CLI holds it and then calls the flow, which takes it again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from mnist_mlops.errors import UserError

_held: dict[str, int] = {}  # lock paths this process holds -> nesting depth


@contextmanager
def pipeline_lock(path: Path, wait_seconds: float = 0) -> Iterator[None]:
    """Hold an OS file lock (released by the kernel even if the holder is SIGKILLed).

    `wait_seconds=0` fails fast; a positive value waits that long for the holder to finish.
    """
    key = str(Path(path).resolve())
    if _held.get(key):
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock = FileLock(key)
    try:
        lock.acquire(timeout=wait_seconds)
    except Timeout:
        holder = path.with_suffix(".pid")
        who = holder.read_text().strip() if holder.exists() else "unknown"
        waited = f" (waited {wait_seconds:g}s)" if wait_seconds > 0 else ""
        raise UserError(f"another pipeline run holds {path.name} (pid {who}){waited}: "
                        "wait for it to finish") from None
    _held[key] = 1
    try:
        path.with_suffix(".pid").write_text(str(os.getpid()))
        yield
    finally:
        _held.pop(key, None)
        lock.release()
