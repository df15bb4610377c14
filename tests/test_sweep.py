"""`mnist-mlops sweep`: a 2×1 grid gives one parent run and two child runs; only the best
by validation accuracy is evaluated, registered (at most one new version) and gated; the
winning params land in params.yaml and dvc.lock, so `dvc status` is clean afterwards."""

from __future__ import annotations

import pytest
import yaml

from mnist_mlops.config import write_params
from mnist_mlops.errors import UserError
from mnist_mlops.training.sweep import Candidate, best, parse_grid, split_values

from helpers import SMALL_MODEL


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


def test_best_is_by_val_and_robust_val_accuracy_then_val_loss_then_grid_order():
    def cand(i, acc, loss, robust):
        return Candidate(i, [f"train.seed={i}"], f"r{i}", acc, loss, "", robust)

    assert best([cand(0, 0.90, 0.3, 0.9), cand(1, 0.95, 0.5, 0.9), cand(2, 0.95, 0.4, 0.9)]).index == 2
    assert best([cand(0, 0.9, 0.3, 0.9), cand(1, 0.9, 0.3, 0.9)]).index == 0
    # the best on clean val data alone loses to one that reads corrupted digits much better
    assert best([cand(0, 0.97, 0.1, 0.80), cand(1, 0.96, 0.2, 0.90)]).index == 1
    assert cand(1, 0.96, 0.2, 0.90).score == pytest.approx(0.93)


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
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)

    # the best by val and robust-val accuracy, and only it, was evaluated and registered
    winner = max(children, key=lambda c: c.data.metrics["val_accuracy"] + c.data.metrics["robust_val_accuracy"])
    assert parent.data.tags["sweep.best_run_id"] == winner.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(winner.data.metrics["val_accuracy"])
    assert parent.data.metrics["best_robust_val_accuracy"] == pytest.approx(
        winner.data.metrics["robust_val_accuracy"])
    assert "robust val accuracy" in out
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
