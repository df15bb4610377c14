"""The training flow: fetch → version → prepare → train → evaluate → promote → package.

Thin by design: the flow chains the shared steps of `pipelines.tasks`, each of which calls one
step of the `mnist_mlops` library and passes paths, never arrays or models (Prefect hashes and
pickles task inputs). The DVC stages do the ML work, so a run over unchanged data and params
trains nothing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from mnist_mlops.config import Params
from mnist_mlops.platform import preload
from pipelines import tasks

# DVC compares the stages' inputs (data, code, the params each stage reads): a parameter that no stage
# reads, such as the gate's floor, changes none of them, and the gate decides on it after the stages.
SKIPPED = "no (DVC skipped: no stage's inputs changed)"
STAGES = ("prepare", "robustness", "foreign", "train", "evaluate")


@flow(name="mnist-training", log_prints=True, flow_run_name=tasks.run_name)
def training_flow(root: str = ".", package_bento: bool = True, lock_wait_seconds: float = 0,
                  trigger: str = "manual", reason: str = "", overrides: list[str] | None = None) -> dict:
    """The whole pipeline, on the params in params.yaml (`overrides`, `section.key=value` strings
    such as the CLI's `--set`, are written there first, under the lock).

    `trigger` says what started the run (manual, schedule, monitor): it names the run.
    `reason` says why (the monitor's reasons to retrain): it lands in the summary and, with
    the trigger, in the tags of the MLflow run it trains.

    Holds the project's pipeline lock for the whole run, however the run was started (CLI,
    schedule, worker): a second run fails fast, or waits up to `lock_wait_seconds`.
    """
    tasks.quiet_user_error_tracebacks()
    root = str(Path(root).resolve())
    with tasks.pipeline_run(root, lock_wait_seconds, overrides) as params:
        return run_pipeline(root, params, package_bento, trigger, reason)


@task(name="tag-trigger")
def tag_trigger(run_id: str, trigger: str, reason: str, screened: dict[str, int]) -> None:
    """Record on the trained run what started it and why, and which labels its data took and held back
    (`feedback.accepted`, `feedback.quarantined`, …)."""
    import mlflow

    client = mlflow.MlflowClient()
    client.set_tag(run_id, "trigger", trigger)
    if reason:
        client.set_tag(run_id, "trigger.reason", reason[:5000])
    for key, value in screened.items():
        client.log_metric(run_id, f"feedback.{key}", float(value))


def run_stages(root: str) -> dict[str, bool]:
    """Every DVC stage in order; which ran (False: DVC skipped it, its inputs unchanged)."""
    ran: dict[str, bool] = {}
    for name in STAGES:
        if name == "evaluate" and ran["train"]:  # the gate will score a new model: import TF meanwhile
            preload.in_background("tensorflow", "keras")
        ran[name] = tasks.stage.with_options(name=name)(root, name)
    return ran


def run_pipeline(root: str, params: Params, package_bento: bool, trigger: str = "manual",
                 reason: str = "") -> dict:
    """The flow's body, run under the pipeline lock (call it only inside a flow)."""
    rows, screened = tasks.versioned_data(root, params)
    summary = {**tasks.flow_run_rows(), **({"started because": reason} if reason else {}), **rows}
    ran = run_stages(root)
    gate = tasks.promote(root, params.evaluate.min_accuracy)
    summary["trained"] = "yes" if ran["train"] else SKIPPED
    if ran["train"]:
        tag_trigger(gate.run_id, trigger, reason, screened)
    summary |= tasks.gate_rows(gate)
    if package_bento and gate.promoted:
        summary["bento"] = tasks.package(root).bento
    create_markdown_artifact(markdown=tasks.summary_markdown(summary, "MNIST training run"), key="training-summary",
                             description="summary of the training run")
    return summary
