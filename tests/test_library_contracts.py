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
    but for the one wrapped name tested below (platform.prefect_server.WORKER_NAME_ENV)."""
    from helpers import REPO

    wrapper = REPO / "src" / "mnist_mlops" / "platform" / "prefect_server.py"
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "pipelines").rglob("*.py")]:
        text = path.read_text()
        assert "bentoml._internal" not in text, path
        assert text.count("PREFECT__") == (1 if path == wrapper else 0), path


def test_prefect_still_names_the_worker_of_a_flow_run_in_its_environment() -> None:
    """platform.prefect_server.worker_name reads it (a sweep candidate's `sweep.worker` tag)."""
    from prefect.workers.base import BaseJobConfiguration

    from mnist_mlops.platform.prefect_server import WORKER_NAME_ENV

    env = BaseJobConfiguration._base_attribution_environment(worker_name="worker-a")
    assert env.get(WORKER_NAME_ENV) == "worker-a", f"prefect changed: fix worker_name ({env})"
