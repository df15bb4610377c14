"""The monitor's statistics on real MNIST digits (no servers): no false alarms on held-out
digits, drift named when the digits move, corrupt log records counted, an empty window said.
The same checks run on traffic sent through the service in tests/test_follow.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.config import Params, Paths, parse_duration, validate
from mnist_mlops.digit_features import FEATURES, feature_arrays
from mnist_mlops.errors import UserError
from mnist_mlops.monitoring import drift, report
from mnist_mlops.monitoring.accuracy import accuracy, by_version
from mnist_mlops.monitoring.check import NO_TRAFFIC, read_traffic, run_check
from mnist_mlops.monitoring.reference import Reference
from mnist_mlops.records import feedback, prediction_log, shards
from mnist_mlops.training.data import load_sample

PARAMS = Params()
WINDOW = 200


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray]:
    digits = load_sample()
    order = np.random.default_rng(1).permutation(len(digits.labels))
    return digits.images[order], digits.labels[order]


@pytest.fixture(scope="module")
def reference(sample) -> Reference:
    """Built as the evaluate stage builds it: the first 4,000 digits are 'training', and a
    perfect champion's answers on 1,000 of them stand for its answers on a test split."""
    images, labels = sample
    rng = np.random.default_rng(2)
    return Reference("1", "run", np.bincount(labels[:4000], minlength=10), np.bincount(labels[:1000], minlength=10),
                     rng.beta(20, 1, 1000).astype(np.float32), feature_arrays(images[:4000]))


def window_drift(reference: Reference, images: np.ndarray, predicted: np.ndarray,
                 confidence: np.ndarray | None = None) -> list[drift.Check]:
    conf = confidence if confidence is not None else np.random.default_rng(3).beta(20, 1, len(images))
    return drift.checks(reference, predicted, conf, feature_arrays(images), PARAMS.monitor.drift_threshold,
                        PARAMS.monitor.p_value)


def test_features_of_a_drawn_bar() -> None:
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 10:13] = 255  # a vertical bar, 20 tall, 3 wide
    f = {k: float(v[0]) for k, v in feature_arrays(img[None]).items()}
    assert (f["height"], f["width"], f["thickness"]) == (20, 3, 3)
    assert f["ink"] == pytest.approx(60 / 784) and f["centre_y"] == pytest.approx(13.5) and f["centre_x"] == 11
    assert set(f) == set(FEATURES)
    empty = feature_arrays(np.zeros((1, 28, 28), np.uint8))
    assert empty["height"][0] == 0 and empty["thickness"][0] == 0


def test_blank_digits_have_no_ink_and_every_real_one_has(sample) -> None:
    """`has_ink` (the service's `blank` field, the labels' screening): every real MNIST digit of
    the sample has ink; an empty digit, a few specks or a faint smudge are blank; so is an empty
    page sent as an upload (the conversion the service uses)."""
    import io

    from PIL import Image

    from mnist_mlops.digit_features import MIN_INK_PIXELS, has_ink
    from mnist_mlops.imaging import image_to_input
    from mnist_mlops.preprocess import to_uint8

    images, _ = sample
    assert has_ink(images).all() and has_ink(images).shape == (len(images),)
    specks = np.zeros((3, 28, 28), np.uint8)
    specks[1].flat[:MIN_INK_PIXELS - 1] = 255  # fewer specks than a stroke
    specks[2][10:20, 10:20] = 40  # a faint smudge, nowhere a quarter of full ink
    assert not has_ink(specks).any()
    specks[1].flat[MIN_INK_PIXELS - 1] = 255
    assert list(has_ink(specks)) == [False, True, False]
    page = io.BytesIO()
    Image.new("L", (200, 200), 255).save(page, "PNG")
    assert not has_ink(to_uint8(image_to_input(page.getvalue(), 10**6, 10**6)).reshape(-1, 28, 28)).any()
    with pytest.raises(ValueError, match="uint8 N×28×28"):
        has_ink(images[0])
    with pytest.raises(ValueError, match="uint8 N×28×28"):
        has_ink(images.astype(np.float32) / 255)


def test_no_false_alarm_in_five_held_out_windows(sample, reference) -> None:
    images, labels = sample
    for i in range(5):
        part = slice(4000 + i * WINDOW, 4000 + (i + 1) * WINDOW)
        checks = window_drift(reference, images[part], labels[part])
        assert [c.name for c in checks if c.drifted] == [], [c.as_dict() for c in checks]


@pytest.mark.parametrize("shift, moved", [
    ("inverted", {"ink", "height", "width", "thickness"}),
    ("thickened", {"ink", "thickness"}),
    ("rotated", {"height", "width"}),
    ("one class", {"classes"}),
])
def test_shifted_traffic_is_flagged_naming_what_moved(sample, reference, shift, moved) -> None:
    images, labels = sample[0][4000:4000 + WINDOW], sample[1][4000:4000 + WINDOW]
    if shift == "inverted":
        images = 255 - images
    elif shift == "thickened":  # 3x3 dilation: every stroke two pixels thicker
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
        images = np.max([padded[:, dy:dy + 28, dx:dx + 28] for dy in range(3) for dx in range(3)], axis=0)
    elif shift == "rotated":
        images = np.rot90(images, axes=(1, 2))
    elif shift == "one class":
        ones = np.flatnonzero(sample[1][4000:] == 1)[:WINDOW // 2]
        images = np.concatenate([images[: WINDOW // 2], sample[0][4000:][ones]])
        labels = np.concatenate([labels[: WINDOW // 2], sample[1][4000:][ones]])
    drifted = {c.name for c in window_drift(reference, images, labels) if c.drifted}
    assert moved <= drifted, drifted


def test_psi_and_confidence_checks() -> None:
    assert drift.psi(np.array([10.0] * 10), np.array([10.0] * 10)) == pytest.approx(0)
    assert drift.psi(np.array([10.0] * 10), np.array([100.0] + [0.0] * 9)) > 2
    rng = np.random.default_rng(0)
    low = drift.ks_check("confidence", rng.beta(20, 1, 1000), rng.beta(3, 2, 300), 0.2, 0.01)
    same = drift.ks_check("confidence", rng.beta(20, 1, 1000), rng.beta(20, 1, 300), 0.2, 0.01)
    assert low.drifted and not same.drifted


def test_live_accuracy_with_a_wilson_interval() -> None:
    acc = accuracy([(1, 1)] * 45 + [(1, 7)] * 5)
    assert acc.value == 0.9 and acc.low < 0.9 < acc.high and 0.75 < acc.low and acc.high < 0.97
    assert acc.per_class == {1: (45, 45), 7: (0, 5)}
    per = by_version([{"predicted": 3, "label": 3, "model_version": "2"},
                      {"predicted": 3, "label": 5, "model_version": "1"}, {"label": 4, "source": "import"}])
    assert per["all"].n == 2 and per["1"].value == 0 and per["2"].value == 1
    assert accuracy([]).value is None


def log_records(directory: Path, images: np.ndarray, digits: np.ndarray, when: datetime) -> None:
    """Records as the service logs them; confidences drawn like the reference's."""
    writer = shards.ShardWriter(directory, prediction_log.PREFIX, shard_bytes=1 << 20)
    stamp = when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    confidence = np.random.default_rng(4).beta(20, 1, len(digits))
    writer.append([{"prediction_id": f"id{i}", "time": stamp, "model_version": "1", "endpoint": "predict",
                    "digit": int(d), "confidence": float(c)}
                   for i, (d, c) in enumerate(zip(digits, confidence, strict=True))], images)


def test_corrupt_records_are_counted_never_a_crash(tmp_path: Path, sample) -> None:
    now = datetime.now(UTC)
    log_records(tmp_path, sample[0][:5], sample[1][:5], now)
    jsonl = next(tmp_path.glob("*.jsonl"))
    with jsonl.open("a") as fh:
        fh.write('{"time": "not a time", "row": 0}\n{"truncat\n')
        fh.write(json.dumps({"time": now.isoformat(), "row": 1, "digit": 12, "confidence": 2,
                             "model_version": "1"}) + "\n")
        fh.write(json.dumps({"time": now.isoformat(), "row": 99}) + "\n")  # its digit was never written
        fh.write('{"torn last line')
    traffic = read_traffic(tmp_path, now - timedelta(minutes=1), now + timedelta(minutes=1))
    assert len(traffic.records) == 5 and traffic.skipped == 4


def test_an_empty_window_says_no_traffic(tmp_path: Path, reference) -> None:
    paths = Paths(tmp_path)
    end = datetime.now(UTC)
    result = run_check(paths, PARAMS, reference, end - timedelta(hours=1), end)
    assert result.verdict == NO_TRAFFIC and result.reasons == [] and result.checks == []
    page = report.render(result, reference)
    assert "no traffic" in page and "No labels in this window" in page
    assert result.metrics()["predictions"] == 0


def test_a_window_of_traffic_gives_a_report_and_reasons(tmp_path: Path, sample, reference) -> None:
    paths = Paths(tmp_path)
    end = datetime.now(UTC)
    log_records(paths.prediction_log, 255 - sample[0][4000:4300], sample[1][4000:4300], end - timedelta(minutes=5))
    result = run_check(paths, PARAMS, reference, end - timedelta(hours=1), end)
    assert result.verdict == "drift" and "ink" in result.drifted and result.volume == {"1": 300}
    assert result.reasons and result.reasons[0].startswith("drift in ") and "ink (KS D" in result.reasons[0]
    page = report.write(result, reference, paths.monitoring).read_text()
    assert page.count("<img") == 3 and "MNIST monitoring: <span class=\"drift\">drift</span>" in page
    assert "No labels in this window" in page and "model version</th>" not in page


def test_durations_and_monitor_params() -> None:
    assert parse_duration("90s", "--since") == 90 and parse_duration("24h", "--since") == 86400
    assert parse_duration("1.5m", "--since") == 90 and parse_duration("7d", "--since") == 7 * 86400
    for bad in ("", "h", "-1h", "0", "3w"):
        with pytest.raises(UserError, match="--since: expected a duration"):
            parse_duration(bad, "--since")
    with pytest.raises(UserError, match=r"invalid parameter 'monitor.p_value'"):
        validate({"monitor": {"p_value": 2}})
    with pytest.raises(UserError, match=r"unknown parameter 'monitor.windows'"):
        validate({"monitor": {"windows": 2}})


@pytest.mark.slow
def test_the_command_refuses_bad_input_in_one_line(project) -> None:
    bad = project.cli("monitor", "--since", "3w", check=False)
    assert bad.returncode == 2 and "--since: expected a duration like 90s, 30m, 24h or 7d" in bad.stderr
    no_champion = project.cli("monitor", check=False, timeout=300)
    assert no_champion.returncode == 2, no_champion.stderr[-3000:]
    assert "no champion yet: run `mnist-mlops run`" in no_champion.stderr and "Traceback" not in no_champion.stderr
    assert not (project.root / "reports" / "monitoring").exists()


def test_labels_give_live_accuracy_and_reasons(tmp_path: Path, sample, reference) -> None:
    paths = Paths(tmp_path)
    end = datetime.now(UTC)
    images, labels = sample[0][4000:4150], sample[1][4000:4150]
    log_records(paths.prediction_log, images, labels, end - timedelta(minutes=5))
    predicted = [int(y) if i < 20 else (int(y) + 1) % 10 for i, y in enumerate(labels[:30])]  # 20 right, 10 wrong
    feedback.FeedbackStore(paths.feedback).add(
        [{"label": int(y), "source": "feedback", "predicted": p, "model_version": "1", "prediction_id": f"id{i}"}
         for i, (y, p) in enumerate(zip(labels[:30], predicted, strict=True))], images[:30])
    result = run_check(paths, PARAMS, reference, end - timedelta(hours=1), end + timedelta(minutes=1))
    live = result.accuracy["all"]
    assert (live.n, live.correct) == (30, 20) and result.accuracy["1"].n == 30 and result.new_labels == 30
    assert result.verdict == "ok"
    assert result.reasons == [f"live accuracy of champion v1 0.667 (95% CI up to {live.high:.3f}) on 30 labels "
                              "< evaluate.min_accuracy 0.95", "30 new labels >= data.feedback_min_new 20"]
    page = report.render(result, reference)
    assert page.count("<img") == 4 and "<td>1</td><td>30</td><td>0.667</td>" in page
