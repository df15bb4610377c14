"""End to end: the real flow (`mnist-mlops run`) on the sample, in a temp project copy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.training import foreign
from mnist_mlops.training.robustness import NAMES

from helpers import Project, copy_project

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FIGURES = {"learning_curves.png", "confusion_matrix.png", "misclassified.png", "conv_filters.png", "robustness.png"}


def versions(project: Project) -> list[str]:
    client = project.mlflow_client()
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'"))


def test_first_run_records_run_model_and_champion(trained_project: Project,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client = trained_project.mlflow_client()
    assert versions(trained_project) == ["1"]
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
    assert str(champion.version) == "1"
    run = client.get_run(champion.run_id)

    assert run.data.params["train.epochs"] == "1"
    assert run.data.params["model.filters"] == "[32, 64]"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [1]
    assert 0.5 <= run.data.metrics["test_accuracy"] <= 1.0
    assert {f"f1_{d}" for d in range(10)} <= set(run.data.metrics)
    robust = {k: v for k, v in run.data.metrics.items() if k.startswith("robust_") and k != "robust_accuracy"}
    assert set(robust) == {f"robust_{name}" for name in NAMES}
    assert run.data.metrics["robust_accuracy"] == pytest.approx(sum(robust.values()) / len(robust))
    assert "robust accuracy" in trained_project.first_run_output

    pinned = yaml.safe_load((trained_project.root / "data.dvc").read_text())["outs"][0]["md5"]
    # named as Prefect names its flow run (what started it, the data version), never at random
    assert run.info.run_name == f"manual · data {pinned[:8]}", run.info.run_name
    head = trained_project.run("git", "rev-parse", "HEAD").stdout.strip()
    assert run.data.tags["data.md5"] == pinned
    assert run.data.tags["data.source"] == "sample"
    assert run.data.tags["git.commit"] == head
    assert run.data.tags["prefect.flow_run_id"] not in ("", "none")

    figures = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "figures")}
    assert FIGURES <= figures
    import mlflow

    trained_project.use_env(monkeypatch)
    mlflow.set_tracking_uri(trained_project.env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(trained_project.env["MLFLOW_TRACKING_URI"])
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/1")
    assert info.signature is not None and info.saved_input_example_info is not None
    assert "keras" in info.flavors

    assert "promoted" in trained_project.first_run_output
    # fetching the default data reproduced data.dvc byte for byte
    assert trained_project.run("git", "status", "--porcelain", "data.dvc").stdout == ""


def test_dvc_sees_the_flow_results(trained_project: Project, tmp_path: Path, browser) -> None:
    # `dvc status`, not `dvc repro`: a stale stage must fail this test, not retrain the shared project
    status = trained_project.run("dvc", "status")
    assert "up to date" in status.stdout, status.stdout
    metrics = trained_project.run("dvc", "metrics", "show", "--json").stdout
    assert "test_accuracy" in metrics
    out = tmp_path / "plots"
    trained_project.run("dvc", "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    # every figure once, and nothing the page would fetch from the network (it renders offline)
    images = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert sorted(images) == sorted(set(images)) and len(images) == 5, images
    assert {Path(i).name.split("figures_")[-1] for i in images} == {
        "learning_curves.png", "confusion_matrix.png", "misclassified.png", "conv_filters.png", "robustness.png"}
    assert all((out / i).is_file() for i in images)
    assert not re.search(r"(src|href)=\S*https?:", html) and "<script" not in html, html[:2000]
    # ... and it does: headless Chromium with its network off draws every figure from the files
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    try:
        browser.get_log("performance")  # what earlier pages requested
        browser.get((out / "index.html").as_uri())
        drawn = browser.execute_script(
            "return [...document.images].map(i => [i.complete && i.naturalWidth > 0, i.naturalWidth])")
        events = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
        fetched = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                                {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
    assert len(drawn) == 5 and all(ok and width >= 100 for ok, width in drawn), drawn
    assert len(fetched) == 6 and all(url.startswith("file://") for url in fetched), fetched  # the page, 5 images


def test_rerun_with_nothing_changed_trains_nothing(trained_project: Project, prefect_server: str,
                                                   tmp_path: Path) -> None:
    # a copy: a rerun that did train must not touch the shared one
    copy = copy_project(trained_project, tmp_path / "copy", prefect_server)
    client = copy.mlflow_client()
    runs_before = len(client.search_runs([r.experiment_id for r in client.search_experiments()]))
    proc = copy.cli("run")
    out = proc.stdout + proc.stderr
    assert "stage train skipped" in out and "stage evaluate skipped" in out
    assert "no (DVC skipped" in out
    assert versions(copy) == ["1"]
    assert len(client.search_runs([r.experiment_id for r in client.search_experiments()])) == runs_before


def test_changing_epochs_reruns_only_train_and_evaluate(trained_project: Project, prefect_server: str,
                                                        tmp_path: Path) -> None:
    copy = copy_project(trained_project, tmp_path / "copy", prefect_server)
    proc = copy.cli("run", "--no-package", "--set", "train.epochs=2")
    out = proc.stdout + proc.stderr
    assert "params.yaml updated: train.epochs=2" in out
    assert "stage prepare skipped" in out and "stage foreign skipped" in out
    assert "stage train ran" in out and "stage evaluate ran" in out
    assert versions(copy) == ["1", "2"]
    history = copy.mlflow_client().get_metric_history(
        copy.mlflow_client().get_model_version(MODEL_NAME, "2").run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]


def test_second_run_fails_fast_while_one_holds_the_lock(project: Project) -> None:
    from mnist_mlops.config import Paths
    from mnist_mlops.platform.locking import pipeline_lock

    with pipeline_lock(Paths(project.root).lock):
        proc = project.cli("run", check=False)
    assert proc.returncode == 2
    assert "another pipeline run holds" in proc.stderr
    assert not (project.root / "data").exists()


def test_training_is_deterministic(tmp_path: Path) -> None:
    """Same data + params + machine → identical test metrics (seeds + op determinism), with the
    default augmentation on: its random distortions are seeded too."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("determinism")  # fit() logs per-epoch metrics
    from mnist_mlops.config import Paths, validate
    from mnist_mlops.scoring import probabilities, score
    from mnist_mlops.training import foreign
    from mnist_mlops.training.data import fetch
    from mnist_mlops.training.prepare import load_split, prepare

    params = validate({"model": {"filters": [8], "convs_per_block": 1, "dense_units": 16},
                       "train": {"epochs": 1}, "foreign": {"digits": 20, "train_digits": 20}})
    assert params.augment.enabled and params.foreign.train_share > 0  # the foreign mix is seeded too
    paths = Paths(tmp_path)
    fetch(params.data, paths.data, tmp_path / "cache")
    prepare(paths, params)
    foreign.stage(params, paths)
    test = load_split(paths.prepared, "test")
    from mnist_mlops.model_file import save_keras
    from mnist_mlops.training.train import fit, write_history

    scores, weights, files = [], [], []
    for i in range(2):
        model, rows = fit(params, paths)
        scores.append(score(probabilities(model, test.x), test.y))
        weights.append(model.get_weights())
        assert len(rows) == 1
        save_keras(model, tmp_path / f"run{i}" / "model.keras")
        write_history(rows, tmp_path / f"run{i}" / "history.csv")
        files.append([(tmp_path / f"run{i}" / name).read_bytes() for name in ("model.keras", "history.csv")])
    assert scores[0] == scores[1]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
    # what DVC records of the train stage is the same bytes too: a rerun leaves dvc.lock as it was
    assert files[0] == files[1]


def test_run_summary_written_for_dvc(trained_project: Project) -> None:
    """What DVC reads (the evaluate stage's metrics and registered.json) is what MLflow recorded."""
    stage = yaml.safe_load((trained_project.root / "dvc.yaml").read_text())["stages"]["evaluate"]
    assert "reports/metrics.json" in [next(iter(m)) if isinstance(m, dict) else m for m in stage["metrics"]]
    shown = json.loads(trained_project.run("dvc", "metrics", "show", "--json").stdout)
    [workspace] = shown.values()  # no revisions asked for: the workspace only ("" in DVC 3)
    dvc_metrics = workspace["data"]["reports/metrics.json"]["data"]
    assert dvc_metrics == json.loads((trained_project.root / "reports" / "metrics.json").read_text())
    registered = json.loads((trained_project.root / "artifacts" / "registered.json").read_text())

    # the independent record: the MLflow registry and the run it points to
    client = trained_project.mlflow_client()
    champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
    logged = client.get_run(champion.run_id).data.metrics
    assert (registered["model"], registered["version"], registered["run_id"]) == (
        MODEL_NAME, str(champion.version), champion.run_id)
    assert registered["accuracy"] == pytest.approx(logged["test_accuracy"], abs=1e-9)
    assert dvc_metrics["test_accuracy"] == pytest.approx(logged["test_accuracy"], abs=1e-9)
    assert dvc_metrics["test_loss"] == pytest.approx(logged["test_loss"], abs=1e-9)
    assert f"{dvc_metrics['test_accuracy']:.6f}" == champion.tags["test_accuracy"]
    assert dvc_metrics["foreign_worst_class"] == pytest.approx(logged["foreign_worst_class"], abs=1e-9)
    details = {name: json.loads((trained_project.root / "reports" / f"{name}.json").read_text())
               for name in ("per_class", "robustness", "foreign", "feedback")}
    per_class = details["per_class"]
    assert {"precision_0", "recall_9", "f1_5"} <= set(per_class)
    assert per_class == {k: round(v, 4) for k, v in logged.items() if k.startswith(("precision_", "recall_", "f1_"))}
    # the robustness slice: its mean and one metric per corruption, in DVC as in MLflow
    assert dvc_metrics["robust_accuracy"] == pytest.approx(logged["robust_accuracy"], abs=1e-9)
    assert registered["robust_accuracy"] == pytest.approx(logged["robust_accuracy"], abs=1e-9)
    assert details["robustness"] == {name: round(logged[f"robust_{name}"], 4) for name in NAMES}
    # the foreign slice: overall, per source, per class, the worst class; in DVC, MLflow, the version
    assert dvc_metrics["foreign_accuracy"] == pytest.approx(logged["foreign_accuracy"], abs=1e-9)
    assert registered["foreign_accuracy"] == pytest.approx(logged["foreign_accuracy"], abs=1e-9)
    assert {"printed", "stroke", "worst_class", "class_1"} <= set(details["foreign"])
    assert details["foreign"]["worst_class"] == round(min(logged[f"foreign_class_{d}"] for d in range(10)), 4)
    assert {"Caladea", "Hershey triplex"} <= set(details["foreign"]["families"]) <= {
        f.name for f in foreign.families("test")}  # the test families only (20 digits: not all of them)
    logged_feedback = {k.removeprefix("feedback_"): v for k, v in logged.items() if k.startswith("feedback_")}
    assert details["feedback"] == logged_feedback
    assert details["feedback"]["digits"] == 0
    assert f"{dvc_metrics['foreign_accuracy']:.6f}" == champion.tags["foreign_accuracy"]
    assert f"foreign accuracy {champion.tags['foreign_accuracy']}" in champion.description
    assert "foreign accuracy" in trained_project.first_run_output
    # the headline reads in a terminal: one row of the five numbers (no per-class or per-corruption maps)
    table = trained_project.run("dvc", "metrics", "show").stdout
    header = table.splitlines()[0].split()
    assert header == ["Path", "foreign_accuracy", "foreign_worst_class", "robust_accuracy", "test_accuracy",
                      "test_loss"], table
    assert max(map(len, table.splitlines())) <= 120, table
    detail = trained_project.run("dvc", "metrics", "show", "reports/robustness.json").stdout
    assert "thick_2" in detail and "jpeg_8" in detail
