"""The few private library names the project still relies on, each wrapped in one function:
these tests fail loudly, naming the wrapper, the day a library renames or fixes them."""

from __future__ import annotations


def test_mlflow_keras_save_example_is_still_there_to_patch() -> None:
    """training.evaluate._patch_keras_input_example wraps it (MLflow 3.17 writes the input
    example before creating the model dir); when MLflow drops or fixes it, drop the patch."""
    import mlflow.keras.save as keras_save

    from mnist_mlops.training.evaluate import _patch_keras_input_example

    assert callable(getattr(keras_save, "_save_example", None)), "mlflow changed: remove the patch in evaluate.py"
    _patch_keras_input_example()
    assert getattr(keras_save._save_example, "_makes_dir", False)


def test_mlflow_process_state_the_test_isolation_resets() -> None:
    """tests/conftest.py::_isolate_mlflow_globals resets these between tests (no public reset)."""
    from mlflow.tracking import _model_registry, _tracking_service, fluent

    assert hasattr(_tracking_service.utils, "_tracking_uri")
    assert hasattr(_model_registry.utils, "_registry_uri")
    assert hasattr(fluent, "_active_experiment_id")


def test_no_private_bentoml_or_prefect_names_in_the_code() -> None:
    """Public APIs only for BentoML and Prefect (server_context, NVML, `prefect server start`),
    but for the wrapped names tested below (platform.prefect_server.WORKER_NAME_ENV,
    serving.launch.use_prometheus_dir)."""
    from helpers import REPO

    wrapper = REPO / "src" / "mnist_mlops" / "platform" / "prefect_server.py"
    bento_wrapper = REPO / "src" / "mnist_mlops" / "serving" / "launch.py"
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]:
        text = path.read_text()
        assert text.count("bentoml._internal") == (1 if path == bento_wrapper else 0), path
        assert text.count("PREFECT__") == (1 if path == wrapper else 0), path


def test_prefect_still_names_the_worker_of_a_flow_run_in_its_environment() -> None:
    """platform.prefect_server.worker_name reads it (a sweep candidate's `sweep.worker` tag)."""
    from prefect.workers.base import BaseJobConfiguration

    from mnist_mlops.platform.prefect_server import WORKER_NAME_ENV

    env = BaseJobConfiguration._base_attribution_environment(worker_name="worker-a")
    assert env.get(WORKER_NAME_ENV) == "worker-a", f"prefect changed: fix worker_name ({env})"


def test_bentoml_still_takes_the_prometheus_dir_from_the_setting_we_set(tmp_path) -> None:
    """serving.launch.use_prometheus_dir sets it (each `mnist-mlops serve` its own /metrics files):
    `bentoml serve` must still create, empty and hand its workers the folder that setting names."""
    from bentoml.serving import ensure_prometheus_dir

    from mnist_mlops.serving.launch import use_prometheus_dir

    mine = tmp_path / "metrics"
    mine.mkdir()
    (mine / "counter_1.db").write_bytes(b"old")
    use_prometheus_dir(str(mine))
    try:
        assert ensure_prometheus_dir() == str(mine.absolute()), "bentoml changed: fix serving/launch.py"
        assert list(mine.iterdir()) == []  # emptied at start: which is why each serve needs its own
    finally:
        from bentoml._internal.configuration.containers import BentoMLContainer

        BentoMLContainer.prometheus_multiproc_dir.reset()


def test_mlflow_sqlite_schema_still_answers_the_quick_registry_reads(tmp_path) -> None:
    """platform.sqlite_registry reads MLflow's own tables (`serve` starts 4.5 s sooner): on a
    real store, it must give what MlflowClient gives, and None where MlflowClient has nothing."""
    import mlflow

    from mnist_mlops.platform import sqlite_registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("contract")
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    client.create_registered_model("m")
    versions = [client.create_model_version("m", f"runs:/{run}/model", run_id=run).version for run in runs]
    client.set_registered_model_alias("m", "champion", versions[1])
    client.delete_model_version("m", versions[2])
    found = client.get_model_version_by_alias("m", "champion")
    assert sqlite_registry.alias_run(uri, "m", "champion") == (str(found.version), found.run_id), \
        "mlflow changed its schema: fix platform/sqlite_registry.py"
    assert sqlite_registry.version_run(uri, "m", versions[0]) == (str(versions[0]), runs[0])
    assert sqlite_registry.version_run(uri, "m", versions[2]) is None  # deleted
    assert sqlite_registry.alias_run(uri, "m", "challenger") is None
    assert sqlite_registry.alias_run(uri, "other", "champion") is None
    client.delete_registered_model_alias("m", "champion")
    assert sqlite_registry.alias_run(uri, "m", "champion") is None


def test_bentoml_still_keeps_bentos_where_the_quick_start_looks(tmp_path, monkeypatch) -> None:
    """serving.package.bento_store: `$BENTOML_HOME/bentos`, which BentoML documents as its store
    (asked in a fresh process: this one's BentoML settings were read under another home)."""
    import subprocess
    import sys

    from mnist_mlops.serving.package import bento_store

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    code = ("from bentoml._internal.configuration.containers import BentoMLContainer as c; "
            "print(c.bento_store_dir.get())")
    theirs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert theirs == str(bento_store()) == str(tmp_path / "home" / "bentos"), "bentoml changed: fix bento_store"
