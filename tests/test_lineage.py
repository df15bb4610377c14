"""The lineage card's parts that need no server: the id checks, the pictures, the HTML page."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.lineage import card, render
from mnist_mlops.records import prediction_log

LINKS = card.Links("http://127.0.0.1:5000", "http://127.0.0.1:4200")


def test_what_is_not_an_id_and_an_id_nobody_knows_are_told_apart(tmp_path: Path) -> None:
    with pytest.raises(card.BadPredictionId, match="not a prediction id"):
        card.prediction_card(tmp_path / "log", tmp_path / "labels", "nonsense", LINKS)
    log = prediction_log.PredictionLog(tmp_path / "log", max_mb=1)
    log.record(prediction_log.new_ids(1), "predict", "1", np.full((1, 10), 0.1), np.zeros((1, 28, 28, 1)))
    log.close()
    with pytest.raises(card.UnknownPrediction, match="no answer with this id"):
        card.prediction_card(tmp_path / "log", tmp_path / "labels", prediction_log.new_ids(1)[0], LINKS)
    with pytest.raises(card.UnknownPrediction, match="older than its retention"):
        card.prediction_card(tmp_path / "log", tmp_path / "labels", "0" * 28, LINKS)


def test_the_digit_is_drawn_as_the_model_saw_it() -> None:
    from PIL import Image

    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255  # a "1"
    picture = render.terminal_picture(digit).splitlines()
    assert len(picture) == 14 and all(len(line) == 28 for line in picture)
    assert picture[5][13] == "█" and picture[5][2] == " " and picture[0].strip() == ""
    url = render.png_data_url(digit)
    png = Image.open(io.BytesIO(base64.b64decode(url.removeprefix("data:image/png;base64,"))))
    assert png.size == (112, 112) and np.array_equal(np.asarray(png)[::4, ::4], digit)


def test_the_html_card_escapes_what_people_wrote_and_links_what_opens() -> None:
    model = {"version": "2", "champion": True, "run_id": "abc", "run_name": "manual · data 1234", "git_commit": "f00",
             "data": {"md5": "1234.dir", "base_digits": 5000, "feedback_digits": 26, "newest_label": None,
                      "source": "sample"},
             "params_changed": {"train.epochs": {"value": "1", "default": "24"}},
             "scores": {"test_accuracy": 0.98}, "decision": {"verdict": "promoted", "reason": "<b>beats</b> v1",
                                                             "decided_by": "the training flow (manual)"},
             "links": {"mlflow_run": "http://127.0.0.1:5000/#/experiments/1/runs/abc", "prefect_flow_run": None}}
    page = render.html_card({"model": model})
    assert "&lt;b&gt;beats&lt;/b&gt; v1" in page and "<b>beats" not in page
    assert '<a href="http://127.0.0.1:5000/#/experiments/1/runs/abc">' in page
    assert "train.epochs=1 (default 24)" in page and "26 labelled by people" in page
    assert "prefect" not in page  # no link where there is no flow run


def test_a_prediction_past_the_logs_retention_still_shows_its_label_and_model(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The log has moved on (its oldest record is newer than the id), but a label recorded the
    prediction's answer and model version: the card says so, shows the labelled digit, and
    goes on to the model version (here one the registry does not have: its error, one line)."""
    import mlflow

    from mnist_mlops.records import feedback

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    old_id = f"{1_700_000_000_000:012x}" + "ab" * 8  # made in November 2023
    digit = np.zeros((1, 28, 28), np.uint8)
    digit[0, 5:20, 10:14] = 200
    store = feedback.FeedbackStore(tmp_path / "labels")
    store.add([{"label": 1, "source": "feedback", "prediction_id": old_id, "predicted": 7, "model_version": "7"}],
              digit)
    log = prediction_log.PredictionLog(tmp_path / "log", max_mb=1)
    log.record(prediction_log.new_ids(1), "predict", "1", np.full((1, 10), 0.1), np.zeros((1, 28, 28, 1)))
    log.close()

    found = card.prediction_card(tmp_path / "log", tmp_path / "labels", old_id, LINKS)
    assert found["prediction"]["in_log"] is False and "older than its retention" in found["prediction"]["note"]
    assert np.array_equal(np.asarray(found["prediction"]["image"], np.uint8), digit[0])
    assert found["label"]["label"] == 1 and found["label"]["state"] == "accepted: waiting for the next data version"
    assert found["model"]["version"] == "7" and "has no version 7" in found["model"]["error"]
    rows = render.rows(found)
    assert ("prediction", "answer", "not in the prediction log") in rows
    assert ("model v7", "error", found["model"]["error"]) in rows
