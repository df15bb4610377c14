"""Inspecting runs as a user does: `mnist-mlops ui`, then the printed URL in a browser.

The runs table opens in model-training mode, with the champion's run, its datasets and its
test accuracy; the run carries MLflow datasets and system metrics; the registry carries
descriptions; and the console of the run that produced it stayed free of library noise."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.platform.processes import free_port, start_group, stop_group, wait_http

from helpers import BIN, Project, page_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def champion_run(project: Project):
    client = project.mlflow_client()
    mv = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
    return client, mv, client.get_run(mv.run_id)


def test_the_run_console_is_free_of_library_noise(trained_project: Project) -> None:
    out = trained_project.first_run_output  # type: ignore[attr-defined]
    for noise in ("E0000", "I0000", "absl", "cuInit", "cudart_stub", "Downloading artifacts", "━",
                  "UserWarning", "View at http"):  # Prefect's link to a UI nobody serves during the run
        assert noise not in out, f"{noise!r} in the output of `mnist-mlops run`:\n{out[-3000:]}"
    assert re.search(r"epoch\s+1/1\s+loss", out), out[-3000:]  # the project's own lines stay
    assert "test accuracy" in out and "MLflow UI" in out


def test_runs_carry_datasets_system_metrics_and_descriptions(trained_project: Project) -> None:
    client, mv, run = champion_run(trained_project)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"mnist-train", "mnist-val", "mnist-test"}, inputs
    md5 = (trained_project.root / "data.dvc").read_text().split("md5: ")[1].split(".dir")[0]
    for name, context in (("mnist-train", "training"), ("mnist-val", "validation"), ("mnist-test", "test")):
        d = inputs[name]
        assert d.dataset.digest == md5 and "data.dvc" in d.dataset.source
        assert {t.key: t.value for t in d.tags}["mlflow.data.context"] == context
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    assert "MNIST ConvNet" in client.get_registered_model(MODEL_NAME).description
    assert "champion" in client.get_registered_model(MODEL_NAME).description
    description = client.get_model_version(MODEL_NAME, mv.version).description
    assert md5 in description and "Gate: promoted" in description and "test accuracy" in description
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"



def test_mlflow_ui_opens_on_the_runs_table(trained_project: Project, tmp_path: Path, browser) -> None:
    _, mv, run = champion_run(trained_project)
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start_group([str(BIN / "mnist-mlops"), "ui", "--port", str(port)], log, trained_project.env,
                       cwd=trained_project.root)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        url = re.search(r"MLflow UI: (\S+)", log.read_text()).group(1)
        assert url.endswith(f"/#/experiments/{run.info.experiment_id}/runs?workflowType=machine_learning")
        browser.set_window_size(1600, 1000)  # the runs table renders only the columns in view
        body = page_text(browser, url, run.info.run_name, "mnist-train")
        browser.save_screenshot(str(tmp_path / "mlflow-runs.png"))
        assert "Run Name" in body and "Dataset" in body, body[:3000]  # the runs table, not GenAI views
        assert f"mnist-train ({run.inputs.dataset_inputs[0].dataset.digest}" in body, body[:3000]

        run_page = url.replace("/runs?", f"/runs/{run.info.run_id}?")
        body = page_text(browser, run_page, "test_accuracy", "mnist-train", "System metrics")
        browser.save_screenshot(str(tmp_path / "mlflow-run.png"))
        accuracy = run.data.metrics["test_accuracy"]
        assert f"{accuracy:.4f}"[:5] in body or str(round(accuracy, 3)) in body, body[:3000]
    finally:
        stop_group(proc)


def test_mlflow_ui_prints_only_its_url(project: Project, tmp_path: Path) -> None:
    """`mnist-mlops ui` starts the UI the project needs: no GenAI job runner (its consumers and
    job-executor lines), no Starlette warning, no registry, store or uvicorn notices; its lines only."""
    port = free_port()
    log = tmp_path / "ui.log"
    proc = start_group([str(BIN / "mnist-mlops"), "ui", "--port", str(port)], log, project.env, cwd=project.root)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        time.sleep(3)  # what a server prints once it is up
    finally:
        stop_group(proc)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    assert lines and lines[0].startswith("MLflow UI: http://127.0.0.1:"), lines
    assert all(line.startswith(("MLflow UI: ", "  (store: ")) for line in lines), "\n".join(lines)
