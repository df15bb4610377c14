"""The steps the flows share: tracking check, data check, fetch, version, a DVC stage, promote
(register + the champion gate), package; the pipeline lock a run holds; the summary's rows.

Each task calls one step of the `mnist_mlops` library, passes paths (never arrays or models:
Prefect hashes and pickles task inputs) and returns a plain dataclass (Prefect pickles results).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.runtime import flow_run

from mnist_mlops.config import Params, Paths, load_params
from mnist_mlops.errors import UserError
from mnist_mlops.platform.tracking import FLOW_RUN_ENV, TRIGGER_ENV
from mnist_mlops.platform.versioning import VersionResult
from mnist_mlops.records.feedback import held_back
from mnist_mlops.training.data import FetchResult


class _UserErrorWithoutTraceback(logging.Filter):
    """A UserError is already one clear line: the console shows it without a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_user_error_tracebacks() -> None:
    """Applied to Prefect's console handler only; the API log keeps the full record."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
                isinstance(f, _UserErrorWithoutTraceback) for f in handler.filters):
            handler.addFilter(_UserErrorWithoutTraceback())


@contextmanager
def pipeline_run(root: str, lock_wait_seconds: float = 0, overrides: list[str] | None = None) -> Iterator[Params]:
    """The one place a run takes the project's pipeline lock, however it was started (CLI, schedule,
    worker): a second run fails fast, or waits up to `lock_wait_seconds`. Under the lock, the
    `--set` overrides are written to params.yaml; yields the params the run uses."""
    from mnist_mlops.config import write_params
    from mnist_mlops.platform.locking import pipeline_lock

    with pipeline_lock(Paths(Path(root)).lock, wait_seconds=lock_wait_seconds):
        if overrides and (changed := write_params(Path(root), overrides)):
            get_run_logger().info("params.yaml updated: %s", ", ".join(changed))
        yield load_params(Path(root))


# An unreachable MLflow server fails the run here, before anything local is written.
TRACKING_RETRIES = 2
TRACKING_RETRY_DELAY_SECONDS = 2.0


@task(name="check-tracking")
def check_tracking(root: str) -> str:
    """Reach the MLflow store first (retried): a run that cannot record fails before any work."""
    from mnist_mlops.platform.tracking import quiet_env, setup_mlflow

    quiet_env()  # bounded MLflow HTTP retries/timeouts, however the flow was started
    return setup_mlflow(Path(root))


@task(name="check-data")
def check_data(root: str) -> str | None:
    """Compare data/ with its data.dvc pin before fetch rewrites it: a hand edit is reported."""
    from mnist_mlops.platform.versioning import data_drift

    paths = Paths(Path(root))
    drift = data_drift(paths.root, paths.data, paths.data_dvc)
    if drift:
        get_run_logger().warning("%s: data/ was changed outside the pipeline; fetch restores it "
                                 "from the source", drift)
    return drift


@task(name="fetch")
def fetch(root: str, params: Params) -> FetchResult:
    """Download/load the source into data/ atomically (retried on failure)."""
    from mnist_mlops.training.fetch import fetch as fetch_data

    result = fetch_data(params, Paths(Path(root)))
    log = get_run_logger()
    log.info("%s digits from %s, %s labelled by people (%s)", result.count, result.source, result.feedback,
             "data/ updated" if result.changed else "data/ unchanged")
    if result.kept:
        log.info("%s new labelled digits kept for later: fewer than data.feedback_min_new=%s",
                 result.kept, params.data.feedback_min_new)
    if held := held_back(result.screened):
        log.info("labelled digits held back from the data: %s", held)
    return result


@task(name="version")
def version(root: str) -> VersionResult:
    """dvc add data (+ dvc push when a remote is configured)."""
    from mnist_mlops.platform.versioning import version_data

    paths = Paths(Path(root))
    result = version_data(paths.root, paths.data, paths.data_dvc)
    get_run_logger().info("data md5 %s%s%s", result.md5, " (new version)" if result.changed else "",
                          ", pushed" if result.pushed else "")
    return result


@task(name="stage")
def stage(root: str, name: str) -> bool:
    """One DVC stage; returns whether it ran (False: inputs unchanged, DVC skipped it)."""
    from mnist_mlops.platform.versioning import reproduce

    ran = reproduce(Path(root), name)
    get_run_logger().info("stage %s %s", name, "ran" if ran else "skipped: inputs unchanged")
    return ran


@dataclass(frozen=True)
class Promoted:
    """The promote step's result: the registered model (artifacts/registered.json) and the gate's
    decision on it (`registry.Decision`), with the champion after it."""

    model: str
    version: str
    run_id: str
    promoted: bool
    reason: str
    changed: bool = False
    earlier: str | None = None
    champion: str | None = None
    accuracy: float | None = None
    robust_accuracy: float | None = None
    foreign_accuracy: float | None = None
    foreign_worst_class: float | None = None


REGISTERED_METRICS = ("accuracy", "robust_accuracy", "foreign_accuracy", "foreign_worst_class")


@task(name="promote")
def promote(root: str, min_accuracy: float) -> Promoted:
    """Register the model the evaluate stage logged (once per trained model), then the champion gate."""
    from mnist_mlops import litert, registry
    from mnist_mlops.platform.tracking import setup_mlflow
    from mnist_mlops.training import foreign
    from mnist_mlops.training.evaluate import TAG_MODEL_URI, training_run
    from mnist_mlops.training.prepare import feedback_slice, test_split
    from mnist_mlops.training.robustness import gate_slice

    paths = Paths(Path(root))
    setup_mlflow(paths.root)
    evaluated = json.loads(paths.evaluated.read_text())
    run = training_run(evaluated["weights_md5"], logged=True)
    run_id = run.info.run_id
    version = registry.register(run_id, run.data.tags[TAG_MODEL_URI], evaluated["weights_md5"],
                                evaluated["version_tags"])
    litert.attach(version)  # the file a CPU worker serves without TensorFlow (once per version)
    params = load_params(paths.root)
    test, fb, robust = test_split(paths, params), feedback_slice(paths, params), gate_slice(paths, params)
    alien = foreign.gate_slice(paths, params)
    decision = registry.gate(version, test.x, test.y, min_accuracy,
                             {"feedback": (fb.x, fb.y), "robust": (robust.x, robust.y), "foreign": (alien.x, alien.y)},
                             tolerances={"robust": params.evaluate.max_robust_drop,
                                         "foreign": params.evaluate.max_foreign_drop})
    registered = {"model": evaluated["model"], "version": version, "run_id": run_id,
                  **{k: evaluated.get(k) for k in REGISTERED_METRICS}}
    paths.registered.write_text(json.dumps(registered, indent=2) + "\n")
    result = Promoted(**registered, promoted=decision.promoted, reason=decision.reason, changed=decision.changed,
                      earlier=decision.earlier, champion=registry.champion_version())
    get_run_logger().info("version %s: promoted %s: %s", decision.version, promoted_row(result), decision.reason)
    return result


@dataclass(frozen=True)
class Packaged:
    """The package step's result: the champion's Bento, and whether this call built it."""

    bento: str
    built: bool


@task(name="package")
def package(root: str) -> Packaged:
    """Import the champion into the BentoML store and build its Bento (skipped if current)."""
    from mnist_mlops.serving.package import package_champion

    result = package_champion(Path(root))
    get_run_logger().info("bento %s (%s)", result["bento"], "built" if result["built"] else "up to date")
    return Packaged(bento=result["bento"], built=result["built"])


def summary_markdown(summary: dict, title: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary.items())
    return f"# {title}\n\n| item | value |\n|---|---|\n{rows}\n"


def run_name() -> str:
    """`manual · data a9f0bd22`: what started the run and the data version it started from,
    so runs can be told apart in the Prefect UI (called by Prefect when the run is created)."""
    from mnist_mlops.platform.versioning import dvc_md5

    parameters = flow_run.get_parameters()
    md5 = dvc_md5(Paths(Path(parameters.get("root", "."))).data_dvc) or "none yet"
    return f"{parameters.get('trigger', 'manual')} · data {md5[:8]}"


def flow_run_rows() -> dict:
    """The summary's first rows: which Prefect flow run this is (the CLI turns the id into a UI link)."""
    return {"Prefect flow run": flow_run.get_name(), "Prefect flow run id": flow_run.get_id()}


def versioned_data(root: str, params: Params) -> tuple[dict, dict[str, int]]:
    """The steps every flow starts with: tracking reachable, data/ checked, fetched, versioned.

    Call inside a flow, under the pipeline lock. Returns the summary rows they contribute and
    the counts of labels the fetch step held back (`feedback.Screened`) and accepted (in data/).
    """
    os.environ[FLOW_RUN_ENV] = str(flow_run.get_id() or "none")
    os.environ[TRIGGER_ENV] = str(flow_run.get_parameters().get("trigger") or "manual")  # names the MLflow run
    check_tracking.with_options(retries=TRACKING_RETRIES,
                                retry_delay_seconds=TRACKING_RETRY_DELAY_SECONDS)(root)
    drift = check_data(root)
    fetched = fetch.with_options(retries=params.data.retries,
                                 retry_delay_seconds=params.data.retry_delay_seconds)(root, params)
    versioned = version(root)
    return {
        "data md5": versioned.md5,
        "data source": fetched.source,
        "digits": fetched.count,
        "labelled by people": fetched.feedback if not fetched.kept else
        f"{fetched.feedback} ({fetched.kept} new kept for later: fewer than data.feedback_min_new)",
        **({"labels held back": held} if (held := held_back(fetched.screened)) else {}),
        **({"data check": f"{drift}: restored from the source"} if drift else {}),
    }, {**fetched.screened, "accepted": fetched.feedback}


EARLIER = {"promoted": "champion", "rejected": "refused", "rolled_back": "rolled back"}


def promoted_row(gate: Promoted) -> str:
    """`yes` only when this run moved the champion alias to the version; else what stands."""
    if gate.changed:
        return "yes"
    if gate.earlier:
        return f"no change (decided earlier: {EARLIER.get(gate.earlier, gate.earlier)})"
    if gate.champion == gate.version:
        return "no change (already champion)"
    return "no"


def gate_rows(gate: Promoted) -> dict:
    """Summary rows of the champion gate's decision."""
    return {
        "MLflow run id": gate.run_id,
        "model version": gate.version,
        "test accuracy": f"{gate.accuracy:.4f}" if gate.accuracy is not None else "n/a",
        "robust accuracy": (f"{gate.robust_accuracy:.4f} (mean over the corruptions of the robustness slice)"
                            if gate.robust_accuracy is not None else "n/a"),
        "foreign accuracy": (f"{gate.foreign_accuracy:.4f}, worst class {gate.foreign_worst_class:.4f} "
                             "(printed and pen-drawn digits of font families never trained on)"
                             if gate.foreign_accuracy is not None else "n/a"),
        "promoted": promoted_row(gate),
        "why": gate.reason,
        **({"champion": f"v{gate.champion}"} if gate.champion else {}),
    }
