"""Serving follows the champion (a real `mnist-mlops serve`, a real registry): rollout and
rollback under load without a failed request, broken versions refused, an unreachable store
ridden out; the monitor reads what the service logged; and the whole loop (shifted traffic,
corrections, the monitor retrains, the gate decides) answered without a restart."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME, Paths, load_params, write_params
from mnist_mlops.digit_features import REFERENCE_ARTIFACT
from mnist_mlops.monitoring.check import run_check
from mnist_mlops.monitoring.reference import Reference
from mnist_mlops.preprocess import to_uint8
from mnist_mlops.records.prediction_log import FLUSH_SECONDS

from helpers import Project, Server, copy_project, log_keras, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
FOLLOW_SECONDS = 1
DIGIT = np.zeros((28, 28), np.uint8).tolist()


@pytest.fixture(scope="module")
def two_versions(trained_project: Project, prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The session's project (v1) copied, plus v2 trained with another seed; v1 is champion."""
    copy = copy_project(trained_project, tmp_path_factory.mktemp("follow") / "project", prefect_server)
    copy.cli("run", "--no-package", "--set", "train.seed=7")
    client = copy.mlflow_client()
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")) == [1, 2]
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, "1")
    write_params(copy.root, [f"serve.follow_seconds={FOLLOW_SECONDS}"])
    return copy


@pytest.fixture(scope="module")
def following(two_versions: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # the prediction log and labels go to the project's logs/ and feedback/: the monitor reads them
    with serving(two_versions, tmp_path_factory.mktemp("follow-serve"), records_in_project=True) as srv:
        yield srv


def served_version(srv: Server) -> str:
    return srv.client.get("/model").json()["model_version"]


def wait_version(srv: Server, version: str, timeout: float = 60) -> float:
    """Seconds until /model reports `version`."""
    start = time.monotonic()
    while served_version(srv) != version:
        assert time.monotonic() - start < timeout, srv.client.get("/model").json()
        time.sleep(0.1)
    return time.monotonic() - start


def set_champion(project: Project, version: str) -> None:
    project.mlflow_client().set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)


async def load(url: str, clients: int, stop: asyncio.Event, records: list) -> None:
    """`clients` concurrent clients posting one digit each, back to back, until `stop`."""
    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    resp = await c.post("/predict", json={"images": DIGIT})
                    version = resp.json()[0]["model_version"] if resp.status_code == 200 else None
                    records.append((sent, time.monotonic(), resp.status_code, version))
                except httpx.HTTPError as exc:
                    records.append((sent, time.monotonic(), type(exc).__name__, None))

    await asyncio.gather(*(client() for _ in range(clients)))


def test_rollout_and_rollback_under_load_drop_nothing(two_versions: Project, following: Server) -> None:
    assert served_version(following) == "1"
    info = following.client.get("/model").json()
    assert info["mode"] == "follow" and info["source"] == "registry" and info["last_reload_error"] is None
    records: list = []
    switches: dict[str, float] = {}

    async def scenario() -> None:
        stop = asyncio.Event()
        traffic = asyncio.create_task(load(following.url, 16, stop, records))
        await asyncio.sleep(3)
        for version, move in (("2", lambda: two_versions.cli("promote", "2", "--force")),
                              ("1", lambda: two_versions.cli("rollback"))):
            await asyncio.to_thread(move)
            moved = time.monotonic()
            await asyncio.to_thread(wait_version, following, version)
            switches[version] = time.monotonic()
            assert switches[version] - moved < FOLLOW_SECONDS + 30, "the switch took too long"
            await asyncio.sleep(3)
        stop.set()
        await traffic

    asyncio.run(scenario())
    assert len(records) > 100, len(records)
    assert {r[2] for r in records} == {200}, {r[2] for r in records}
    assert {r[3] for r in records} == {"1", "2"}
    # after /model reported the new version, no request sent later got the old one
    assert all(r[3] == "2" for r in records if switches["2"] < r[0] < switches["2"] + 2.5)
    assert all(r[3] == "1" for r in records if r[0] > switches["1"])
    metrics = following.client.get("/metrics").text
    assert "mnist_model_reloads_total 2.0" in metrics and 'mnist_served_model_version{pid=' in metrics


def register_broken(project: Project, tmp_path: Path) -> str:
    """A version whose model artifact is not a loadable Keras file."""
    import mlflow

    client = project.mlflow_client()
    good = client.get_model_version(MODEL_NAME, "1")
    bad = tmp_path / "model"
    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(project.env["MLFLOW_TRACKING_URI"])
    shutil.copytree(Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL_NAME}/1")), bad)
    (bad / "data" / "model.keras").write_bytes(b"not a keras file")
    run = client.create_run(client.get_experiment_by_name(MODEL_NAME).experiment_id)
    client.log_artifacts(run.info.run_id, str(bad), "model")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(MODEL_NAME, f"{run.info.artifact_uri}/model", run.info.run_id)
    assert good.version != mv.version
    return str(mv.version)


def register_untrained(project: Project) -> str:
    """A loadable model that scores about 10 %: below any sensible floor."""
    import keras
    import mlflow

    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(project.env["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment(MODEL_NAME)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    with mlflow.start_run():
        info = log_keras(model, registered_model_name=MODEL_NAME)
    return str(info.registered_model_version)


def test_broken_versions_are_refused_and_the_old_one_keeps_answering(two_versions: Project, following: Server,
                                                                     tmp_path: Path) -> None:
    set_champion(two_versions, "1")
    wait_version(following, "1")
    failures = following.client.get("/metrics").text.count("mnist_model_reload_failures_total 1.0")
    for version, why in ((register_broken(two_versions, tmp_path), "cannot be loaded"),
                         (register_untrained(two_versions), "below the floor")):
        set_champion(two_versions, version)
        deadline = time.monotonic() + 60
        while f"v{version} " not in str(following.client.get("/model").json()["last_reload_error"]):
            assert time.monotonic() < deadline, following.client.get("/model").json()
            assert following.predict(DIGIT).json()[0]["model_version"] == "1"
            time.sleep(0.3)
        info = following.client.get("/model").json()
        assert info["model_version"] == "1" and why in info["last_reload_error"], info
        assert following.predict(DIGIT).json()[0]["model_version"] == "1"
        assert f"not serving v{version}" in following.log_tail(20000)
    assert "mnist_model_reload_failures_total 2.0" in following.client.get("/metrics").text or failures
    set_champion(two_versions, "2")  # the next alias change is tried afresh
    wait_version(following, "2")


def test_a_version_whose_artifacts_are_not_there_yet_is_retried_and_served(two_versions: Project,
                                                                          following: Server, tmp_path: Path) -> None:
    """A network blip while fetching a new champion's artifacts (here: its artifact folder is not
    there yet) no longer blocks it until the alias moves: the worker retries with backoff, says
    so in /model (behind the champion), and serves it once the artifacts answer."""
    import mlflow

    set_champion(two_versions, "1")
    wait_version(following, "1")
    client = two_versions.mlflow_client()
    mlflow.set_tracking_uri(two_versions.env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(two_versions.env["MLFLOW_TRACKING_URI"])
    good = client.get_model_version(MODEL_NAME, "2")
    later = tmp_path / "arrives-later"
    mv = client.create_model_version(MODEL_NAME, str(later), good.run_id,
                                     tags={"test_accuracy": good.tags["test_accuracy"]})
    set_champion(two_versions, str(mv.version))
    deadline = time.monotonic() + 60
    while "retrying in" not in str((info := following.client.get("/model").json())["last_reload_error"]):
        assert time.monotonic() < deadline, info
        time.sleep(0.3)
    assert info["model_version"] == "1" and info["behind"] is True and info["champion_version"] == str(mv.version)
    assert info["refused_version"] is None and "cannot be fetched now" in info["last_reload_error"]
    assert re.search(r"mnist_follower_behind(\{[^}]*\})? 1\.0", following.client.get("/metrics").text)
    shutil.copytree(Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL_NAME}/2")), later)
    wait_version(following, str(mv.version), timeout=120)
    assert following.client.get("/model").json()["behind"] is False


def test_an_unreachable_store_keeps_serving_and_recovers(two_versions: Project, following: Server) -> None:
    db = two_versions.root / "mlflow.db"
    hidden = db.with_name("mlflow.db.away")
    db.rename(hidden)
    db.mkdir()  # sqlite cannot open a directory: the store is unreachable
    try:
        deadline = time.monotonic() + 30
        while following.client.get("/model").json()["registry_reachable"]:
            assert time.monotonic() < deadline
            time.sleep(0.3)
        before = served_version(following)
        for _ in range(5):
            resp = following.predict(DIGIT)
            assert resp.status_code == 200 and resp.json()[0]["model_version"] == before
            time.sleep(FOLLOW_SECONDS)
        assert following.log.read_text(errors="replace").count("registry unreachable") == 1  # not one per poll
    finally:
        db.rmdir()
        hidden.rename(db)
    other = "1" if before == "2" else "2"
    set_champion(two_versions, other)  # a promotion made after the store is back
    wait_version(following, other)
    assert following.client.get("/model").json()["registry_reachable"] is True


def metric(srv: Server, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of each sample called `name` on the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(srv.client.get("/metrics").text)
    return [(s.labels, s.value) for f in families for s in f.samples if s.name == name]


def test_pinned_beside_following_watches_nothing_and_keeps_its_own_metrics(two_versions: Project, following: Server,
                                                                           tmp_path: Path) -> None:
    """Two services side by side (the README's follow on one port, `--pin` on another): each
    `/metrics` reports its own workers only, a start or stop of one never wipes the other's
    counters, and every field of `/model` describes the model answering (issue 30: 1 and 5)."""
    for version in ("2", "1"):  # two swaps, so the follower's counter has something to lose
        set_champion(two_versions, version)
        wait_version(following, version)
    reloads = metric(following, "mnist_model_reloads_total")
    follow_pids = {labels["pid"] for labels, _ in metric(following, "mnist_served_model_version")}
    assert reloads and reloads[0][1] >= 2 and follow_pids, reloads
    v2 = two_versions.mlflow_client().get_model_version(MODEL_NAME, "2")
    env_project = Project(two_versions.root, dict(two_versions.env))
    with serving(env_project, tmp_path, extra_args=["--pin", "2"]) as pinned:
        pinned_versions = metric(pinned, "mnist_served_model_version")
        assert [value for _, value in pinned_versions] == [2.0], pinned_versions
        assert {labels["pid"] for labels, _ in pinned_versions}.isdisjoint(follow_pids)
        assert metric(pinned, "mnist_model_reloads_total") == [({}, 0.0)]
        assert {(labels["pid"], value) for labels, value in metric(following, "mnist_served_model_version")} == \
            {(pid, 1.0) for pid in follow_pids}
        assert metric(following, "mnist_model_reloads_total") == reloads, "the pinned start wiped the follower's"
        info = pinned.client.get("/model").json()
        assert info["mode"] == "pinned" and info["model_version"] == "2" and info["run_id"] == v2.run_id, info
        assert info["data_md5"] == v2.tags["data.md5"] and info["test_accuracy"] == float(v2.tags["test_accuracy"])
        assert "bentoml_model" not in info and info["bento_builtin_model"].startswith(f"{MODEL_NAME}:v1-"), info
        set_champion(two_versions, "2")
        set_champion(two_versions, "1")
        time.sleep(FOLLOW_SECONDS * 3)
        assert served_version(pinned) == "2"
    assert {labels["pid"] for labels, _ in metric(following, "mnist_served_model_version")} == follow_pids
    assert metric(following, "mnist_model_reloads_total")[0][1] >= reloads[0][1], "the pinned stop wiped them"
    assert following.client.get("/model").json()["bento_builtin_model"].startswith(f"{MODEL_NAME}:v1-")


def held_out(project: Project) -> tuple[np.ndarray, np.ndarray]:
    """The base test split (1,000 digits no model trained on) as the uint8 pixels a client sends,
    in a random order (the split is stored sorted by class; traffic is not)."""
    prepared = project.root / "artifacts" / "prepared"
    images, labels = to_uint8(np.load(prepared / "test_x.npy")), np.load(prepared / "test_y.npy")
    order = np.random.default_rng(0).permutation(len(labels))
    return images[order], labels[order]


def champion_reference(project: Project, tmp_path: Path) -> Reference:
    client = project.mlflow_client()
    version = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
    local = client.download_artifacts(version.run_id, REFERENCE_ARTIFACT, str(tmp_path))
    return Reference.from_npz(Path(local), str(version.version), version.run_id)


def send(srv: Server, images: np.ndarray) -> list[dict]:
    resp = srv.client.post("/predict", json={"images": images.tolist()})
    assert resp.status_code == 200, resp.text
    time.sleep(3 * FLUSH_SECONDS)  # the log's writer thread flushes every FLUSH_SECONDS
    return resp.json()


def now() -> datetime:
    return datetime.now(UTC)


def test_the_monitor_flags_shifted_traffic_and_never_held_out_digits(two_versions: Project, following: Server,
                                                                     tmp_path: Path) -> None:
    """Traffic through the real service, read back from its prediction log: five windows of
    held-out digits raise no alarm; inverted digits do, naming the features that moved; the
    CLI writes the report and logs the run to the `mnist-monitoring` experiment."""
    set_champion(two_versions, "1")
    wait_version(following, "1")
    reference = champion_reference(two_versions, tmp_path)
    paths, params = Paths(two_versions.root), load_params(two_versions.root)
    images, _ = held_out(two_versions)
    for window in np.array_split(images, 5):
        start = now()
        send(following, window)
        result = run_check(paths, params, reference, start, now())
        assert len(result.traffic.records) == len(window) and result.traffic.skipped == 0
        assert result.verdict == "ok" and result.drifted == [], [c.as_dict() for c in result.checks]

    start = now()
    for half in np.array_split(255 - images, 2):  # inverted: white digits on black
        send(following, half)
    result = run_check(paths, params, reference, start, now())
    assert result.verdict == "drift" and {"ink", "thickness"} <= set(result.drifted), result.drifted

    out = two_versions.cli("monitor", "--since", "3m", "--no-retrain")
    assert "drift" in out.stdout and "ink" in out.stdout and "not started (retrain off)" in out.stdout, out.stdout
    client = two_versions.mlflow_client()
    run = client.search_runs([client.get_experiment_by_name("mnist-monitoring").experiment_id],
                             order_by=["attributes.start_time DESC"])[0]
    assert run.data.tags["verdict"] == "drift" and run.data.metrics["drift"] == 1
    # the last 3 minutes: these 2,000 digits, and whatever the module's earlier tests sent
    assert run.data.metrics["predictions"] >= 2 * len(images) and run.data.metrics["ks_ink"] >= 0.2
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")][0].endswith(".html")
    page = max(paths.monitoring.glob("monitor-*.html")).read_text()
    assert "MNIST monitoring: <span class=\"drift\">drift</span>" in page
    assert page.count("<img") == 3  # classes, distributions, least confident (no labels: no accuracy plot)


def test_the_loop_the_monitor_retrains_and_the_service_answers_without_a_restart(
        two_versions: Project, following: Server, tmp_path: Path) -> None:
    """The loop: `mnist-mlops serve` (following the champion) and `mnist-mlops schedule` (training
    on a yearly cron, the monitor every few seconds) side by side. A client sends shifted digits
    and corrects the answers; the monitor starts training for those reasons, the labels make a
    new data version, the gate decides, and a promoted model is answered without a restart."""
    from mnist_mlops.platform.processes import free_port
    from mnist_mlops.platform.versioning import dvc_md5

    set_champion(two_versions, "1")
    wait_version(following, "1")
    write_params(two_versions.root, ["train.epochs=2", "monitor.window_hours=0.1", "data.feedback_min_new=20"])
    data_before = dvc_md5(Paths(two_versions.root).data_dvc)
    images, labels = held_out(two_versions)
    shifted, truth = 255 - images[:200], labels[:200]
    answers = send(following, shifted)
    corrections = [{"prediction_id": a["prediction_id"], "label": int(y)} for a, y in zip(answers, truth, strict=True)]
    assert following.client.post("/feedback", json=corrections).status_code == 200

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    schedule = serving_schedule(two_versions, port, tmp_path / "schedule.log",
                                ["--cron", "0 0 1 1 *", "--monitor-every", "10s"])
    client = two_versions.mlflow_client()
    training = client.get_experiment_by_name("mnist-convnet").experiment_id
    try:
        deadline = time.monotonic() + 900
        while not (training_runs := [r for r in flow_runs(api, "mnist-training", "COMPLETED")
                                     if r["parameters"].get("trigger") == "monitor"]):
            assert time.monotonic() < deadline, schedule.log_tail()
            assert schedule.proc.poll() is None, schedule.log_tail()
            time.sleep(3)
        monitor_runs = flow_runs(api, "mnist-monitor", "COMPLETED")
        summaries = httpx.post(f"{api}/artifacts/filter", timeout=30,
                               json={"artifacts": {"key": {"any_": ["monitoring-summary"]}}}).json()
    finally:
        schedule.stop(60)
    runs = client.search_runs([training], "tags.trigger = 'monitor'")
    reason = runs[0].data.tags["trigger.reason"]
    assert "drift in " in reason and "ink" in reason and "new labels >= data.feedback_min_new" in reason, reason
    scheduled = [r for r in monitor_runs if r["deployment_id"]]  # not the CLI's run of the test before
    assert scheduled and all(r["name"] == "monitor · last 0.1 h" for r in scheduled), monitor_runs
    assert any("| verdict | drift |" in a["data"] and "| training | started mnist-training/scheduled" in a["data"]
               for a in summaries), [a["data"] for a in summaries]
    assert len(runs) == len(training_runs) == 1 and training_runs[0]["parameters"]["reason"] == reason, training_runs
    assert not any(r["auto_scheduled"] for r in training_runs)  # started by the monitor, not the cron
    assert dvc_md5(Paths(two_versions.root).data_dvc) != data_before  # the labels made a new data version
    assert runs[0].data.tags["data.feedback_count"] == str(len(truth))
    version = model_version_of(client, runs[0].info.run_id)
    decision = version.tags["gate.decision"]
    assert decision in ("promoted", "rejected"), version.tags
    if decision == "promoted":
        wait_version(following, str(version.version), timeout=FOLLOW_SECONDS + 60)
        assert following.predict(DIGIT).json()[0]["model_version"] == str(version.version)
    else:
        assert served_version(following) == "1" and version.tags.get("gate.reason"), version.tags


def model_version_of(client, run_id: str):
    return client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'")[0]


def flow_runs(api: str, flow_name: str, state: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "flow_runs": {"state": {"type": {"any_": [state]}}},
            "sort": "START_TIME_DESC", "limit": 50}
    resp = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()


def serving_schedule(project: Project, port: int, log: Path, when: list[str]) -> Server:
    from helpers import BIN, start_server

    cmd = [str(BIN / "mnist-mlops"), "schedule", *when, "--port", str(port), "--no-package", "--lock-wait", "0"]
    # Its own Prefect server on PORT, as on a laptop (not the suite's shared one: the loop's
    # deployments would outlive the test there, under the names the schedule test deploys).
    env = {k: v for k, v in project.env.items() if k != "PREFECT_API_URL"}
    return start_server(cmd, project.root, env, log, f"http://127.0.0.1:{port}/api/health", timeout=300)
