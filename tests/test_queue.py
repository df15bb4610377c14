"""Issue 24, point 3: the labelling queue asks for the labels worth most (the smallest margin
between the two most probable digits first), leaves near-copies out and drops what is labelled.

The ranking is shown twice: on hand-set probabilities (fast), and on the answers of a model
that reads well (the session's `reader`), logged through the service's own prediction log.
The served queue (key, PNG, bad `n`) and the "Help label" page are in test_ui_browser.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.records import feedback, prediction_log, queue
from mnist_mlops.training.data import load_sample

from helpers import Project, blended_batch


def logged(directory: Path, probs: np.ndarray, images: np.ndarray) -> list[str]:
    """Answers written to a prediction log as the service writes them; their ids."""
    log = prediction_log.PredictionLog(directory, max_mb=64)
    ids = prediction_log.new_ids(len(probs))
    log.record(ids, "/predict", "1", np.asarray(probs, np.float32), images[..., None] / 255.0)
    log.close()
    return ids


def label(store: Path, question: queue.Question, digit: int) -> None:
    feedback.FeedbackStore(store).add(
        [{"label": digit, "source": "feedback", "prediction_id": question.prediction_id}], question.image[None])


def test_ambiguous_digits_are_asked_first_and_labelled_ones_leave(tmp_path: Path) -> None:
    sample = load_sample()
    rng = np.random.default_rng(0)
    clear = sample.images[rng.choice(len(sample.labels), 180, replace=False)]
    a, b = sample.images[:20], sample.images[20:40]
    blends = ((a.astype(np.float32) + b) / 2).astype(np.uint8)  # two digits in one: ambiguous
    probs = np.full((200, 10), 0.001)
    probs[:180, 3] = 0.991  # sure answers
    probs[180:, 1], probs[180:, 7] = 0.5 + rng.uniform(0, 0.05, 20), 0.45  # split between two digits
    ids = logged(tmp_path / "log", probs / probs.sum(axis=1, keepdims=True), np.concatenate([clear, blends]))

    top = queue.queue(tmp_path / "log", tmp_path / "feedback", 20)
    assert len(top) == 20 and sum(q.prediction_id in ids[180:] for q in top) >= 15
    assert [q.margin for q in top] == sorted(q.margin for q in top)
    label(tmp_path / "feedback", top[0], 1)
    after = queue.queue(tmp_path / "log", tmp_path / "feedback", 20)
    assert top[0].prediction_id not in {q.prediction_id for q in after}


def test_near_copies_are_one_question() -> None:
    img = np.zeros((28, 28), np.uint8)
    img[5:20, 10:14] = 255
    images = np.stack([img, img, np.roll(img, 8, axis=1)])
    assert queue.diverse(images, np.arange(3), 3) == [0, 2]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_good_readers_blended_digits_lead_the_queue(reader, trained_project: Project, tmp_path: Path) -> None:
    """200 answers of a model that reads well, 20 of them two digits blended half and half: the
    blends are asked far beyond their share (10%). Margin asks about what the model is unsure
    of, and a ConvNet is sure of about a third of these blends (it reads a 1 over a 4 as a 4):
    benchmarks/label_queue.py measures how many lead, draw by draw."""
    from mnist_mlops.preprocess import normalize

    images = blended_batch(trained_project)
    ids = logged(tmp_path / "log", np.asarray(reader(normalize(images))), images)
    top = queue.queue(tmp_path / "log", tmp_path / "feedback", 20)
    blended = sum(q.prediction_id in ids[180:] for q in top)
    assert len(top) == 20 and blended >= 8, (blended, [(q.digit, round(q.margin, 3)) for q in top])
    for q in top[:3]:
        label(tmp_path / "feedback", q, q.digit)
    after = {q.prediction_id for q in queue.queue(tmp_path / "log", tmp_path / "feedback", 20)}
    assert not after & {q.prediction_id for q in top[:3]} and {q.prediction_id for q in top[3:]} <= after
