"""Append-only shards of 28×28 digits with one JSON record each: the on-disk format of the
prediction log and of the feedback store.

A shard is two files with one stem: `<stem>.u8` holds the digits as raw uint8, 784 bytes
each, and `<stem>.jsonl` holds one JSON object per digit, whose `row` is that digit's index
in the `.u8` file. Why this format and not Parquet or SQLite:

- Appends are two `write` calls of a whole batch; nothing is rewritten, nothing re-encoded.
- Crash safety comes from the order of writes: the digits are written (and fsynced) before
  the records that point at them, and a reader only takes complete lines whose row is
  within the `.u8` file. A SIGKILL mid-write leaves at most a torn last line, which is
  ignored; everything written before stays readable. A failed write (disk full, EIO) is
  undone and its shard retired, so a later record never points at another one's digit.
- Each writer (one per service worker) has shards of its own, named with its pid and start
  time: no locks between processes, and rotation/retention delete whole files, never a
  shard that a running writer may still append to.
- Reading a window back is one `json.loads` per line plus one `np.fromfile` per shard; DVC
  and tools see a few large files, never one file per digit.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:  # 3x faster on a 100,000-line window; installed with Prefect, absent from the Bento
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - the service container
    _loads = json.loads

DIGIT_BYTES = 28 * 28


@dataclass(frozen=True)
class Batch:
    """Records and their digits, in order (`images[i]` belongs to `records[i]`)."""

    records: list[dict]
    images: np.ndarray  # uint8 N×28×28
    skipped: int = 0  # lines that were torn, not JSON, or pointed past the digits written

    def __len__(self) -> int:
        return len(self.records)


EMPTY = Batch([], np.zeros((0, 28, 28), np.uint8))


class ShardWriter:
    """Appends batches to this process's current shard in `directory`; rotates by size.

    Not thread-safe: one writer thread per process calls `append`. A row is taken from the
    `.u8` file's real size, never from a counter, and an append that fails (a full disk, EIO,
    a short write) is undone (both files truncated back) and the shard retired: the next
    append starts a new one, so no later record can point at another record's digit.
    """

    _live: set[Path] = set()  # the current shard of every writer in this process (retention spares them)

    def __init__(self, directory: Path, prefix: str, shard_bytes: int, max_total_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.shard_bytes = shard_bytes
        self.max_total_bytes = max_total_bytes
        self._stem: Path | None = None

    def _new_stem(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{self.prefix}-{time.time_ns():020d}-{os.getpid()}"

    def _retire(self) -> None:
        if self._stem is not None:
            ShardWriter._live.discard(self._stem)
        self._stem = None

    def _current(self) -> tuple[Path, int]:
        """The shard to append to and its first free row (a new shard when full or unusable)."""
        if self._stem is not None:
            size = _size(self._stem.with_suffix(".u8"))
            if size % DIGIT_BYTES == 0 and size < self.shard_bytes:
                return self._stem, size // DIGIT_BYTES
            self._retire()  # full, or holding a torn digit: never append after it
        self._stem = self._new_stem()
        ShardWriter._live.add(self._stem)
        self._enforce_retention()
        return self._stem, 0

    def append(self, records: list[dict], images: np.ndarray) -> None:
        """Write the digits, then the records that point at them (each file fsynced).

        All or nothing: on any failure the shard is truncated back to what it held, the
        writer moves on to a new shard, and the error is raised (OSError).
        """
        if not records:
            return
        images = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(records), 28, 28)
        stem, row = self._current()
        lines = [json.dumps({**record, "row": row + i}, separators=(",", ":")) for i, record in enumerate(records)]
        u8, jsonl = stem.with_suffix(".u8"), stem.with_suffix(".jsonl")
        sizes = (row * DIGIT_BYTES, _size(jsonl))
        try:
            _append(u8, images.tobytes())
            _append(jsonl, ("\n".join(lines) + "\n").encode())
        except BaseException:
            _truncate(u8, sizes[0])
            _truncate(jsonl, sizes[1])
            self._retire()
            raise

    def _enforce_retention(self) -> None:
        """Delete the oldest *closed* shards while the directory is over its limit.

        A shard is live, and spared, while a writer may still append to it: the current shard
        of every writer in this process, and the newest shard of every other process that is
        still running (its pid is in the name). Deleting another worker's live shard would
        lose the records it is about to write.
        """
        if self.max_total_bytes is None:
            return
        stems = shard_stems(self.directory, self.prefix)
        live = _live_stems(stems)
        sizes = {s: _size(s.with_suffix(".u8")) + _size(s.with_suffix(".jsonl")) for s in stems}
        total = sum(sizes.values())
        for stem in stems:
            if total <= self.max_total_bytes:
                break
            if stem in live:
                continue
            for f in (stem.with_suffix(".jsonl"), stem.with_suffix(".u8")):
                f.unlink(missing_ok=True)
            total -= sizes[stem]


def started(stem: Path) -> float | None:
    """When a shard was started (seconds since the epoch, from its name), None if not one of ours."""
    parts = stem.name.rsplit("-", 2)
    return int(parts[1]) / 1e9 if len(parts) == 3 and parts[1].isdigit() else None


def _pid_of(stem: Path) -> int | None:
    tail = stem.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def _live_stems(stems: list[Path]) -> set[Path]:
    """This process's writers' current shards, plus the newest shard of each other running process."""
    newest: dict[int, Path] = {}
    for stem in stems:  # oldest first: the last one seen per pid is its newest
        if (pid := _pid_of(stem)) is not None:
            newest[pid] = stem
    me = os.getpid()
    others = {stem for pid, stem in newest.items() if pid != me and _running(pid)}
    return others | (ShardWriter._live & set(stems))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _append(path: Path, data: bytes) -> None:
    """Append all of `data` (a short write is continued, never left half-done) and fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(f"short write to {path}: {len(view)} bytes left")
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _truncate(path: Path, size: int) -> None:
    """Undo a failed append (best effort: the shard is retired either way)."""
    try:
        if path.is_file() and path.stat().st_size > size:
            os.truncate(path, size)
    except OSError:
        pass


def shard_stems(directory: Path, prefix: str) -> list[Path]:
    """Every shard in `directory`, oldest first (the stem starts with its start time)."""
    if not Path(directory).is_dir():
        return []
    return sorted({p.with_suffix("") for p in Path(directory).glob(f"{prefix}-*.jsonl")})


def _complete_records(path: Path, rows: int) -> tuple[list[dict], int]:
    """The complete, parseable lines of a shard's records whose digit was fully written, and
    how many other lines there were (a torn last line counts once it is followed by others)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # removed by retention meanwhile
        return [], 0
    good, bad = [], 0
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is being written
        try:
            record = _loads(line)
        except ValueError:  # orjson's JSONDecodeError is a ValueError too
            bad += bool(line.strip())
            continue
        if isinstance(record, dict) and isinstance(record.get("row"), int) and 0 <= record["row"] < rows:
            good.append(record)
        else:
            bad += 1
    return good, bad


def read(directory: Path, prefix: str, keep=None, stems: Iterable[Path] | None = None) -> Batch:
    """Every readable record (that `keep(record)` accepts) with its digit, oldest shard first."""
    records: list[dict] = []
    images: list[np.ndarray] = []
    skipped = 0
    for stem in stems if stems is not None else shard_stems(directory, prefix):
        try:
            pixels = np.fromfile(stem.with_suffix(".u8"), dtype=np.uint8)
        except FileNotFoundError:
            continue
        rows = len(pixels) // DIGIT_BYTES
        digits = pixels[: rows * DIGIT_BYTES].reshape(rows, 28, 28)
        complete, bad = _complete_records(stem.with_suffix(".jsonl"), rows)
        skipped += bad
        chosen = [r for r in complete if keep is None or keep(r)]
        records.extend(chosen)
        if chosen:
            images.append(digits[[r["row"] for r in chosen]])
    if not records:
        return Batch([], EMPTY.images, skipped)
    return Batch(records, np.concatenate(images), skipped)
