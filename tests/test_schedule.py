"""`mnist-mlops schedule` on a shared Prefect server on PostgreSQL (PREFECT_API_URL): scheduled
runs complete, a scheduled run over unchanged inputs trains nothing, a manual run during a
scheduled one is refused cleanly, the monitor deployment runs, prefect.yaml deploys to a work
pool, and Ctrl-C pauses the schedule and leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from mnist_mlops.config import write_params
from mnist_mlops.platform.processes import start_group, stop_group
from pipelines.training import SKIPPED

from helpers import (
    BIN,
    SMALL_MODEL,
    click_text,
    kill_all,
    left_behind,
    page_text,
    processes_with,
    wait_stopped,
    wait_text,
)

pytestmark = pytest.mark.slow

INTERVAL = 10  # seconds: short enough that a second (late) run follows the first at once


def flow_runs(api: str, deployment: str) -> list[dict]:
    body = {"flows": {"name": {"any_": ["mnist-training"]}}, "deployments": {"name": {"any_": [deployment]}},
            "sort": "EXPECTED_START_TIME_ASC", "limit": 50}
    resp = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30)
    resp.raise_for_status()
    return resp.json()


def summary_of(api: str, flow_run_id: str) -> str:
    body = {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["training-summary"]}}}
    resp = httpx.post(f"{api}/artifacts/filter", json=body, timeout=30)
    resp.raise_for_status()
    found = resp.json()
    return found[0]["data"] if found else ""


def wait_for(predicate, timeout: float, proc: subprocess.Popen, log: Path, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"schedule exited {proc.returncode} while waiting for {what}\n"
                                 f"{log.read_text(errors='replace')[-5000:]}")
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text(errors='replace')[-5000:]}")


@pytest.mark.timeout(900)
def test_scheduled_runs_on_a_real_prefect_server(project, prefect_server, browser, tmp_path):
    write_params(project.root, SMALL_MODEL)
    api = prefect_server
    marker = uuid.uuid4().hex
    env = {**project.env, "MNIST_MLOPS_TEST_MARKER": marker, "PREFECT_RUNNER_POLL_FREQUENCY": "2",
           "PREFECT_API_URL": api}
    project.env = env  # manual runs and the prefect CLI below use the same server
    log = project.root / "schedule.log"
    # like a terminal: the command leads its own process group; Ctrl-C reaches the whole group
    proc = start_group([str(BIN / "mnist-mlops"), "schedule", "--interval", str(INTERVAL), "--no-package",
                        "--lock-wait", "0"], log, env, cwd=project.root)
    try:
        wait_for(lambda: "Prefect server" in log.read_text(errors="replace"), 240, proc, log, "the server")
        assert f"{api.removesuffix('/api')} (PREFECT_API_URL)" in log.read_text(errors="replace")

        # the first scheduled run starts (and trains: the project is new)
        first = wait_for(lambda: next((r for r in flow_runs(api, "scheduled") if r["state_type"] == "RUNNING"), None),
                         240, proc, log, "a scheduled run to start")
        assert first["auto_scheduled"] and first["deployment_id"]
        # the monitor is served beside it, hourly by default, and told which deployment to start
        resp = httpx.get(f"{api}/deployments/name/mnist-monitor/scheduled", timeout=30)
        resp.raise_for_status()
        monitor = resp.json()
        assert monitor["schedules"][0]["schedule"]["interval"] == 3600
        assert monitor["parameters"]["training_deployment"] == "mnist-training/scheduled"
        # and it runs (started by hand now, so the runner takes it right after the first training run)
        started = httpx.post(f"{api}/deployments/{monitor['id']}/create_flow_run", json={}, timeout=30)
        started.raise_for_status()

        def monitor_done():
            resp = httpx.get(f"{api}/flow_runs/{started.json()['id']}", timeout=30)
            resp.raise_for_status()
            return resp.json() if resp.json()["state_type"] in {"COMPLETED", "FAILED", "CRASHED"} else None

        # meanwhile: a manual run over the same project is refused cleanly (or waits its turn)
        manual = project.cli("run", "--no-package", check=False, timeout=600)
        if manual.returncode != 0:
            assert manual.returncode == 2, manual.stderr[-3000:]
            assert "another pipeline run holds .mnist-mlops.lock" in manual.stderr
            assert "Traceback" not in manual.stderr

        # the same deployment for workers elsewhere: prefect.yaml deploys to a work pool
        pool_env = {**env, "PREFECT_API_URL": api}
        pool_env.pop("MNIST_MLOPS_CHECKOUT", None)
        prefect = str(BIN / "prefect")
        subprocess.run([prefect, "work-pool", "create", "mnist-mlops", "--type", "process"], cwd=project.root,
                       env=pool_env, capture_output=True, text=True, timeout=300, check=True)
        deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=project.root, env=pool_env,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        resp = httpx.get(f"{api}/deployments/name/mnist-monitor/mnist-monitor-worker", timeout=30)
        resp.raise_for_status()
        assert resp.json()["parameters"]["training_deployment"] == "mnist-training/mnist-training-worker"
        resp = httpx.get(f"{api}/deployments/name/mnist-training/mnist-training-worker", timeout=30)
        resp.raise_for_status()
        worker_deployment = resp.json()
        assert worker_deployment["work_pool_name"] == "mnist-mlops"
        assert worker_deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
        assert worker_deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"][
            "directory"] == "{{ $MNIST_MLOPS_CHECKOUT }}"

        # two scheduled runs complete: the first trained, the next found nothing changed
        def two_completed():
            done = [r for r in flow_runs(api, "scheduled") if r["state_type"] == "COMPLETED"]
            return done if len(done) >= 2 else None

        done = wait_for(two_completed, 600, proc, log, "two completed scheduled runs")
        assert all(r["auto_scheduled"] for r in done)
        first_summary, second_summary = summary_of(api, done[0]["id"]), summary_of(api, done[1]["id"])
        assert "| trained | yes |" in first_summary or manual.returncode == 0, first_summary
        assert "| trained | " + SKIPPED + " |" in second_summary, second_summary
        assert "| promoted | yes |" in first_summary + second_summary
        assert done[0]["name"].startswith("schedule · data "), done[0]["name"]

        monitored = wait_for(monitor_done, 300, proc, log, "the monitor run")
        assert monitored["state_type"] == "COMPLETED", monitored["state"]

        # The Prefect UI of the shared server works: the deployment, a run's tasks and summary.
        ui = api.removesuffix("/api")
        body = page_text(browser, f"{ui}/deployments", "scheduled")
        browser.save_screenshot(str(tmp_path / "prefect-deployments.png"))
        assert "scheduled" in body and "mnist-training" in body, body[:2000]
        assert "Something went wrong" not in body and "Oops" not in body
        page_text(browser, f"{ui}/runs/flow-run/{done[0]['id']}", "Task Runs")
        click_text(browser, "Task Runs")
        body = wait_text(browser, "check-tracking", "promote")
        browser.save_screenshot(str(tmp_path / "prefect-flow-run.png"))
        assert "check-tracking" in body and "promote" in body, body[:3000]  # the run's tasks
        click_text(browser, "Artifacts")
        body = wait_text(browser, "training-summary")
        assert "training-summary" in body, body[:3000]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        left = processes_with(marker)
        deadline = time.monotonic() + 20  # children that are already exiting get a moment
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = processes_with(marker)
        stop_group(proc, 10)  # no-op after a clean Ctrl-C; else the group goes the usual way
        kill_all(marker)  # and whatever escaped the group
    output = log.read_text(errors="replace")
    assert proc.returncode == 0, output[-5000:]
    assert "schedule stopped" in output
    assert "Traceback" not in output.split("schedule stopped")[-1]
    assert left == [], f"processes left behind: {left}"
    # the shared server stays up, with the schedule paused on it
    resp = httpx.get(f"{api}/deployments/name/mnist-training/scheduled", timeout=30)
    resp.raise_for_status()
    assert resp.json()["paused"] is True, resp.json()
    client = project.mlflow_client()
    monitoring = client.get_experiment_by_name("mnist-monitoring")
    assert monitoring is not None and client.search_runs([monitoring.experiment_id])  # the monitor's run
    versions = client.search_model_versions("name='mnist-convnet'")
    assert len(versions) == 1  # two (or three) runs, one training, one version
    assert str(client.get_model_version_by_alias("mnist-convnet", "champion").version) == str(versions[0].version)


@pytest.mark.timeout(900)
def test_ctrl_c_right_after_the_banner_stops_the_schedule(project, tmp_path):
    """Issue 30 point 2: Ctrl-C at once or two seconds after the "stop │ Ctrl-C" row (the schedule
    still starting: importing Prefect, deploying, starting the runner) stops it at once and
    cleanly: exit 0, "schedule stopped", no traceback, nothing left running. (At once, the
    interrupt landed inside pydantic, which wrapped it in a serialization error: a traceback.)"""
    from mnist_mlops.platform.processes import free_port

    for delay in (0.3, 2.0):
        marker = uuid.uuid4().hex
        env = {**project.env, "MNIST_MLOPS_TEST_MARKER": marker}
        env.pop("PREFECT_API_URL", None)  # it starts its own Prefect server, as on a laptop
        log = tmp_path / f"schedule-{delay}.log"
        cmd = [str(BIN / "mnist-mlops"), "schedule", "--cron", "0 3 1 1 *", "--monitor-every", "off",
               "--port", str(free_port())]
        proc = start_group(cmd, log, env, cwd=project.root, die_with_parent=False)
        try:
            wait_for(lambda log=log: "Ctrl-C (pauses the schedule)" in log.read_text(errors="replace"), 300, proc, log,
                     "the schedule's banner")
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends the foreground group
            wait_stopped(proc, log, 45, f"Ctrl-C {delay} s after the banner")
        finally:
            left = left_behind(proc, marker)
        output = log.read_text(errors="replace")
        assert proc.returncode == 0 and "schedule stopped" in output, (delay, output[-3000:])
        assert "Traceback" not in output, (delay, output[-3000:])
        assert left == [], f"processes left behind: {left}"
