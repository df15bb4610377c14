"""The trained model's file: saved atomically and byte-for-byte reproducible.

DVC records the train stage's output by its md5, so the same code, data and params must write
the same bytes: otherwise a fresh clone's first `make run` rewrites `dvc.lock` and leaves the
checkout dirty. Keras' `.keras` zip is not reproducible as written. It stamps the save time
(`metadata.json`'s `date_saved`, each zip entry's time) and numbers shared objects by their
Python `id()` (`config.json`'s `shared_object_id`). The weights themselves are deterministic.
`save_keras` rewrites those three things canonically: no save time, 1980-01-01 for every entry,
and shared objects numbered in order of first appearance. Loading reads the numbers only to
tell which configs are the same object, so the model loads as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

from mnist_mlops.errors import UserError

TAG_WEIGHTS = "model.weights_md5"  # the model file's md5, on its training run and its registered version
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold


def file_md5(path: Path) -> str:
    """The md5 DVC records for the file, and the tag that finds the MLflow run that trained it."""
    return hashlib.md5(path.read_bytes()).hexdigest()


def save_keras(model, path: Path) -> None:
    """Save to a temp file, make it canonical, then rename: a crash mid-save never leaves a half
    model. A failed write (disk full, read-only, no permission) leaves the previous model file as
    it was, removes the temp file and is reported in one line."""
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.keras")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(tmp)
        canonicalize(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot save the model to {path}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def canonicalize(path: Path) -> None:
    """Rewrite a `.keras` zip in place without its save time and Python object ids."""
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    tmp = path.with_name(path.name + ".canonical")
    with zipfile.ZipFile(tmp, "w") as out:
        for info, data in entries:
            entry = zipfile.ZipInfo(info.filename, date_time=ZIP_EPOCH)
            entry.compress_type, entry.external_attr = info.compress_type, info.external_attr
            out.writestr(entry, _canonical_entry(info.filename, data))
    os.replace(tmp, path)


def _canonical_entry(name: str, data: bytes) -> bytes:
    if name == "metadata.json":
        meta = json.loads(data)
        meta.pop("date_saved", None)
        return json.dumps(meta).encode()
    if name == "config.json":
        return json.dumps(_renumber_shared(json.loads(data), {})).encode()
    return data


def _renumber_shared(node, ids: dict):
    """`shared_object_id`s replaced by 1, 2, ... in order of first appearance (same id, same number)."""
    if isinstance(node, dict):
        return {key: (ids.setdefault(value, len(ids) + 1) if key == "shared_object_id"
                      else _renumber_shared(value, ids)) for key, value in node.items()}
    if isinstance(node, list):
        return [_renumber_shared(item, ids) for item in node]
    return node
