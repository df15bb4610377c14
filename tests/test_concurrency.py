"""Two pipeline runs at once over one project: a manual `mnist-mlops run` and the training
flow called the way a deployment (schedule, worker) calls it. One of them holds the
pipeline lock; the other fails fast with a clear message (or, if it came second, finds
nothing to do). The registry, DVC and the lock are consistent afterwards."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from mnist_mlops.config import write_params
from pipelines.training import SKIPPED

from helpers import BIN, SMALL_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.own_prefect]

AS_A_DEPLOYMENT = ("import sys; from pipelines.training import training_flow; "
                   "print(training_flow(root=sys.argv[1], package_bento=False))")
REFUSED = "another pipeline run holds .mnist-mlops.lock"


def race_two_prefect_servers(project, monkeypatch) -> None:
    """Two of our Prefect servers started at once on the project's fresh database both come
    up: the one that loses the race to migrate it is started again.

    This also leaves the database migrated, so the race in the test below is about the
    pipeline lock alone: the flow called directly starts Prefect's own temporary server,
    which has no such retry (a deployment's run talks to a running server instead).
    """
    from mnist_mlops.platform import prefect_server
    from mnist_mlops.platform.processes import free_port

    monkeypatch.setenv("PREFECT_HOME", project.env["PREFECT_HOME"])
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    servers = [prefect_server.launch(free_port(), one_run=True) for _ in range(2)]
    try:
        for server in servers:
            prefect_server.wait_ready(server, timeout=240)
            assert httpx.get(f"{server.api_url}/health", timeout=10).status_code == 200
    finally:
        for server in servers:
            server.stop()


@pytest.mark.timeout(900)
def test_two_runs_at_once_one_is_refused_cleanly(project, monkeypatch):
    race_two_prefect_servers(project, monkeypatch)
    write_params(project.root, SMALL_MODEL)
    project.env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # `python -c` skips the CLI's defaults
    popen = dict(cwd=project.root, env=project.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manual = subprocess.Popen([str(BIN / "mnist-mlops"), "run", "--no-package"], **popen)
    flow = subprocess.Popen([sys.executable, "-c", AS_A_DEPLOYMENT, str(project.root)], **popen)
    results = {}
    for name, proc in (("manual", manual), ("flow", flow)):
        out, err = proc.communicate(timeout=840)
        results[name] = (proc.returncode, out + err)

    ok = [name for name, (code, _) in results.items() if code == 0]
    assert ok, f"both runs failed: {results}"
    for name, (code, output) in results.items():
        if code != 0:  # the clean refusal: one line naming the lock, nothing half-done
            assert REFUSED in output, output[-4000:]
            if name == "manual":
                assert code == 2 and "Traceback" not in output
    if len(ok) == 2:  # the second one only started once the first had finished: it trained nothing
        assert any(SKIPPED in out for _, out in results.values())

    # one training, one registered version, the champion alias on it
    client = project.mlflow_client()
    versions = client.search_model_versions("name='mnist-convnet'")
    assert len(versions) == 1
    assert str(client.get_model_version_by_alias("mnist-convnet", "champion").version) == str(versions[0].version)
    registered = json.loads((project.root / "artifacts" / "registered.json").read_text())
    assert str(registered["version"]) == str(versions[0].version) and registered["run_id"] == versions[0].run_id
    runs = client.search_runs([client.get_experiment_by_name("mnist-convnet").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]  # no half-started run left RUNNING

    # DVC: dvc.lock matches the workspace, data matches data.dvc
    status = project.run("dvc", "status")
    assert "up to date" in status.stdout, status.stdout

    # the lock was released: a later run gets it at once and finds nothing to do
    from mnist_mlops.platform.locking import pipeline_lock

    with pipeline_lock(project.root / ".mnist-mlops.lock"):
        pass
