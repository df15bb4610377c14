"""The monitor flow: read a window of the prediction log and the labels, compare them with the
champion's reference, write and log a report, and start the training flow when there is a reason.

Thin like the training flow: the statistics live in `mnist_mlops.monitoring`. A run is one
MLflow run in the experiment `mnist-monitoring` (so the MLflow UI charts each drift metric
over time), one HTML report in reports/monitoring/, and one Prefect artifact.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from mnist_mlops.config import Paths, load_params
from mnist_mlops.platform.tracking import MONITORING_EXPERIMENT as EXPERIMENT
from pipelines.tasks import quiet_user_error_tracebacks, summary_markdown


@task(name="check")
def check(root: str, start: datetime, end: datetime, log_dir: str | None, retrain: bool) -> dict:
    """Measure the window, write the report, decide whether to retrain, log it all to MLflow;
    returns the summary (and, under `_retrain`, the reason to start the training flow)."""
    import mlflow

    from mnist_mlops.monitoring import report
    from mnist_mlops.monitoring.check import evidence, run_check
    from mnist_mlops.monitoring.reference import champion_reference
    from mnist_mlops.platform.tracking import quiet_env, setup_mlflow
    from mnist_mlops.platform.versioning import dvc_md5

    paths, params = Paths(Path(root)), load_params(Path(root))
    quiet_env()
    setup_mlflow(paths.root, EXPERIMENT)
    reference = champion_reference()
    result = run_check(paths, params, reference, start, end, Path(log_dir) if log_dir else None)
    page = report.write(result, reference, paths.monitoring)
    fingerprint = evidence(result, dvc_md5(paths.data_dvc))
    decision, start_now = retrain_decision(result.reasons, retrain, fingerprint)
    with mlflow.start_run(run_name=f"monitor {end:%Y-%m-%d %H:%M}") as run:
        mlflow.log_params({"window_start": start.isoformat(), "window_end": end.isoformat(),
                           "champion": reference.version, **{f"monitor.{k}": v for k, v in
                                                            params.monitor.model_dump().items()}})
        mlflow.log_metrics(result.metrics())
        mlflow.set_tags({"verdict": result.verdict, "drifted": ",".join(result.drifted) or "none",
                         "retrain_reason": "; ".join(result.reasons) or "none",
                         "retrain_evidence": fingerprint, "retrain_started": str(start_now).lower(),
                         "retrain_decision": decision, "champion_run_id": reference.run_id})
        mlflow.log_artifact(str(page), "report")
        mlflow.log_dict({"summary": result.summary(), "checks": [c.as_dict() for c in result.checks],
                         "accuracy": {v: a.as_dict() for v, a in result.accuracy.items()}}, "summary.json")
    return {**result.summary(), "report": str(page), "MLflow run id": run.info.run_id,
            **({"training": decision} if result.reasons and not start_now else {}),
            "_retrain": "; ".join(result.reasons) if start_now else None}


def retrain_decision(reasons: list[str], retrain: bool, fingerprint: str) -> tuple[str, bool]:
    """Whether this check starts the training flow, and why (or why not), in words."""
    import mlflow

    if not reasons:
        return "no: nothing calls for it", False
    if not retrain:
        return "not started (retrain off)", False
    earlier = mlflow.search_runs(experiment_names=[EXPERIMENT], max_results=1, output_format="list",
                                 filter_string=f"tags.retrain_evidence = '{fingerprint}' "
                                               "and tags.retrain_started = 'true'",
                                 order_by=["attributes.start_time DESC"])
    if earlier:
        return (f"not started: the same evidence (champion, data version, drift, labels) already started a "
                f"retrain (monitoring run {earlier[0].info.run_id})"), False
    return "started", True


@task(name="start-training")
def start_training(root: str, reason: str, training_deployment: str | None) -> str:
    """Run the training deployment when one is named (on the same Prefect server: it runs where
    that deployment is served), else the training flow here, as a subflow."""
    if training_deployment:
        from prefect.deployments import run_deployment

        if queued := queued_by_monitor(training_deployment):
            return f"not started: {queued} (started by the monitor) has not finished yet"
        run = run_deployment(name=training_deployment, parameters={"trigger": "monitor", "reason": reason},
                             timeout=0, as_subflow=False, tags=["monitor"])
        return f"started {training_deployment}: flow run {run.name} ({run.id})"
    from pipelines.training import training_flow

    summary = training_flow(root=root, trigger="monitor", reason=reason)
    return f"ran the training flow here: {summary['Prefect flow run']} (promoted: {summary['promoted']})"


def queued_by_monitor(deployment: str) -> str | None:
    """A training run the monitor started that is still waiting or running: one is enough
    (drift lasts; without this every check would queue another run)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        target = client.read_deployment_by_name(deployment)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[target.id])),
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["monitor"]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]))),
            limit=1)
    return f"flow run {runs[0].name}" if runs else None


def monitor_run_name() -> str:
    """`monitor · last 24 h`: the window, as the Prefect UI lists the runs."""
    parameters = flow_run.get_parameters()
    hours = parameters.get("since_hours")
    if hours is None:
        hours = load_params(Path(parameters.get("root", "."))).monitor.window_hours
    return f"monitor · last {hours:g} h"


@flow(name="mnist-monitor", log_prints=True, flow_run_name=monitor_run_name)
def monitor_flow(root: str = ".", since_hours: float | None = None, retrain: bool | None = None,
                 training_deployment: str | None = None, log_dir: str | None = None) -> dict:
    """One check of the last `since_hours` (default: monitor.window_hours) of traffic.

    `retrain` (default: monitor.retrain) lets a reason start the training flow: the
    deployment `training_deployment` when given, else the training flow in this process.
    """
    quiet_user_error_tracebacks()
    root = str(Path(root).resolve())
    params = load_params(Path(root))
    hours = since_hours if since_hours is not None else params.monitor.window_hours
    end = datetime.now(UTC)
    summary = check(root, end - timedelta(hours=hours), end, log_dir,
                    params.monitor.retrain if retrain is None else retrain)
    reason = summary.pop("_retrain")
    logger = get_run_logger()
    if reason:
        summary["training"] = start_training(root, reason, training_deployment)
    logger.info("monitor: %s; %s", summary["verdict"], summary["retrain"])
    create_markdown_artifact(markdown=summary_markdown(summary, "MNIST monitoring"),
                             key="monitoring-summary", description="summary of the monitoring run")
    return summary
