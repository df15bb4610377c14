"""The sweep flow: check → fetch → version → prepare → train each grid combination (child runs) →
keep the best by val, robust-val and foreign-val accuracy → evaluate → promote → package. The ML lives in
`mnist_mlops.training.sweep`; this flow only orders the steps and records them.

With a work pool (`pool`), the candidates are flow runs of `mnist-sweep-candidate` (deployed
to that pool as `mnist-sweep-candidate/<pool>`), started at once and trained by the pool's
workers, each in its own checkout (`$MNIST_MLOPS_CHECKOUT`); they show in the Prefect UI as
sub-flow runs of the sweep. A candidate that fails (its worker died, its checkout is stale)
is reported and left out; the sweep fails only when none finished.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from mnist_mlops.config import Paths, load_params
from mnist_mlops.errors import UserError
from mnist_mlops.training import candidate as candidates
from mnist_mlops.training.candidate import Candidate
from pipelines import tasks

CANDIDATE_FLOW = "mnist-sweep-candidate"
# Each worker runs candidates in its own checkout of the project (set where the worker runs).
CHECKOUT_PULL_STEPS = [
    {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $MNIST_MLOPS_CHECKOUT }}"}}]
POLL_SECONDS = 2.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass(frozen=True)
class FailedCandidate:
    """A fanned-out candidate whose flow run did not complete, and its state's first line."""

    index: int
    overrides: list[str]
    state: str
    message: str


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep decided: the candidates that finished and failed, the winner, whether the
    evaluate stage ran on it, the gate's decision and what became of params.yaml."""

    finished: list[Candidate]
    failed: list[FailedCandidate]
    winner: Candidate
    evaluated: bool
    gate: tasks.Promoted
    installed: str


@task(name="candidate")
def candidate(root: str, index: int, overrides: list[str], parent_run_id: str, workdir: str) -> Candidate:
    """Train one combination as a nested MLflow child run; returns its val, robust-val and foreign-val accuracy."""
    from mnist_mlops.training import sweep

    cand = candidates.train_candidate(Path(root), index, overrides, parent_run_id, Path(workdir))
    sweep.record_candidate(Path(root), parent_run_id, cand)
    get_run_logger().info("candidate %s: val accuracy %.4f, robust val accuracy %.4f, foreign val accuracy %.4f "
                          "(run %s)", cand.label, cand.val_accuracy, cand.robust_val_accuracy,
                          cand.foreign_val_accuracy, cand.run_id)
    return cand


@flow(name=CANDIDATE_FLOW, flow_run_name="candidate-{index}", log_prints=True)
def candidate_flow(index: int, overrides: list[str], parent_run_id: str, params: dict, prepared: dict[str, str],
                   root: str = ".") -> Candidate:
    """One sweep candidate, on a worker of the sweep's pool: check that this checkout holds the
    sweep's params and prepared data, train on this worker's CPUs (a child MLflow run tagged
    with the worker), log the model to the run for the parent. Fails if the worker dies."""
    from mnist_mlops.platform.tracking import FLOW_RUN_ENV
    from mnist_mlops.training import sweep

    tasks.quiet_user_error_tracebacks()
    checkout = Path(root).resolve()
    candidates.check_checkout(checkout, params, prepared)
    os.environ[FLOW_RUN_ENV] = str(flow_run.get_id())
    where = candidates.placement()
    get_run_logger().info("candidate-%d (%s) on worker %s, host %s, CPUs %s, GPUs %s", index, " ".join(overrides),
                          where["sweep.worker"], where["sweep.host"], where["sweep.cpus"], where["sweep.gpus"])
    artifacts = Paths(checkout).artifacts
    artifacts.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".sweep-{parent_run_id[:8]}-c{index}-", dir=artifacts))
    try:
        cand = candidates.train_candidate(checkout, index, overrides, parent_run_id, work, upload=True,
                                     stop_with_parent=True)
    finally:
        sweep.cleanup(work)
    return cand


def deploy_candidates(pool: str) -> str:
    """`mnist-sweep-candidate/<pool>` on the work pool, created or updated; one line if the pool
    is missing or no worker polls it (the candidates would wait forever)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.callables import parameter_schema

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise UserError(f"work pool '{pool}' not found on {client.api_url}: create it "
                            f"(prefect work-pool create {pool} --type process) and start its workers") from None
        if not any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool)):
            raise UserError(f"no worker is polling work pool '{pool}': start one on each machine that should train "
                            f"(prefect worker start --pool {pool})")
        client.create_deployment(
            flow_id=client.create_flow_from_name(CANDIDATE_FLOW), name=pool, work_pool_name=pool,
            entrypoint="pipelines/sweep.py:candidate_flow", pull_steps=CHECKOUT_PULL_STEPS,
            parameter_openapi_schema=parameter_schema(candidate_flow).model_dump_for_openapi(),
            tags=["mnist-mlops", "sweep"], description="One sweep candidate (started by mnist-mlops sweep --pool).")
    return f"{CANDIDATE_FLOW}/{pool}"


def fan_out(root: Path, pool: str, deployment: str, combos: list[list[str]],
            parent: str) -> tuple[list[Candidate], list[FailedCandidate]]:
    """Start every candidate on the pool at once and wait for all: (finished, failed)."""
    from prefect.deployments import run_deployment


    log = get_run_logger()
    shared = {"parent_run_id": parent, "params": load_params(root).model_dump(mode="json"),
              "prepared": candidates.prepared_md5s(root)}
    runs = {i: run_deployment(deployment, parameters={"index": i, "overrides": combo, **shared}, timeout=0,
                              flow_run_name=f"candidate-{i}", tags=["mnist-mlops", "sweep"])
            for i, combo in enumerate(combos)}
    log.info("%d candidates on work pool %s: %s", len(runs), pool, ", ".join(str(r.id) for r in runs.values()))
    try:
        final = wait_for_runs(pool, runs)
    except BaseException:
        cancel_unfinished(runs)
        raise
    finished, failed = [], []
    for i, state in final.items():
        if state.type.value == "COMPLETED":
            run = candidates.child_run(root, parent, str(runs[i].id))
            finished.append(candidates.candidate_from_run(run, i, combos[i]))
        else:
            message = (state.message or state.name).splitlines()[0].split("UserError: ", 1)[-1]
            failed.append(FailedCandidate(i, combos[i], state.name, message[:300]))
    return finished, failed


def wait_for_runs(pool: str, runs: dict) -> dict:
    """Poll the candidates' flow runs until each is final; log every change. If candidates are
    still queued and no worker polls the pool any more, fail in one line (`fan_out` then
    cancels what is left) rather than wait forever."""
    from prefect import get_client

    log = get_run_logger()
    seen: dict[int, str] = {}
    final: dict = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            for i, run in runs.items():
                if i in final:
                    continue
                state = client.read_flow_run(run.id).state
                if state.name != seen.get(i):
                    seen[i] = state.name
                    log.info("candidate-%d: %s%s", i, state.name, f" ({state.message})" if state.message else "")
                if state.type.value in FINAL_STATES:
                    final[i] = state
            waiting = [i for i in runs if i not in final and seen.get(i) in {"Scheduled", "Late", "Pending"}]
            if waiting and not any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool)):
                raise UserError(f"no worker polls work pool '{pool}' any more: candidates "
                                f"{', '.join(f'candidate-{i}' for i in waiting)} never started")
            time.sleep(POLL_SECONDS)
    return final


def cancel_unfinished(runs: dict) -> None:
    """The sweep stops (Ctrl-C, an error): its candidates still queued or training are cancelled."""
    from prefect import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        for run in runs.values():
            try:
                if not client.read_flow_run(run.id).state.is_final():
                    client.set_flow_run_state(run.id, Cancelling(), force=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


@task(name="install-best")
def install_best(root: str, winner: Candidate) -> list[str]:
    """params.yaml := the winner's params; its outputs become the train stage's (dvc commit).
    For evaluation and the gate: `settle` keeps them only if the gate lets the model through."""
    from mnist_mlops.training import sweep

    changed = sweep.install(Path(root), winner)
    get_run_logger().info("best %s; params.yaml %s for evaluation", winner.label,
                          f"updated ({', '.join(changed)})" if changed else "unchanged")
    return changed


@task(name="settle-params")
def settle(root: str, snap: str, promoted: bool, install_anyway: bool, changed: list[str]) -> str:
    """Keep the winner's params when its model passed the gate (or with --install-anyway); else
    put params.yaml, the train and evaluate outputs and dvc.lock back as they were. Returns the
    summary line that says which happened."""
    from mnist_mlops.training import sweep

    if not changed:
        line = "unchanged (the winner's params were the project's)"
    elif promoted:
        line = f"the winner's: its model passed the gate ({', '.join(changed)})"
    elif install_anyway:
        line = f"the winner's, although its model did not pass the gate (--install-anyway: {', '.join(changed)})"
    else:
        sweep.restore(Path(root), Path(snap))
        line = ("unchanged: the winner's model did not pass the gate, so its params were not installed "
                "(--install-anyway installs them)")
    get_run_logger().info("params.yaml: %s", line)
    return line


@flow(name="mnist-sweep", log_prints=True, flow_run_name=tasks.run_name)
def sweep_flow(root: str = ".", grid: list[str] | None = None, package_bento: bool = True,
               lock_wait_seconds: float = 0, trigger: str = "sweep", pool: str | None = None,
               install_anyway: bool = False, overrides: list[str] | None = None) -> dict:
    """Every combination of `grid` (`section.key=v1,v2` strings) as child runs of one parent
    MLflow run, one after another here or all at once on the workers of `pool`; only the best
    (val, robust-val and foreign-val accuracy) is evaluated, gated and packaged. Its params stay in
    params.yaml only when its model passes the gate, or with `install_anyway`. `overrides`
    (`section.key=value`, the CLI's `--set`) are written to params.yaml first, under the lock."""
    from mnist_mlops.platform.tracking import run_tags
    from mnist_mlops.training import sweep

    tasks.quiet_user_error_tracebacks()
    root = str(Path(root).resolve())
    combos = sweep.combinations(Path(root), grid, base=overrides)
    deployment = deploy_candidates(pool) if pool else None  # a missing pool or worker fails before any work
    with tasks.pipeline_run(root, lock_wait_seconds, overrides) as params:
        summary = {**tasks.flow_run_rows(), **tasks.versioned_data(root, params)[0]}
        for name in ("prepare", "robustness", "foreign"):  # candidates score on robust-val and foreign val
            tasks.stage.with_options(name=name)(root, name)
        parent = sweep.start_parent(Path(root), list(grid or []), combos,
                                    {**run_tags(Paths(Path(root)), summary["data source"]),
                                     "sweep.pool": pool or "none"})
        outcome = run_sweep(root, combos, parent, pool, deployment, install_anyway)
        summary |= sweep_rows(outcome, len(combos), pool, parent)
        if package_bento and outcome.gate.promoted:
            summary["bento"] = tasks.package(root).bento
        table = leaderboard_rows(outcome)
        create_table_artifact(table=table, key="sweep-candidates",
                              description="sweep candidates: score = mean of val, robust-val and foreign-val accuracy")
        create_markdown_artifact(markdown=tasks.summary_markdown(summary, "MNIST sweep"),
                                 key="sweep-summary", description="summary of the sweep")
        summary["leaderboard"] = table
    return summary


def train_candidates(root: str, combos: list[list[str]], parent: str, pool: str | None, deployment: str | None,
                     work: Path) -> tuple[list[Candidate], list[FailedCandidate]]:
    """Every combination trained: here, one after another (each in its own folder of `work`),
    or all at once on the pool's workers. Fails when none finished."""
    if not pool:
        return [candidate.with_options(name=f"candidate-{i}")(root, i, combo, parent, str(work / f"c{i}"))
                for i, combo in enumerate(combos)], []
    finished, failed = fan_out(Path(root), pool, deployment, combos, parent)
    if not finished:
        raise UserError("no sweep candidate finished: " + "; ".join(
            f"candidate-{f.index} ({' '.join(f.overrides)}): {f.message}" for f in failed))
    return finished, failed


def run_sweep(root: str, combos: list[list[str]], parent: str, pool: str | None, deployment: str | None,
              install_anyway: bool) -> SweepOutcome:
    """Train the candidates, install the best, evaluate and gate it, settle params.yaml; on any
    failure between install and gate the project is put back as it was. Ends the parent run."""
    from mnist_mlops.training import sweep

    paths = Paths(Path(root))
    paths.artifacts.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".sweep-", dir=paths.artifacts))
    winner, snap = None, None
    try:
        finished, failed = train_candidates(root, combos, parent, pool, deployment, work)
        winner = sweep.best(finished)
        if pool:
            winner = replace(winner, workdir=str(candidates.fetch_outputs(paths.root, winner.run_id, work / "winner")))
        snap = sweep.snapshot(paths.root, work / "before-install")
        changed = install_best(root, winner)
        evaluated = tasks.stage.with_options(name="evaluate")(root, "evaluate")
        gate = tasks.promote(root, load_params(paths.root).evaluate.min_accuracy)
        installed = settle(root, str(snap), gate.promoted, install_anyway, changed)
        snap = None
        sweep.finish_parent(paths.root, parent, winner, ok=True)
    except BaseException:
        if snap is not None:  # failed or stopped between install and gate: nothing installed
            sweep.restore(paths.root, snap)
        sweep.finish_parent(paths.root, parent, winner, ok=False)
        raise
    finally:
        sweep.cleanup(work)
    return SweepOutcome(finished, failed, winner, evaluated, gate, installed)


def sweep_rows(outcome: SweepOutcome, combinations: int, pool: str | None, parent: str) -> dict:
    """The sweep's summary rows: candidates, the winner, the gate's decision, params.yaml."""
    winner, failed, finished = outcome.winner, outcome.failed, outcome.finished
    return {
        "candidates": f"{len(finished)} of {combinations} finished" if failed else len(finished),
        **({"work pool": pool} if pool else {}),
        **({"failed candidates": "; ".join(f"candidate-{f.index}: {f.message}" for f in failed)} if failed else {}),
        "best": winner.label,
        "best val accuracy": f"{winner.val_accuracy:.4f}",
        "best robust val accuracy": f"{winner.robust_val_accuracy:.4f}",
        "best foreign val accuracy": f"{winner.foreign_val_accuracy:.4f}",
        "MLflow parent run id": parent,
        "evaluated": "yes" if outcome.evaluated else "no (DVC skipped: unchanged)",
        **tasks.gate_rows(outcome.gate),
        "params.yaml": outcome.installed,
    }


def leaderboard_rows(outcome: SweepOutcome) -> list[dict]:
    """One row per candidate (the winner marked `best`), then the failed ones with why."""
    table = [{"combination": c.label, "val_accuracy": round(c.val_accuracy, 4),
              "robust_val_accuracy": round(c.robust_val_accuracy, 4),
              "foreign_val_accuracy": round(c.foreign_val_accuracy, 4), "score": round(c.score, 4),
              "val_loss": round(c.val_loss, 4), "run_id": c.run_id, "best": c.run_id == outcome.winner.run_id,
              "failed": ""} for c in outcome.finished]
    return table + [{"combination": " ".join(f.overrides), "val_accuracy": None, "robust_val_accuracy": None,
                     "foreign_val_accuracy": None, "score": None, "val_loss": None, "run_id": "", "best": False,
                     "failed": f.message} for f in outcome.failed]
