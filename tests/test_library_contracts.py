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
