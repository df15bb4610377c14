"""Predictions recorded, corrected by people, and turned into the next data version: a real
`mnist-mlops serve` on a copy of the session's project, real HTTP, the real training flow.

The module's tests share one served copy, in file order: bad requests first (nothing
stored), then the loop (labels → data.dvc → a run on base + feedback → a gate on both),
and last a SIGKILL of the whole service under load (its log must stay readable).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from mnist_mlops import feedback, prediction_log, shards
from mnist_mlops.config import MODEL_NAME

from helpers import Project, Server, copy_project, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def project(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return copy_project(trained_project, tmp_path_factory.mktemp("feedback") / "project")


@pytest.fixture(scope="module")
def server(project: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Serving the copy, writing its prediction log and labels into the project, as a user's would."""
    with serving(project, tmp_path_factory.mktemp("feedback-serve"), records_in_project=True) as srv:
        yield srv


def new_digits(project: Project) -> tuple[np.ndarray, np.ndarray]:
    """40 labelled digits the data does not hold: 30 test digits shifted 3 pixels, 10 turned on their side."""
    prepared = project.root / "artifacts" / "prepared"
    x = np.rint(np.load(prepared / "test_x.npy")[..., 0] * 255).astype(np.uint8)
    y = np.load(prepared / "test_y.npy")
    shifted, turned = np.roll(x[:30], 3, axis=2), np.rot90(x[30:40], axes=(1, 2))
    return np.concatenate([shifted, turned]), y[:40]


def flat(table: str) -> str:
    """A rich table's text on one line: wrapped cells joined, borders dropped."""
    return " ".join(table.translate({ord(c): " " for c in "│┃┌┐└┘├┤┬┴┼─━"}).split())


def store_size(project: Project) -> int:
    return len(feedback.read_all(project.root / "feedback"))


def predict(server: Server, images: np.ndarray) -> list[dict]:
    resp = server.predict(images.tolist())
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_prediction_ids_and_bad_feedback_stores_nothing(project: Project, server: Server) -> None:
    one = server.predict(np.zeros((28, 28), int).tolist())
    pid = one.json()[0]["prediction_id"]
    assert one.headers["x-prediction-id"] == pid and len(pid) == 28
    many = predict(server, np.zeros((3, 28, 28), np.uint8))
    assert len({p["prediction_id"] for p in many}) == 3 and pid not in {p["prediction_id"] for p in many}

    bad = [
        (b"{not json", 400, "not JSON"),
        (json.dumps({"prediction_id": pid, "label": 10}), 400, "integer 0–9"),
        (json.dumps({"prediction_id": pid, "label": "7"}), 400, "integer 0–9"),
        (json.dumps({"prediction_id": pid, "label": True}), 400, "integer 0–9"),
        (json.dumps({"prediction_id": pid, "label": 3.5}), 400, "integer 0–9"),
        (json.dumps({"label": 3}), 400, "'prediction_id'"),
        (json.dumps({"prediction_id": pid, "label": 3, "who": "me"}), 400, "unknown field 'who'"),
        (json.dumps([]), 400, "empty list"),
        (json.dumps([{"prediction_id": pid, "label": 1}] * 1001), 400, "too many items"),
        (json.dumps({"prediction_id": "0" * 28, "label": 3}), 404, "unknown prediction_id"),
        (json.dumps([{"prediction_id": pid, "label": 3}, {"prediction_id": "f" * 28, "label": 3}]), 404,
         "unknown prediction_id 'ffff"),
    ]
    for body, status, message in bad:
        resp = server.client.post("/feedback", content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == status and message in resp.json()["error"], (body[:80], resp.text)
    assert store_size(project) == 0, "a refused request stores nothing"

    ok = server.client.post("/feedback", json={"prediction_id": pid, "label": 0})
    assert ok.status_code == 200 and ok.json()["items"] == [{"prediction_id": pid, "label": 0,
                                                              "predicted": one.json()[0]["digit"]}]
    assert store_size(project) == 1


def test_labels_become_the_next_data_version_and_the_gate_decides_on_both(project: Project, server: Server) -> None:
    images, truth = new_digits(project)
    answers = [p for start in range(0, 40, 10) for p in predict(server, images[start:start + 10])]
    ids = [a["prediction_id"] for a in answers]
    chosen = list(range(15)) + list(range(30, 40))  # 15 shifted, the 10 turned ones: 25 labels
    first = [{"prediction_id": ids[i], "label": int((truth[i] + 1) % 10)} for i in chosen[:3]]
    assert server.client.post("/feedback", json=first).status_code == 200  # wrong at first ...
    labels = [{"prediction_id": ids[i], "label": int(truth[i])} for i in chosen]
    resp = server.client.post("/feedback", json=labels)  # ... relabelled: the last label wins
    assert resp.status_code == 200 and resp.json()["stored"] == 25
    corrected = sum(answers[i]["digit"] != truth[i] for i in chosen)
    assert corrected > 0, "the turned digits are meant to be mispredicted: some labels correct the model"

    summary = flat(project.cli("feedback").stdout)
    assert "labelled digits 26 " in summary, summary  # + the zero digit of the first test
    assert "new since the current data version 26 (data/ has 0)" in summary

    prepared = project.root / "artifacts" / "prepared"
    test_before = (prepared / "test_x.npy").read_bytes(), (prepared / "test_y.npy").read_bytes()
    pin_before = (project.root / "data.dvc").read_text()
    out = flat(project.cli("run", "--no-package").stdout)
    assert "labelled by people 26 " in out and "trained yes" in out, out
    assert (project.root / "data.dvc").read_text() != pin_before, "new labels → a new data version"
    assert ((prepared / "test_x.npy").read_bytes(), (prepared / "test_y.npy").read_bytes()) == test_before
    meta = json.loads((project.root / "data" / "feedback.json").read_text())
    assert meta["count"] == 26 and meta["base"] == 5000

    client = project.mlflow_client()
    version = max(client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version))
    assert str(version.version) == "2"
    run = client.get_run(version.run_id)
    assert run.data.metrics["feedback_digits"] == 26 and "feedback_accuracy" in run.data.metrics
    assert run.data.tags["data.feedback_count"] == "26"
    reason = version.tags["gate.reason"]
    assert "feedback slice" in reason and "test" in reason, reason
    sides = json.loads((prepared / "feedback.json").read_text())
    assert sides["in_feedback"] == run.data.metrics["feedback_slice_digits"] > 0
    assert sides["in_train"] + sides["in_val"] + sides["in_feedback"] == 26

    # The newest label of each digit is the one in the data: the three relabelled ones too.
    data_labels = np.load(project.root / "data" / "labels.npy")[5000:]
    data_images = np.load(project.root / "data" / "images.npy")[5000:]
    for i in chosen[:3]:
        row = next(k for k in range(26) if np.array_equal(data_images[k], images[i]))
        assert data_labels[row] == truth[i]

    rerun = flat(project.cli("run", "--no-package").stdout)
    assert "trained no (DVC skipped" in rerun, rerun
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2

    more = [{"prediction_id": ids[i], "label": int(truth[i])} for i in range(15, 25)]
    assert server.client.post("/feedback", json=more).status_code == 200
    held = flat(project.cli("run", "--no-package").stdout)
    assert "trained no (DVC skipped" in held and "26 (10 new kept for later" in held, held
    assert json.loads((project.root / "data" / "feedback.json").read_text()) == meta
    assert "new since the current data version 10 (data/ has 26)" in flat(project.cli("feedback").stdout)


def test_a_sigkilled_service_leaves_a_readable_log(project: Project, server: Server) -> None:
    """Kill -9 the whole service while 4 clients predict: every record written before is readable."""
    log_dir = project.root / "logs" / "predictions"
    answered: list[tuple[float, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not stop.is_set():
                try:
                    resp = c.post("/predict", json={"images": np.full((4, 28, 28), 9).tolist()})
                except httpx.HTTPError:
                    return
                answered.extend((time.monotonic(), p["prediction_id"]) for p in resp.json())

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(4)
    killed_at = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    batch = prediction_log.read_window(log_dir)  # parses: no torn record, every digit present
    logged = {r["prediction_id"] for r in batch.records}
    assert len(batch.images) == len(batch.records) > 0
    settled = {pid for at, pid in answered if at < killed_at - 1.5}  # flushed twice a second
    assert settled and settled <= logged, f"{len(settled - logged)} of {len(settled)} lost"
    assert all(shards.shard_stems(log_dir, prediction_log.PREFIX))
