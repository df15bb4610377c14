"""Serving follows the champion (a real `mnist-mlops serve`, a real registry): rollout and
rollback under load without a failed request, broken versions refused, an unreachable store
ridden out, and a scheduled run's new champion answered without a restart."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME, write_params

from helpers import Project, Server, copy_project, serving

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
FOLLOW_SECONDS = 1
DIGIT = np.zeros((28, 28), np.uint8).tolist()


@pytest.fixture(scope="module")
def two_versions(trained_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """The session's project (v1) copied, plus v2 trained with another seed; v1 is champion."""
    copy = copy_project(trained_project, tmp_path_factory.mktemp("follow") / "project")
    copy.cli("run", "--no-package", "--set", "train.seed=7")
    client = copy.mlflow_client()
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")) == [1, 2]
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, "1")
    write_params(copy.root, [f"serve.follow_seconds={FOLLOW_SECONDS}"])
    return copy


@pytest.fixture(scope="module")
def following(two_versions: Project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(two_versions, tmp_path_factory.mktemp("follow-serve")) as srv:
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
        info = mlflow.keras.log_model(model, name="model", registered_model_name=MODEL_NAME)
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


def test_pinned_mode_watches_nothing(two_versions: Project, tmp_path: Path) -> None:
    env_project = Project(two_versions.root, dict(two_versions.env))
    set_champion(two_versions, "1")
    with serving(env_project, tmp_path, extra_args=["--pin", "2"]) as pinned:
        info = pinned.client.get("/model").json()
        assert info["mode"] == "pinned" and info["model_version"] == "2"
        set_champion(two_versions, "2")
        set_champion(two_versions, "1")
        time.sleep(FOLLOW_SECONDS * 3)
        assert served_version(pinned) == "2"


def test_a_scheduled_champion_is_answered_without_a_restart(two_versions: Project, following: Server,
                                                            tmp_path: Path) -> None:
    """The loop: `mnist-mlops schedule` and `mnist-mlops serve` side by side; a params change
    makes the scheduled run train a better model, the gate promotes it, the service answers with it."""
    from mnist_mlops.platform.processes import free_port

    set_champion(two_versions, "1")
    wait_version(following, "1")
    write_params(two_versions.root, ["train.epochs=2"])  # 2 epochs beat the 1-epoch champion
    port = free_port()
    schedule = serving_schedule(two_versions, port, tmp_path / "schedule.log")
    try:
        client = two_versions.mlflow_client()
        deadline = time.monotonic() + 900
        while (champion := str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)) == "1":
            assert time.monotonic() < deadline, schedule.log_tail()
            assert schedule.proc.poll() is None, schedule.log_tail()
            time.sleep(2)
    finally:
        schedule.stop(60)
    wait_version(following, str(champion), timeout=FOLLOW_SECONDS + 60)
    answer = following.predict(DIGIT).json()[0]
    assert answer["model_version"] == str(champion)
    assert int(champion) > 2 and client.get_model_version(MODEL_NAME, champion).tags["gate.decision"] == "promoted"


def serving_schedule(project: Project, port: int, log: Path) -> Server:
    from helpers import BIN, start_server

    cmd = [str(BIN / "mnist-mlops"), "schedule", "--interval", "30", "--port", str(port), "--no-package",
           "--lock-wait", "0"]
    return start_server(cmd, project.root, project.env, log, f"http://127.0.0.1:{port}/api/health", timeout=300)
