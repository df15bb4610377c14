"""The training flow on a schedule: a deployment served from this process.

`mnist-mlops schedule` calls `serve_training` with PREFECT_API_URL pointing at a real
Prefect server (the flow's scheduler lives there). The runner executes at most one run at
a time; each run also takes the project's pipeline lock, so a scheduled run and a manual
`mnist-mlops run` never overlap (the scheduled one waits up to `lock_wait_seconds`).
For workers on other machines, `prefect.yaml` describes the same deployment for a work pool.
"""

from __future__ import annotations

DEFAULT_NAME = "scheduled"


def deployment_parameters(root: str, package_bento: bool, lock_wait_seconds: float) -> dict:
    return {"root": root, "package_bento": package_bento, "lock_wait_seconds": lock_wait_seconds}


def serve_training(root: str, *, cron: str | None = None, interval: float | None = None,
                   timezone: str | None = None, name: str = DEFAULT_NAME, package_bento: bool = True,
                   lock_wait_seconds: float = 600.0) -> None:
    """Create/update the deployment `mnist-training/NAME` with its schedule and serve it until
    interrupted (Ctrl-C or SIGTERM); the schedule is paused on the way out."""
    from prefect.schedules import Cron, Interval

    from pipelines.training import training_flow

    if (cron is None) == (interval is None):
        raise ValueError("give exactly one of cron or interval")
    schedule = Cron(cron, timezone=timezone) if cron else Interval(interval, timezone=timezone)
    training_flow.serve(
        name=name,
        schedules=[schedule],
        parameters=deployment_parameters(root, package_bento, lock_wait_seconds),
        tags=["mnist-mlops", "scheduled"],
        limit=1,  # one run at a time from this runner; late runs start when it is free
        pause_on_shutdown=True,
        print_starting_message=False,
    )
