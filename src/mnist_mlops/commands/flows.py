"""The commands that run a flow: run, sweep, monitor, schedule, and the Prefect UI.

`run` and `sweep` start their flow through `run_flow`: params checked, lock checked, a Prefect
server, the flow (which takes the pipeline lock itself and writes the `--set` overrides)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnist_mlops.commands.common import SetOption, console, err_console, print_summary, project_dir, with_ui_rows
from mnist_mlops.errors import UserError


def run(
    source: Annotated[str | None, typer.Option(help="sample | mnist | a path or URL to .npz/IDX.")] = None,
    set_: SetOption = None,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
) -> None:
    """Run the whole pipeline: fetch, version, prepare, train, evaluate, promote, package."""
    root = project_dir()
    overrides = [*(set_ or []), *([f"data.source={source}"] if source else [])]
    summary = run_flow(root, overrides, "pipelines.training:training_flow", package_bento=package)
    print_summary("mnist-mlops run", with_ui_rows(root, summary))


def run_flow(root: Path, overrides: list[str], flow: str, **parameters) -> dict:
    """Params checked, the pipeline lock checked, a Prefect server started (or PREFECT_API_URL's),
    then `flow` (`module:function`) run on it. The flow itself takes the lock and writes the
    overrides to params.yaml; checking the lock here first fails a second run before a server starts."""
    import importlib

    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.platform import prefect_server
    from mnist_mlops.platform.locking import ensure_free

    load_params(root, overrides)  # fail on bad params before any work
    ensure_free(Paths(root).lock)
    server = prefect_server.start()  # boots in parallel with the flow's imports below
    module, name = flow.split(":")
    run = getattr(importlib.import_module(module), name)
    with prefect_server.api(server):
        return run(root=str(root), overrides=overrides, **parameters)


def sweep(
    grid: Annotated[list[str], typer.Option("--grid", "-g",
                                            help="section.key=v1,v2 (repeatable): every combination is trained.")],
    set_: SetOption = None,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
    pool: Annotated[str | None, typer.Option(
        help="Train the candidates at once, as flow runs on this Prefect work pool (its workers, on any "
             "machines); needs PREFECT_API_URL.")] = None,
    install_anyway: Annotated[bool, typer.Option(
        "--install-anyway", help="Keep the winner's params in params.yaml even when its model does not pass "
                                 "the gate (by default they are installed only when it passes).")] = False,
) -> None:
    """Train every grid combination as child runs of one MLflow run; evaluate and gate only the best."""
    from mnist_mlops.config import load_params
    from mnist_mlops.training.sweep import combinations

    root = project_dir()
    load_params(root, set_)
    combos = combinations(root, grid, base=set_)
    if pool is not None and not os.environ.get("PREFECT_API_URL"):
        raise UserError("--pool needs the Prefect server the pool's workers poll: "
                        "export PREFECT_API_URL=http://HOST:4200/api")
    err_console.print(f"sweep: {len(combos)} combinations" + (f" on work pool {pool}" if pool else ""))
    summary = run_flow(root, list(set_ or []), "pipelines.sweep:sweep_flow", grid=list(grid), package_bento=package,
                       pool=pool, install_anyway=install_anyway)
    console.print(leaderboard(summary.pop("leaderboard")))
    print_summary("mnist-mlops sweep", with_ui_rows(root, summary))


def leaderboard(rows: list[dict]) -> Table:
    """The sweep's candidates, the winner starred; failed candidates say why."""
    board = Table(title="sweep candidates (chosen by score: the mean of val, robust-val and foreign-val accuracy)",
                  title_justify="left")
    for column in ("combination", "val accuracy", "robust val accuracy", "foreign val accuracy", "score", "val loss",
                   "MLflow run", "best"):
        board.add_column(column)
    for row in rows:
        if row.get("failed"):
            board.add_row(row["combination"], "failed", "", "", "", "", row["failed"], "")
            continue
        board.add_row(row["combination"], f"{row['val_accuracy']:.4f}", f"{row['robust_val_accuracy']:.4f}",
                      f"{row['foreign_val_accuracy']:.4f}", f"{row['score']:.4f}", f"{row['val_loss']:.4f}",
                      row["run_id"], "*" if row["best"] else "")
    return board


def monitor(
    since: Annotated[str | None, typer.Option(
        help="How much of the prediction log to check, e.g. 30m, 24h, 7d (default: monitor.window_hours).")] = None,
    retrain: Annotated[bool | None, typer.Option(
        "--retrain/--no-retrain",
        help="Start the training flow when there is a reason (default: monitor.retrain).")] = None,
    log_dir: Annotated[Path | None, typer.Option(
        help="The prediction log (default: $MNIST_MLOPS_PREDICTION_LOG, else logs/predictions).")] = None,
) -> None:
    """Check the served traffic: drift against the champion's reference, live accuracy from the
    labels, new labels; write reports/monitoring/, log to MLflow, retrain when there is a reason."""
    from mnist_mlops.config import load_params, parse_duration

    root = project_dir()
    hours = parse_duration(since, "--since") / 3600 if since else None
    load_params(root)  # fail on bad params before any work
    from mnist_mlops.platform import prefect_server

    server = prefect_server.start()
    from pipelines.monitoring import monitor_flow

    with prefect_server.api(server):
        summary = monitor_flow(root=str(root), since_hours=hours, retrain=retrain,
                               log_dir=str(log_dir.resolve()) if log_dir else None)
    print_summary("mnist-mlops monitor", summary)


def schedule(
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 3 * * *" (03:00 daily).')] = None,
    interval: Annotated[float | None, typer.Option(help="Run every SECONDS instead of a cron schedule.")] = None,
    timezone: Annotated[str | None, typer.Option(help="Time zone of the cron schedule (default UTC).")] = None,
    name: Annotated[str, typer.Option(help="Deployment name: mnist-training/NAME.")] = "scheduled",
    port: Annotated[int, typer.Option(help="Port of the local Prefect server (when PREFECT_API_URL is unset).")] = 4200,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
    lock_wait: Annotated[float, typer.Option(help="Seconds a scheduled run waits for another run to finish.")] = 600,
    monitor_every: Annotated[str, typer.Option(
        help="Also run the monitor flow this often (30m, 1h, ...; 'off': not at all); it starts "
             "the training deployment when it finds a reason.")] = "1h",
) -> None:
    """Run the training flow on a schedule, and the monitor flow, on a Prefect server until Ctrl-C.

    Uses the server at PREFECT_API_URL, else starts `prefect server start` on 127.0.0.1.
    """
    from mnist_mlops.config import load_params, parse_duration

    root = project_dir()
    from pipelines.schedule import describe_schedule, run_schedule

    when = describe_schedule(cron, interval, timezone)
    every = None if monitor_every.strip().lower() == "off" else parse_duration(monitor_every, "--monitor-every")
    load_params(root)  # fail on bad params now, not at 03:00

    def ready(api_url: str, started_here: bool, log: str | None) -> None:
        ui_url = api_url.removesuffix("/api")
        print_summary("mnist-mlops schedule", {
            "deployment": f"mnist-training/{name}", "schedule": when,
            "monitor": f"mnist-monitor/{name} every {every:g}s" if every else "off", "project": str(root),
            "Prefect server": f"{ui_url} ({'started here, log ' + str(log) if started_here else 'PREFECT_API_URL'})",
            "Prefect UI": f"{ui_url}/deployments",
            "manual runs on this server": f"export PREFECT_API_URL={api_url}",
            "stop": "Ctrl-C (pauses the schedule)"})

    run_schedule(str(root), port=port, on_ready=ready, cron=cron, interval=interval, timezone=timezone,
                 name=name, package_bento=package, lock_wait_seconds=lock_wait, monitor_every=every)
    err_console.print("schedule stopped (paused on the server); a local Prefect server started here is shut down")


def prefect_ui(
    port: Annotated[int, typer.Option(help="Port of the Prefect UI.")] = 4200,
) -> None:
    """Open the Prefect UI on the project's Prefect database: every run, manual or scheduled."""
    import time

    from mnist_mlops.platform.prefect_server import prefect_api

    if os.environ.get("PREFECT_API_URL"):
        raise UserError(f"PREFECT_API_URL names a server ({os.environ['PREFECT_API_URL']}): open its UI instead")
    try:
        with prefect_api(port) as (api_url, server):
            ui = api_url.removesuffix("/api")
            print_summary("mnist-mlops prefect-ui", {"Prefect UI": f"{ui}/runs", "database": str(server.log.parent),
                                                    "stop": "Ctrl-C"})
            while server.alive():
                time.sleep(1)
            raise UserError(f"the Prefect server stopped: see {server.log}")
    except KeyboardInterrupt:
        pass
