"""The training flow on a schedule, and the monitor beside it: deployments served from this process.

`mnist-mlops schedule` calls `run_schedule`: it finds or starts a real Prefect server (the
flow's scheduler lives there) and serves the deployment until Ctrl-C or SIGTERM. The runner
executes at most one run at a time; each run also takes the project's pipeline lock, so a
scheduled run and a manual `mnist-mlops run` never overlap (the scheduled one waits up to
`lock_wait_seconds`). For workers on other machines, `prefect.yaml` describes the same
deployment for a work pool.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from mnist_mlops.errors import UserError

DEFAULT_NAME = "scheduled"


def deployment_parameters(root: str, package_bento: bool, lock_wait_seconds: float) -> dict:
    return {"root": root, "package_bento": package_bento, "lock_wait_seconds": lock_wait_seconds,
            "trigger": "schedule"}


def describe_schedule(cron: str | None, interval: float | None, timezone: str | None) -> str:
    """Validate the schedule options (one line on error) and say when runs happen."""
    if (cron is None) == (interval is None):
        raise UserError("give exactly one of --cron or --interval")
    if interval is not None:
        if interval <= 0:
            raise UserError(f"--interval must be a positive number of seconds (got {interval:g})")
        return f"every {interval:g}s"
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
        raise UserError(f"--cron/--timezone: {msg.removeprefix('Value error, ')}") from None
    return f"cron '{cron}' ({timezone or 'UTC'})"


def serve_training(root: str, *, cron: str | None = None, interval: float | None = None,
                   timezone: str | None = None, name: str = DEFAULT_NAME, package_bento: bool = True,
                   lock_wait_seconds: float = 600.0, monitor_every: float | None = None) -> None:
    """Create/update the deployment `mnist-training/NAME` with its schedule (and, every
    `monitor_every` seconds, `mnist-monitor/NAME`, which runs the training deployment when it
    finds a reason) and serve them until interrupted; the schedules are paused on the way out."""
    from prefect import serve
    from prefect.schedules import Cron, Interval

    from pipelines.monitoring import monitor_flow
    from pipelines.training import training_flow

    schedule = Cron(cron, timezone=timezone) if cron else Interval(interval, timezone=timezone)
    deployments = [training_flow.to_deployment(
        name=name, schedules=[schedule], parameters=deployment_parameters(root, package_bento, lock_wait_seconds),
        tags=["mnist-mlops", "scheduled"])]
    if monitor_every:
        deployments.append(monitor_flow.to_deployment(
            name=name, interval=monitor_every, tags=["mnist-mlops", "monitor"],
            parameters={"root": root, "training_deployment": f"{training_flow.name}/{name}"}))
    # Serving, Ctrl-C takes Python's own path again: asyncio.run then cancels the runner's task
    # (instead of an interrupt raised at any point of the loop), and the runner pauses the
    # schedules on its way out. Until here, `handle_stop_signals` stops the command at once.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    serve(*deployments,
          limit=1,  # one run at a time from this runner; late runs start when it is free
          pause_on_shutdown=True, print_starting_message=False)


def run_schedule(root: str, *, port: int, on_ready: Callable[[str, bool, str | None], None],
                 **schedule) -> None:
    """Serve the schedule on $PREFECT_API_URL or on a local server started on PORT.

    `on_ready(api_url, started_here, server_log)` is called once the server answers.
    SIGTERM (systemd, kill, timeout) takes the same clean path as Ctrl-C: the schedule is
    paused and a server started here is stopped.
    """
    from mnist_mlops.platform.prefect_server import prefect_api
    from mnist_mlops.platform.processes import handle_stop_signals, stop_requested

    handle_stop_signals()  # Ctrl-C at any moment: importing, deploying, starting the runner, serving
    try:
        with prefect_api(port) as (api_url, server):
            os.environ["PREFECT_API_URL"] = api_url
            from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

            on_ready(api_url, server is not None, str(server.log) if server else None)
            ui = api_url.removesuffix("/api")
            with temporary_settings(updates={PREFECT_API_URL: api_url, PREFECT_UI_URL: ui}):
                serve_training(root, **schedule)
    except KeyboardInterrupt:
        pass
    except Exception:
        if not stop_requested():  # an error of its own; else the interrupt, wrapped by a library
            raise
