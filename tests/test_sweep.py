"""`mnist-mlops sweep`: a 2×1 grid gives one parent run and two child runs; only the best
by validation accuracy is evaluated, registered (at most one new version) and gated; the
winning params land in params.yaml and dvc.lock, so `dvc status` is clean afterwards.
Fanned out (`--pool`) over two real `prefect worker` processes, a SIGKILLed worker fails only
its own candidate, and a sweep left with no finished candidate fails in one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from mnist_mlops.config import load_params, write_params
from mnist_mlops.errors import UserError
from mnist_mlops.platform.processes import start_group, stop_group
from mnist_mlops.training.candidate import Candidate, check_checkout, prepared_md5s
from mnist_mlops.training.sweep import best, parse_grid, split_values

from helpers import BIN, REPO, SMALL_MODEL, copy_project


def test_grid_parsing():
    assert split_values("0.001,0.003") == ["0.001", "0.003"]
    assert split_values("[32,64],[16]") == ["[32,64]", "[16]"]
    assert parse_grid(["train.learning_rate=0.001,0.003", "model.filters=32,[16,32]"]) == [
        ("train.learning_rate", ["0.001", "0.003"]), ("model.filters", ["[32]", "[16,32]"])]
    for bad in (["learning_rate=0.1"], ["train.learning_rate="], ["train.epochs=1,,2"], []):
        with pytest.raises(UserError):
            parse_grid(bad)
    with pytest.raises(UserError, match="given twice"):
        parse_grid(["train.epochs=1", "train.epochs=2"])


def test_best_is_by_val_robust_val_and_foreign_val_accuracy_then_val_loss_then_grid_order():
    def cand(i, acc, loss, robust, alien=0.9):
        return Candidate(i, [f"train.seed={i}"], f"r{i}", acc, loss, "", robust, alien)

    assert best([cand(0, 0.90, 0.3, 0.9), cand(1, 0.95, 0.5, 0.9), cand(2, 0.95, 0.4, 0.9)]).index == 2
    assert best([cand(0, 0.9, 0.3, 0.9), cand(1, 0.9, 0.3, 0.9)]).index == 0
    # the best on clean val data alone loses to one that reads corrupted digits much better
    assert best([cand(0, 0.97, 0.1, 0.80), cand(1, 0.96, 0.2, 0.90)]).index == 1
    assert cand(1, 0.96, 0.2, 0.90, 0.87).score == pytest.approx(0.91)
    # ... and one that reads printed digits of unseen fonts much better wins too
    assert best([cand(0, 0.97, 0.1, 0.90, 0.80), cand(1, 0.96, 0.2, 0.90, 0.90)]).index == 1


def test_a_worker_checkout_must_hold_the_sweeps_params_and_prepared_data(tmp_path):
    """What a candidate checks first on its worker: one line naming the difference, before training."""
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    lock = {"stages": {"prepare": {"outs": [{"path": "artifacts/prepared", "md5": "a" * 32 + ".dir"}]},
                       "robustness": {"outs": [{"path": "artifacts/robust", "md5": "b" * 32 + ".dir"}]},
                       "foreign": {"outs": [{"path": "artifacts/foreign", "md5": "d" * 32 + ".dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    params, prepared = load_params(tmp_path).model_dump(mode="json"), prepared_md5s(tmp_path)
    assert prepared == {"artifacts/prepared": "a" * 32 + ".dir", "artifacts/robust": "b" * 32 + ".dir",
                        "artifacts/foreign": "d" * 32 + ".dir"}
    check_checkout(tmp_path, params, prepared)  # the sweep's own checkout
    other = {**params, "train": {**params["train"], "epochs": 99}}
    with pytest.raises(UserError, match=rf"has train.epochs={params['train']['epochs']}, the sweep 99: commit"):
        check_checkout(tmp_path, other, prepared)
    with pytest.raises(UserError, match=r"other artifacts/robust than the sweep \(b+\.dir vs c+\.dir\)"):
        check_checkout(tmp_path, params, {**prepared, "artifacts/robust": "c" * 32 + ".dir"})


def test_a_candidate_outside_a_worker_watches_its_parent_only():
    code = "from mnist_mlops.platform.processes import ancestors; print(ancestors())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"[{os.getpid()}]"


def test_bad_grid_value_fails_before_any_work(project):
    proc = project.cli("sweep", "--grid", "train.learning_rate=0.001,7", check=False)
    assert proc.returncode == 2
    assert "train.learning_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (project.root / "data").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_two_by_one(project):
    write_params(project.root, SMALL_MODEL)
    proc = project.cli("sweep", "--grid", "train.learning_rate=0.0005,0.003", "--grid", "train.batch_size=64",
                       "--no-package")
    out = proc.stdout + proc.stderr

    client = project.mlflow_client()
    exp = client.get_experiment_by_name("mnist-convnet").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if r.info.run_name == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert {c.data.params["train.learning_rate"] for c in children} == {"0.0005", "0.003"}
    assert {c.info.run_name for c in children} == {
        "sweep · candidate-0 · train.learning_rate=0.0005 train.batch_size=64",
        "sweep · candidate-1 · train.learning_rate=0.003 train.batch_size=64"}
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)

    # the best by val, robust-val and foreign-val accuracy, and only it, was evaluated and registered
    winner = max(children, key=lambda c: sum(c.data.metrics[k] for k in ("val_accuracy", "robust_val_accuracy",
                                                                          "foreign_val_accuracy")))
    assert parent.data.tags["sweep.best_run_id"] == winner.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(winner.data.metrics["val_accuracy"])
    assert parent.data.metrics["best_robust_val_accuracy"] == pytest.approx(
        winner.data.metrics["robust_val_accuracy"])
    assert parent.data.metrics["best_foreign_val_accuracy"] == pytest.approx(
        winner.data.metrics["foreign_val_accuracy"])
    assert "robust val accuracy" in out and "foreign val accuracy" in out
    loser = next(c for c in children if c.info.run_id != winner.info.run_id)
    assert "test_accuracy" in winner.data.metrics and "test_accuracy" not in loser.data.metrics
    versions = client.search_model_versions("name='mnist-convnet'")
    assert len(versions) == 1 and versions[0].run_id == winner.info.run_id
    assert str(client.get_model_version_by_alias("mnist-convnet", "champion").version) == str(versions[0].version)
    assert winner.info.run_id in out and "promoted" in out

    # the winner's params are the project's params, and DVC agrees the train stage is current
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    assert str(params["train"]["learning_rate"]) == winner.data.params["train.learning_rate"]
    status = project.run("dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    assert not list((project.root / "artifacts").glob(".sweep-*"))  # candidates' work dirs removed


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_winner_the_gate_refuses_leaves_params_and_lock_as_they_were(trained_project, prefect_server, tmp_path):
    """The sweep's best can still fail the gate (here a learning rate that diverges): its params
    must not become the project's, or the next `run` would train that losing recipe. params.yaml,
    dvc.lock and the stage outputs stay as they were, `dvc status` clean; the summary says so."""
    copy = copy_project(trained_project, tmp_path / "copy", prefect_server)
    copy.env["COLUMNS"] = "250"  # the summary's rows unwrapped
    before = {name: (copy.root / name).read_bytes() for name in ("params.yaml", "dvc.lock")}
    evaluated = (copy.root / "artifacts" / "evaluated.json").read_bytes()  # the evaluate stage's output
    proc = copy.cli("sweep", "--grid", "train.learning_rate=0.9", "--no-package")
    out = proc.stdout + proc.stderr
    client = copy.mlflow_client()
    refused = client.get_model_version("mnist-convnet", "2")
    assert refused.tags["gate.decision"] == "rejected", refused.tags
    assert str(client.get_model_version_by_alias("mnist-convnet", "champion").version) == "1"
    assert {name: (copy.root / name).read_bytes() for name in before} == before
    assert (copy.root / "artifacts" / "evaluated.json").read_bytes() == evaluated
    assert json.loads((copy.root / "artifacts" / "registered.json").read_text())["version"] == "2"  # what promote did
    assert "up to date" in copy.run("dvc", "status").stdout
    assert re.search(r"params\.yaml\s*│\s*unchanged: the winner's model did not pass the gate", out), out[-3000:]
    assert not list((copy.root / "artifacts").glob(".sweep-*"))


# --------------------------------------------------------------------------- fanned out over a work pool


def start_worker(project, env: dict, pool: str, name: str, cpu: int, log: Path):
    """`prefect worker start` as a user starts one, pinned to one CPU (`taskset`), in its own group."""
    cmd = ["taskset", "-c", str(cpu), str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name,
           "--limit", "1", "--type", "process"]
    return start_group(cmd, log, {**env, "MNIST_MLOPS_CHECKOUT": str(project.root)}, cwd=project.root)


def online_workers(api: str, pool: str) -> set[str]:
    resp = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=30)
    resp.raise_for_status()
    return {w["name"] for w in resp.json() if w["status"] == "ONLINE"}


def candidate_flow_runs(api: str, pool: str) -> list[dict]:
    body = {"deployments": {"name": {"any_": [pool]}}, "flows": {"name": {"any_": ["mnist-sweep-candidate"]}}}
    resp = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()


def the_worker_process(supervisor) -> psutil.Process:
    """The `prefect worker` itself (taskset execs it), under the supervisor that leads its group."""
    return next(p for p in psutil.Process(supervisor.pid).children() if "worker" in p.cmdline())


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sweep_on_a_work_pool_two_workers_one_killed(project, prefect_server, mlflow_server, tmp_path):
    """Three candidates over two real `prefect worker` processes (one CPU each) on PostgreSQL-backed
    Prefect and MLflow servers; one worker is SIGKILLed while it trains: its candidate fails
    visibly, the other worker trains the rest, and the best of those is the one new version."""
    write_params(project.root, SMALL_MODEL)
    project.run("git", "commit", "-qam", "small model")
    pool = f"sweep-{uuid.uuid4().hex[:8]}"
    env = {**project.env, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_server,
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    project.env = env
    created = project.run(str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process")
    assert pool in created.stdout
    cpus = sorted(os.sched_getaffinity(0))
    workers = {name: start_worker(project, env, pool, name, cpus[i % len(cpus)], tmp_path / f"{name}.log")
               for i, name in enumerate(("worker-a", "worker-b"))}
    client = project.mlflow_client()
    sweep_log = tmp_path / "sweep.log"
    sweep = second = None
    try:
        deadline = time.monotonic() + 180
        while online_workers(prefect_server, pool) != set(workers):
            assert time.monotonic() < deadline, (tmp_path / "worker-b.log").read_text(errors="replace")[-3000:]
            time.sleep(1)
        with sweep_log.open("wb") as out:
            sweep = subprocess.Popen([str(BIN / "mnist-mlops"), "sweep", "--pool", pool, "--no-package", "--grid",
                                      "train.learning_rate=0.0005,0.001,0.003"], cwd=project.root, env=env,
                                     stdout=out, stderr=subprocess.STDOUT)

        # worker-b dies (SIGKILL) while it trains a candidate: its child run exists and is RUNNING
        def training_on(worker: str, exclude: set[str] | None = None):
            exp = client.get_experiment_by_name("mnist-convnet")
            runs = client.search_runs([exp.experiment_id] if exp else [],
                                      f"tags.`sweep.worker` = '{worker}' and attributes.status = 'RUNNING'")
            return next((r for r in runs if r.info.run_id not in (exclude or set())), None)

        deadline = time.monotonic() + 400
        while (victim := training_on("worker-b")) is None:
            assert sweep.poll() is None, sweep_log.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, sweep_log.read_text(errors="replace")[-4000:]
            time.sleep(0.5)
        the_worker_process(workers["worker-b"]).kill()
        sweep.wait(timeout=900)
        out = sweep_log.read_text(errors="replace")
        assert sweep.returncode == 0, out[-5000:]

        # a sweep whose only candidate loses its worker fails with one line, and changes nothing
        before = (project.root / "params.yaml").read_text()
        known = {r.info.run_id for r in client.search_runs([victim.info.experiment_id])}
        second_log = tmp_path / "sweep2.log"
        with second_log.open("wb") as out2:
            second = subprocess.Popen([str(BIN / "mnist-mlops"), "sweep", "--pool", pool, "--no-package", "--grid",
                                       "train.learning_rate=0.002"], cwd=project.root, env=env, stdout=out2,
                                      stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 400
        while not training_on("worker-a", exclude=known):
            assert second.poll() is None and time.monotonic() < deadline, second_log.read_text()[-3000:]
            time.sleep(0.5)
        the_worker_process(workers["worker-a"]).kill()
        second.wait(timeout=600)
        err = second_log.read_text(errors="replace")
    finally:
        for proc in (sweep, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in workers.values():
            stop_group(proc)
    assert second.returncode == 2, err[-3000:]
    assert "no sweep candidate finished: candidate-0 (train.learning_rate=0.002): " in err
    assert "died mid-training" in err and "Traceback" not in err
    assert (project.root / "params.yaml").read_text() == before

    # one parent run; three children over both workers, each pinned to one CPU; the killed one KILLED
    exp = client.get_experiment_by_name("mnist-convnet").experiment_id
    parents = client.search_runs([exp], f"tags.`sweep.pool` = '{pool}'", order_by=["attributes.start_time ASC"])
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED"]
    parent = parents[0]
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3, [(c.info.run_id, c.info.status) for c in children]
    assert {c.data.tags["sweep.worker"] for c in children} == {"worker-a", "worker-b"}
    if len(cpus) > 1:
        assert {c.data.tags["sweep.threads"] for c in children} == {"1"}
        assert {c.data.tags["sweep.worker"]: c.data.tags["sweep.cpus"] for c in children} == {
            "worker-a": str(cpus[0]), "worker-b": str(cpus[1])}
    killed = next(c for c in children if c.info.run_id == victim.info.run_id)
    assert killed.info.status == "KILLED"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2 and {c.data.tags["sweep.worker"] for c in finished} == {"worker-a"}

    # the Prefect side: three candidate flow runs, sub-flows of the sweep; the killed one Failed, saying why
    runs = [r for r in candidate_flow_runs(prefect_server, pool)
            if r["parameters"]["parent_run_id"] == parent.info.run_id]
    assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED", "FAILED"], runs
    failed = next(r for r in runs if r["state_type"] == "FAILED")
    assert "died mid-training" in failed["state"]["message"], failed["state"]
    assert all(r["parent_task_run_id"] for r in runs)
    assert "failed" in out and "died mid-training" in out

    # the best of the finished two, and only it, became a model version; never the half-trained one
    winner = max(finished, key=lambda c: c.data.metrics["val_accuracy"] + c.data.metrics["robust_val_accuracy"])
    assert parent.data.tags["sweep.best_run_id"] == winner.info.run_id
    sweeps = {r.info.run_id for r in client.search_runs([exp], "tags.`sweep.pool` = '" + pool + "'")}
    assert len(sweeps) == 2  # and the second one FAILED, with nothing of it registered:
    ours = [v for v in client.search_model_versions("name='mnist-convnet'")
            if client.get_run(v.run_id).data.tags.get("mlflow.parentRunId") in sweeps]
    assert [v.run_id for v in ours] == [winner.info.run_id]
    params = yaml.safe_load((project.root / "params.yaml").read_text())
    assert str(params["train"]["learning_rate"]) == winner.data.params["train.learning_rate"]
    assert "up to date" in project.run("dvc", "status").stdout
    assert not list((project.root / "artifacts").glob(".sweep-*"))
