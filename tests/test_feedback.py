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
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.platform.processes import free_port, start_group, stop_group, wait_http
from mnist_mlops.platform.versioning import dvc_md5
from mnist_mlops.records import feedback, prediction_log, shards

from helpers import BIN, Project, Server, copy_project, serving

LOOP: dict = {}  # what the loop test leaves for the lineage test after it

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def project(trained_project: Project, prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Project:
    return copy_project(trained_project, tmp_path_factory.mktemp("feedback") / "project", prefect_server)


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
    digit = np.roll(new_digits(project)[0][0], 2, axis=1)  # a real digit no data holds
    one = server.predict(digit.tolist())
    pid = one.json()[0]["prediction_id"]
    blank = predict(server, np.zeros((28, 28), np.uint8))[0]["prediction_id"]
    future = f"{(time.time_ns() // 1_000_000 + 3_600_000):012x}" + "0" * 16
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
        (json.dumps({"prediction_id": future, "label": 3}), 404, "unknown prediction_id"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "not JSON"),  # nested too deep: a 400, not a 500
        (json.dumps({"prediction_id": blank, "label": 0}), 400, "blank digit (no ink)"),
        (json.dumps([{"prediction_id": pid, "label": 3}, {"prediction_id": blank, "label": 0}]), 400, "no ink"),
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


def test_a_full_disk_stores_no_label_and_the_next_ones_keep_their_digits(project: Project, server: Server) -> None:
    """The feedback store's records file on a full disk (a real ENOSPC, /dev/full): 507 and nothing
    stored; then labels are taken again, each with its own digit."""
    images = np.roll(new_digits(project)[0][:3], 2, axis=1)
    ids = [p["prediction_id"] for p in predict(server, images)]
    [stem] = shards.shard_stems(project.root / "feedback", feedback.PREFIX)
    records = stem.with_suffix(".jsonl")
    saved = records.read_bytes()
    records.unlink()
    records.symlink_to("/dev/full")
    try:
        full = server.client.post("/feedback", json={"prediction_id": ids[0], "label": 1})
    finally:
        records.unlink()
        records.write_bytes(saved)
    assert full.status_code == 507 and "nothing was stored" in full.json()["error"], full.text
    assert store_size(project) == 1
    ok = server.client.post("/feedback", json=[{"prediction_id": i, "label": 1} for i in ids[1:]])
    assert ok.status_code == 200, ok.text
    batch = feedback.read_all(project.root / "feedback")
    by_id = {r.get("prediction_id"): img for r, img in zip(batch.records, batch.images, strict=True)}
    assert ids[0] not in by_id
    assert all(np.array_equal(by_id[i], img) for i, img in zip(ids[1:], images[1:], strict=True))
    assert len([r for r in batch.records if r.get("prediction_id") in ids]) == 2
    drop_labels(project, set(ids))


def test_a_replica_sharing_the_stores_takes_labels_for_the_others_answers(project: Project, server: Server,
                                                                          tmp_path_factory) -> None:
    """Two services on one log and label store (replicas on shared storage): a label sent to one
    for an answer the other gave, at once, is found and stored."""
    env = {"MNIST_MLOPS_PREDICTION_LOG": str(project.root / "logs" / "predictions"),
           "MNIST_MLOPS_FEEDBACK": str(project.root / "feedback")}
    replica = Project(project.root, {**project.env, **env})
    with serving(replica, tmp_path_factory.mktemp("replica"), records_in_project=True) as other:
        digit = np.roll(new_digits(project)[0][5], 2, axis=1)
        pid = predict(server, digit)[0]["prediction_id"]
        resp = other.client.post("/feedback", json={"prediction_id": pid, "label": 4})
        assert resp.status_code == 200, resp.text
    batch = feedback.read_all(project.root / "feedback")
    [row] = [i for i, r in enumerate(batch.records) if r.get("prediction_id") == pid]
    assert np.array_equal(batch.images[row], digit)
    drop_labels(project, {pid})


def drop_labels(project: Project, ids: set[str]) -> None:
    """Remove the shards that hold only these side tests' labels: the loop below counts its own."""
    for stem in shards.shard_stems(project.root / "feedback", feedback.PREFIX):
        records = [json.loads(line) for line in stem.with_suffix(".jsonl").read_text().splitlines() if line]
        if records and all(r.get("prediction_id") in ids for r in records):
            stem.with_suffix(".u8").unlink()
            stem.with_suffix(".jsonl").unlink()
    assert store_size(project) == 1


def test_labels_become_the_next_data_version_and_the_gate_decides_on_both(project: Project, server: Server) -> None:
    images, truth = new_digits(project)
    # People try the service with MNIST's own test digits: 30 base test digits, sent as the
    # integers they are and labelled right, must never reach train or val.
    test_x = np.rint(np.load(project.root / "artifacts" / "prepared" / "test_x.npy")[100:130, ..., 0] * 255)
    test_y = np.load(project.root / "artifacts" / "prepared" / "test_y.npy")[100:130]
    copies = predict(server, test_x.astype(np.uint8))
    leaked = [{"prediction_id": a["prediction_id"], "label": int(y)} for a, y in zip(copies, test_y, strict=True)]
    assert server.client.post("/feedback", json=leaked).status_code == 200
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
    assert "labelled digits 56 " in summary, summary  # + the digit of the first test, + the 30 test copies
    assert "new since the current data version 56 (data/ has 0)" in summary

    prepared = project.root / "artifacts" / "prepared"
    test_before = (prepared / "test_x.npy").read_bytes(), (prepared / "test_y.npy").read_bytes()
    pin_before = (project.root / "data.dvc").read_text()
    out = flat(project.cli("run", "--no-package").stdout)
    assert "labelled by people 26 " in out and "trained yes" in out, out
    assert "labels held back 30 test-digit copies " in out, out
    assert (project.root / "data.dvc").read_text() != pin_before, "new labels → a new data version"
    assert ((prepared / "test_x.npy").read_bytes(), (prepared / "test_y.npy").read_bytes()) == test_before
    meta = json.loads((project.root / "data" / "feedback.json").read_text())
    assert meta["count"] == 26 and meta["base"] == 5000

    client = project.mlflow_client()
    version = max(client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version))
    assert str(version.version) == "2"
    run = client.get_run(version.run_id)
    assert run.data.metrics["feedback_digits"] == 26 and "feedback_accuracy" in run.data.metrics
    assert run.data.metrics["feedback.leaks_blocked"] == 30
    seen = {img.tobytes() for img in test_x.astype(np.uint8)}
    for split in ("train", "val"):
        held = np.rint(np.load(prepared / f"{split}_x.npy")[..., 0] * 255).astype(np.uint8)
        assert not [img for img in held if img.tobytes() in seen], f"a labelled test digit reached {split}"
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

    LOOP["labelled"] = (ids[chosen[3]], int(truth[chosen[3]]), answers[chosen[3]]["digit"])
    LOOP["fresh"] = images[26]  # a digit no label and no data holds
    rerun = flat(project.cli("run", "--no-package").stdout)
    assert "trained no (DVC skipped" in rerun, rerun
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2

    more = [{"prediction_id": ids[i], "label": int(truth[i])} for i in range(15, 25)]
    assert server.client.post("/feedback", json=more).status_code == 200
    held = flat(project.cli("run", "--no-package").stdout)
    assert "trained no (DVC skipped" in held and "26 (10 new kept for later" in held, held
    assert json.loads((project.root / "data" / "feedback.json").read_text()) == meta
    assert "new since the current data version 10 (data/ has 26)" in flat(project.cli("feedback").stdout)


def test_a_prediction_traces_back_to_its_label_data_and_decisions(project: Project, server: Server, browser,
                                                                   tmp_path) -> None:
    """Issue 29: the lineage card. The labelled prediction's card says which data version (and
    model version) used its label; a prediction the new champion answers names that version,
    its run, the data version holding the label and the gate's reason; every link opens."""
    pid, label, answered = LOOP["labelled"]
    data_md5 = dvc_md5(project.root / "data.dvc")
    client = project.mlflow_client()
    v2 = client.get_model_version(MODEL_NAME, "2")
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version) == "2", v2.tags
    port = free_port()
    ui = start_group([str(BIN / "mnist-mlops"), "ui", "--port", str(port)], tmp_path / "ui.log", project.env,
                     cwd=project.root)
    try:
        mlflow_ui = f"http://127.0.0.1:{port}"
        wait_http(f"{mlflow_ui}/health", ui, timeout=240)
        first = trace(project, pid, mlflow_ui)
        assert first["prediction"]["id"] == pid and first["prediction"]["digit"] == answered
        assert first["prediction"]["image"].startswith("data:image/png;base64,")
        assert first["model"]["version"] == "1"  # v1 answered it
        assert first["label"]["label"] == label
        assert {"version": "2", "data_md5": data_md5, "run_id": v2.run_id} in first["label"]["used_in"]
        assert first["label"]["state"].startswith(f"used in data version {data_md5}"), first["label"]
        over_http = server.client.get(f"/predictions/{pid}")
        assert over_http.status_code == 200 and over_http.json()["label"] == first["label"]
        assert over_http.json()["prediction"]["image"] == first["prediction"]["image"]
        bad, unknown = server.client.get("/predictions/nonsense"), server.client.get(f"/predictions/{'0' * 28}")
        assert (bad.status_code, unknown.status_code) == (400, 404), (bad.text, unknown.text)
        assert "older than its retention" in unknown.json()["detail"][0]["msg"], unknown.text
        for args in (["nonsense"], ["0" * 28], []):
            refused = project.cli("trace", *args, check=False)
            assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr

        deadline = time.monotonic() + 120  # the service follows the champion: v2 within a few polls
        while server.client.get("/model").json()["model_version"] != "2":
            assert time.monotonic() < deadline, server.client.get("/model").text
            time.sleep(1)
        again = predict(server, LOOP["fresh"][None])[0]
        time.sleep(2 * prediction_log.FLUSH_SECONDS + 0.5)  # in the log on disk, where the monitor reads
        project.cli("monitor", "--since", "30m", "--no-retrain")  # a check of the window it falls in
        second = trace(project, again["prediction_id"], mlflow_ui, tmp_path / "card.html")
        model = second["model"]
        assert model["links"]["monitoring_run"], model["links"]
        assert (model["version"], model["run_id"], model["champion"]) == ("2", v2.run_id, True)
        assert model["data"]["md5"] == data_md5 and model["data"]["feedback_digits"] == 26
        assert model["data"]["base_digits"] == 5000
        assert model["decision"]["reason"] == v2.tags["gate.reason"] and model["decision"]["verdict"] == "promoted"
        assert model["decision"]["decided_by"].startswith("the training flow (manual")
        assert model["params_changed"]["train.epochs"]["value"] == "1"
        links = [url for url in model["links"].values() if url]
        # as a browser opens them (Prefect's UI answers its deep links only to requests for a page)
        statuses = {url: httpx.get(url, headers={"Accept": "text/html"}, timeout=30).status_code for url in links}
        assert len(links) == 3 and set(statuses.values()) == {200}, statuses
        run_api = httpx.get(f"{mlflow_ui}/api/2.0/mlflow/runs/get", params={"run_id": v2.run_id}, timeout=30)
        flow_run = model["links"]["prefect_flow_run"].rsplit("/", 1)[1]
        prefect_api = httpx.get(f"{project.env['PREFECT_API_URL']}/flow_runs/{flow_run}", timeout=30)
        assert (run_api.status_code, prefect_api.status_code) == (200, 200)
        card_in_browser(browser, tmp_path / "card.html", model)
    finally:
        stop_group(ui)


def trace(project: Project, prediction_id: str, mlflow_ui: str, html: Path | None = None) -> dict:
    extra = ["--html", str(html)] if html else []
    return json.loads(project.cli("trace", prediction_id, "--json", "--mlflow-ui", mlflow_ui, *extra).stdout)


def card_in_browser(browser, card: Path, model: dict) -> None:
    """The HTML card shows the digit and the chain, and its MLflow link opens the run's page."""
    browser.get(card.as_uri())
    width = browser.execute_script("const i = document.getElementById('digit'); return i.complete && i.naturalWidth")
    text = browser.find_element("tag name", "body").text
    hrefs = [a.get_attribute("href") for a in browser.find_elements("tag name", "a")]
    browser.save_screenshot(str(card.with_suffix(".png")))  # looked at by eye: see the note
    assert width == 112, width
    assert f"model v{model['version']} (champion)" in text and model["data"]["md5"] in text, text
    assert model["decision"]["reason"][:40] in text, text
    assert model["links"]["mlflow_run"] in hrefs, hrefs
    browser.get(model["links"]["mlflow_run"])
    deadline = time.monotonic() + 90
    while model["run_name"] not in browser.find_element("tag name", "body").text:
        assert time.monotonic() < deadline, browser.find_element("tag name", "body").text[:2000]
        time.sleep(1)


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
