"""The prediction log, the feedback store and data that grows with them (no servers: fast).

The service's side of it (ids, /feedback over HTTP, a SIGKILLed service) is in
tests/test_feedback.py; here the formats, the crash safety of a torn write, retention, the
newest-label-wins rule, `feedback_min_new`, and the base test split that never moves. Their
labelled "digits" are random pixels with no champion to read them, so label screening is off
here (tests/test_screening.py screens with a real champion; tests/test_label_verdicts.py has
its rules).
"""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnist_mlops.config import Paths, validate
from mnist_mlops.digit_features import FEATURES
from mnist_mlops.records import feedback, prediction_log, shards
from mnist_mlops.training.data import load_sample, read_data, write_data
from mnist_mlops.training.fetch import fetch
from mnist_mlops.training.prepare import FEEDBACK_SPLIT, load_split, prepare


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def test_shards_survive_a_torn_write_and_rotate(tmp_path: Path) -> None:
    writer = shards.ShardWriter(tmp_path, "t", shard_bytes=10 * 784)
    imgs = digits(25)
    for i in range(0, 25, 5):
        writer.append([{"i": i + k} for k in range(5)], imgs[i:i + 5])
    stems = shards.shard_stems(tmp_path, "t")
    assert len(stems) == 3  # 10 digits per shard: 10 + 10 + 5
    # A SIGKILL mid-append: half a digit and half a record at the end of the last shard.
    with stems[-1].with_suffix(".u8").open("ab") as fh:
        fh.write(b"\x07" * 300)
    with stems[-1].with_suffix(".jsonl").open("ab") as fh:
        fh.write(b'{"i": 99, "row": 5')
    batch = shards.read(tmp_path, "t")
    assert [r["i"] for r in batch.records] == list(range(25))
    assert np.array_equal(batch.images, imgs)


def test_a_record_whose_digit_was_not_written_is_skipped(tmp_path: Path) -> None:
    writer = shards.ShardWriter(tmp_path, "t", shard_bytes=1 << 20)
    writer.append([{"i": 0}], digits(1))
    stem = shards.shard_stems(tmp_path, "t")[0]
    with stem.with_suffix(".jsonl").open("ab") as fh:  # a line pointing past the end of the .u8 file
        fh.write(b'{"i": 1, "row": 1}\n')
    assert [r["i"] for r in shards.read(tmp_path, "t").records] == [0]


def test_retention_deletes_the_oldest_shards(tmp_path: Path) -> None:
    writer = shards.ShardWriter(tmp_path, "t", shard_bytes=4 * 784, max_total_bytes=10 * 1024)
    for i in range(40):
        writer.append([{"i": i}], digits(1, i))
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 10 * 1024 + 4 * 900
    kept = [r["i"] for r in shards.read(tmp_path, "t").records]
    assert kept == list(range(40 - len(kept), 40)) and 8 <= len(kept) < 40  # the newest, in order


def disk_full(path: Path):
    """Make appends to `path` fail as on a full disk (a real ENOSPC: a symlink to /dev/full);
    returns a function that puts the file back as it was."""
    saved = path.read_bytes()
    path.unlink()
    path.symlink_to("/dev/full")

    def restore() -> None:
        path.unlink()
        path.write_bytes(saved)
    return restore


def test_a_failed_record_write_leaves_every_later_record_with_its_own_digit(tmp_path: Path) -> None:
    """Disk full after the digits were written but before their records: the append is undone
    and the shard retired, so every later record still points at its own digit."""
    writer = shards.ShardWriter(tmp_path, "t", shard_bytes=1 << 20)
    imgs = digits(12)
    writer.append([{"i": i} for i in range(3)], imgs[:3])
    restore = disk_full(shards.shard_stems(tmp_path, "t")[0].with_suffix(".jsonl"))
    with pytest.raises(OSError, match="No space left"):
        writer.append([{"i": i} for i in range(3, 6)], imgs[3:6])
    restore()
    for start in (6, 9):
        writer.append([{"i": i} for i in range(start, start + 3)], imgs[start:start + 3])
    batch = shards.read(tmp_path, "t")
    got = [r["i"] for r in batch.records]
    assert got == [0, 1, 2, 6, 7, 8, 9, 10, 11], got  # the failed batch is not there, nothing else lost
    assert np.array_equal(batch.images, imgs[got]), "a record points at another record's digit"
    assert batch.skipped == 0


def test_two_writers_with_a_tiny_retention_limit_lose_nothing_from_a_live_shard(tmp_path: Path) -> None:
    """Worker B (another process) writes one batch and keeps its shard open; worker A rotates
    through many shards under a tiny limit. B's live shard is spared: its next batch lands
    beside the first, each record with its own digit."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from mnist_mlops.records import shards\n"
        f"w = shards.ShardWriter(sys.argv[1], 't', shard_bytes=1 << 20, max_total_bytes={8 * 1024})\n"
        "for n in (0, 1):\n"
        "    w.append([{'who': 'B', 'i': n}], np.full((1, 28, 28), 200 + n, np.uint8))\n"
        "    print('written', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    b = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert b.stdout.readline().strip() == "written"
        a = shards.ShardWriter(tmp_path, "t", shard_bytes=2 * 784, max_total_bytes=8 * 1024)
        for i in range(30):
            time.sleep(0.002)  # a new start time for each of A's shards
            a.append([{"who": "A", "i": i}], digits(1, i))
        b.stdin.write("\n")
        b.stdin.flush()
        assert b.stdout.readline().strip() == "written"
        b.stdin.write("\n")
        b.stdin.flush()
        assert b.wait(timeout=30) == 0
    finally:
        b.kill()
    batch = shards.read(tmp_path, "t")
    from_b = [(r["i"], int(img[0, 0])) for r, img in zip(batch.records, batch.images, strict=True) if r["who"] == "B"]
    assert from_b == [(0, 200), (1, 201)], from_b
    assert len(shards.shard_stems(tmp_path, "t")) < 30, "retention still deletes A's closed shards"


def test_prediction_log_records_what_the_model_saw_and_reads_a_window(tmp_path: Path) -> None:
    log = prediction_log.PredictionLog(tmp_path, max_mb=1, flush_seconds=0.05)
    imgs = digits(3)
    x = imgs[..., None].astype(np.float32) / 255
    probs = np.eye(10, dtype=np.float32)[[1, 2, 3]]
    ids = prediction_log.new_ids(3)
    log.record(ids, "predict", "7", probs, x)
    deadline = time.monotonic() + 5
    while not prediction_log.read_window(tmp_path).records and time.monotonic() < deadline:
        time.sleep(0.05)  # the writer thread, not the caller, writes
    log.close()
    batch = prediction_log.read_window(tmp_path)
    assert [r["prediction_id"] for r in batch.records] == ids
    assert np.array_equal(batch.images, imgs)
    r = batch.records[0]
    assert (r["digit"], r["confidence"], r["model_version"], r["endpoint"]) == (1, 1.0, "7", "predict")
    assert len(r["probabilities"]) == 10 and set(FEATURES) <= set(r)
    assert abs(r["ink"] - (imgs[0] > 127).mean()) < 1e-3
    now = datetime.now(UTC)
    assert len(prediction_log.read_window(tmp_path, now - timedelta(minutes=1), now + timedelta(seconds=1))) == 3
    assert len(prediction_log.read_window(tmp_path, now + timedelta(seconds=1))) == 0
    found = prediction_log.find(tmp_path, {ids[1], "0" * 28})
    assert set(found) == {ids[1]} and np.array_equal(found[ids[1]][1], imgs[1])
    assert abs(prediction_log.id_time(ids[0]) - time.time()) < 60


def test_one_flush_of_many_requests_keeps_each_record_with_its_digit(tmp_path: Path) -> None:
    """The writer joins everything queued into one append (two fsyncs a flush, not a request):
    requests of 1, 4 and 2 digits, from two versions and endpoints, in 28×28×1 and 784 shapes,
    each record keeps its own id, answer, probabilities and digit."""
    log = prediction_log.PredictionLog(tmp_path, max_mb=1, flush_seconds=3600)
    imgs = digits(7)
    x = imgs.astype(np.float32) / 255
    labels = [3, 1, 4, 1, 5, 9, 2]
    probs = np.full((7, 10), 0.01, np.float32)
    probs[np.arange(7), labels] = 0.91
    ids = prediction_log.new_ids(7)
    appends = []
    append = log.writer.append
    log.writer.append = lambda records, images: (appends.append(len(records)), append(records, images))
    for lo, hi, version, endpoint, shape in ((0, 1, "1", "predict", (-1, 28, 28, 1)),
                                             (1, 5, "2", "predict_image", (-1, 28, 28, 1)),
                                             (5, 7, "2", "predict", (-1, 784))):
        log.record(ids[lo:hi], endpoint, version, probs[lo:hi], x[lo:hi].reshape(shape))
    log.flush()
    assert appends == [7]  # one append (so two fsyncs) for the three requests
    batch = prediction_log.read_window(tmp_path)
    log.close()
    assert [r["prediction_id"] for r in batch.records] == ids
    assert [r["digit"] for r in batch.records] == labels
    assert [r["model_version"] for r in batch.records] == ["1", "2", "2", "2", "2", "2", "2"]
    assert [r["endpoint"] for r in batch.records][:2] == ["predict", "predict_image"]
    assert [r["row"] for r in batch.records] == list(range(7)) and np.array_equal(batch.images, imgs)
    assert all(r["probabilities"][d] == pytest.approx(0.91) and r["confidence"] == pytest.approx(0.91)
               for r, d in zip(batch.records, labels, strict=True))
    assert all(abs(r["ink"] - (i > 127).mean()) < 1e-3 for r, i in zip(batch.records, imgs, strict=True))


def test_the_newest_label_of_a_digit_wins(tmp_path: Path) -> None:
    store = feedback.FeedbackStore(tmp_path)
    a, b = digits(2)
    store.add([{"label": 3, "source": "feedback", "predicted": 3}], a[None])
    store.add([{"label": 5, "source": "feedback", "predicted": 3}], b[None])
    first = feedback.accepted(tmp_path).newest
    time.sleep(0.01)
    store.add([{"label": 8, "source": "feedback", "predicted": 3}], a[None])  # relabelled: last wins
    ex = feedback.accepted(tmp_path)
    assert len(ex) == 2 and sorted(ex.labels.tolist()) == [5, 8]
    assert sorted(feedback.accepted(tmp_path, until=first).labels.tolist()) == [3, 5]
    c = feedback.counts(tmp_path, since=first)
    assert (c["total"], c["new"], c["disagreed"], c["per_label"][8]) == (2, 1, 2, 1)
    assert feedback.export(tmp_path, tmp_path / "out.npz") == 2
    with np.load(tmp_path / "out.npz") as z:
        assert z["x"].shape == (2, 28, 28) and sorted(z["y"].tolist()) == [5, 8]


def labelled(store_dir: Path, n: int, seed: int) -> None:
    """n new labelled digits: sample digits shifted by a few pixels (not in the base data)."""
    base = load_sample()
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(base.labels), n, replace=False)
    imgs = np.roll(base.images[idx], shift=int(rng.integers(2, 5)), axis=2)
    feedback.FeedbackStore(store_dir).add(
        [{"label": int(base.labels[i]), "source": "import"} for i in idx], imgs)


def test_data_grows_with_enough_new_labels_and_the_base_test_split_stays(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    params = validate({"data": {"screen_labels": False, "feedback_min_new": 20}})
    assert fetch(params, paths).feedback == 0
    assert not (paths.data / "feedback.json").exists()  # no feedback: data/ exactly as before
    prepare(paths, params)
    test_before = (paths.prepared / "test_x.npy").read_bytes()
    before = len(load_split(paths.prepared, "train").y) + len(load_split(paths.prepared, "val").y)

    labelled(paths.feedback, 10, seed=1)
    r = fetch(params, paths)
    assert (r.changed, r.feedback, r.kept) == (False, 0, 10)  # too few: kept for later

    labelled(paths.feedback, 15, seed=2)
    r = fetch(params, paths)
    assert (r.changed, r.feedback, r.kept, r.count) == (True, 25, 0, 5025)
    meta = read_data(paths.data)
    assert len(meta.labels) == 5025
    sizes = prepare(paths, params)
    assert (paths.prepared / "test_x.npy").read_bytes() == test_before
    assert sizes["train"] + sizes["val"] + sizes[FEEDBACK_SPLIT] == before + 25  # each feedback digit: one side
    assert sizes[FEEDBACK_SPLIT] > 0 and sizes["test"] == 1000

    labelled(paths.feedback, 5, seed=3)
    assert fetch(params, paths).changed is False  # 5 new: below the minimum, data/ unchanged


def labelled_folder(root: Path) -> Path:
    """DIR/3/ and DIR/7/ with a PNG and a JPEG each, a corrupt PNG and a text file."""
    base = load_sample()
    for d in (3, 7):
        (root / str(d)).mkdir(parents=True)
        img = base.images[np.flatnonzero(base.labels == d)[0]]
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg")):
            buf = io.BytesIO()
            Image.fromarray(255 - img).resize((140, 140)).save(buf, format=fmt)
            (root / str(d) / f"a.{ext}").write_bytes(buf.getvalue())
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "7" / "notes.txt").write_text("not an image")
    return root


def test_import_folder_stores_the_good_and_lists_the_rest(tmp_path: Path) -> None:
    from mnist_mlops.records.labelled import import_folder

    result = import_folder(labelled_folder(tmp_path / "digits"), tmp_path / "store")
    assert result.stored == 4 and result.per_label[3] == 2 and result.per_label[7] == 2
    assert sorted(name for name, _ in result.skipped) == ["3/broken.png", "7/notes.txt"]
    ex = feedback.accepted(tmp_path / "store")
    assert sorted(ex.labels.tolist()) == [3, 3, 7, 7] and ex.images.max() == 255
    assert {r["source"] for r in ex.records} == {"import"}


def test_feedback_commands(project, tmp_path: Path) -> None:
    """`mnist-mlops feedback import | (counts) | export`, as a user runs them."""
    proc = project.cli("feedback", "import", str(labelled_folder(tmp_path / "digits")))
    listed = proc.stderr  # the skipped files, one row each
    assert "3/broken.png" in listed and "7/notes.txt" in listed and "not a PNG or JPEG" in listed, listed
    assert "stored 4 skipped 2" in " ".join(proc.stdout.replace("│", " ").split()), proc.stdout
    counts = " ".join(project.cli("feedback").stdout.replace("│", " ").split())
    assert "labelled digits 4" in counts and "3:2" in counts and "7:2" in counts, counts
    assert "new since the current data version 4 (data/ has 0)" in counts
    project.cli("feedback", "export", str(tmp_path / "out.npz"))
    with np.load(tmp_path / "out.npz") as z:
        assert sorted(z["y"].tolist()) == [3, 3, 7, 7]
    bad = project.cli("feedback", "export", str(tmp_path / "out.csv"), check=False)
    assert bad.returncode == 2 and "name it FILE.npz" in bad.stderr


def test_import_of_a_folder_without_digit_folders_is_one_line(tmp_path: Path) -> None:
    from mnist_mlops.errors import UserError
    from mnist_mlops.records.labelled import import_folder

    with pytest.raises(UserError, match="no digit folders"):
        import_folder(tmp_path, tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_write_data_without_feedback_is_byte_identical(tmp_path: Path) -> None:
    """data/ without feedback holds the two .npy files only: the committed data.dvc stays valid."""
    write_data(load_sample(), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["images.npy", "labels.npy"]


def test_labels_never_make_the_data_unbalanced_nor_the_pipeline_unrunnable(tmp_path: Path) -> None:
    """600 labels of one digit would push the sample (500 per class) past data.max_class_imbalance=1.5:
    the class gets only what fits (the oldest labels first), the rest wait, and fetch never fails."""
    paths = Paths(tmp_path)
    params = validate({"data": {"screen_labels": False, "feedback_min_new": 1, "max_class_imbalance": 1.5}})
    base = load_sample()
    sevens = np.roll(base.images[base.labels == 7][:300], 3, axis=2)
    store = feedback.FeedbackStore(paths.feedback)
    for _ in range(2):  # the same 300 digits shifted twice: 600 distinct labelled 7s
        store.add([{"label": 7, "source": "import"}] * len(sevens), sevens)
        sevens = np.roll(sevens, 1, axis=1)
    r = fetch(params, paths)
    assert r.changed and r.feedback == 250 and r.screened["capped"] == 350, r  # 500 + 250 = 1.5 × 500
    counts = np.bincount(read_data(paths.data).labels, minlength=10)
    assert counts.max() / counts.min() <= 1.5 and counts[7] == 750


def test_blank_digits_never_become_data(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    params = validate({"data": {"screen_labels": False, "feedback_min_new": 1}})
    ink = np.roll(load_sample().images[:3], 3, axis=2)
    blank = np.zeros((2, 28, 28), np.uint8)
    blank[1, 14, 10:14] = 255  # four pixels of ink: a speck, not a digit
    feedback.FeedbackStore(paths.feedback).add([{"label": 1, "source": "import"}] * 5, np.concatenate([ink, blank]))
    r = fetch(params, paths)
    assert (r.feedback, r.screened["blank"]) == (3, 2)


def test_the_stores_are_one_setting_for_the_service_fetch_and_monitor(tmp_path: Path, monkeypatch) -> None:
    """$MNIST_MLOPS_FEEDBACK (and $MNIST_MLOPS_PREDICTION_LOG), which the service honours, is where
    the fetch step and the monitor look too: labels stored there become data."""
    from mnist_mlops.monitoring.check import new_labels

    shared = tmp_path / "shared"
    monkeypatch.setenv("MNIST_MLOPS_FEEDBACK", str(shared / "labels"))
    monkeypatch.setenv("MNIST_MLOPS_PREDICTION_LOG", str(shared / "log"))
    paths = Paths(tmp_path / "project")
    assert (paths.feedback, paths.prediction_log) == (shared / "labels", shared / "log")
    labelled(shared / "labels", 25, seed=4)
    params = validate({"data": {"screen_labels": False, "feedback_min_new": 20}})
    assert new_labels(paths, params) == 25  # the monitor sees what a retrain would add...
    assert fetch(params, paths).feedback == 25  # ... and the fetch step adds it
    assert new_labels(paths, params) == 0


def test_lookups_read_only_the_shards_of_the_ids_moment(tmp_path: Path) -> None:
    """An id names the millisecond it was made: a shard started long after it, or last written
    long before, cannot hold it and is not read; an id from the future is simply unknown."""
    import os

    old = shards.ShardWriter(tmp_path, prediction_log.PREFIX, shard_bytes=1 << 20)
    ids = prediction_log.new_ids(2)
    old.append([{"prediction_id": ids[0]}], digits(1))
    day_ago = time.time() - 86400
    old_stem = shards.shard_stems(tmp_path, prediction_log.PREFIX)[0]
    os.utime(old_stem.with_suffix(".jsonl"), (day_ago, day_ago))  # last written a day ago...
    assert prediction_log.find(tmp_path, {ids[0]}) == {}  # ... so it cannot hold an id of now
    new = shards.ShardWriter(tmp_path, prediction_log.PREFIX, shard_bytes=1 << 20)
    new.append([{"prediction_id": ids[1]}], digits(1, 1))
    assert set(prediction_log.find(tmp_path, set(ids))) == {ids[1]}
    future = f"{(time.time_ns() // 1_000_000 + 3_600_000):012x}" + ids[1][12:]
    assert prediction_log.could_hold(shards.shard_stems(tmp_path, prediction_log.PREFIX)[-1], time.time())
    assert prediction_log.find(tmp_path, {future}) == {}
    assert prediction_log.id_time("z" * 28) is None and prediction_log.find(tmp_path, {"z" * 28}) == {}
