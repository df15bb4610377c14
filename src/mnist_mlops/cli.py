"""`mnist-mlops`: the command line. Each command is thin; the work lives in the step modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mnist_mlops.errors import UserError
from mnist_mlops.platform.tracking import quiet_env

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, track, promote and serve a ConvNet on MNIST.")
console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[Optional[list[str]], typer.Option("--set", "-S", help="Override a parameter: section.key=value (repeatable).")]


def _root() -> Path:
    from mnist_mlops.config import project_root

    return project_root()


def print_summary(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    console.print(table)


@app.command()
def run(
    source: Annotated[Optional[str], typer.Option(help="sample | mnist | a path or URL to .npz/IDX.")] = None,
    set_: SetOption = None,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
) -> None:
    """Run the whole pipeline: fetch, version, prepare, train, evaluate, promote, package."""
    from mnist_mlops.config import Paths, load_params, tracking_uri, write_params
    from mnist_mlops.platform.locking import pipeline_lock

    root = _root()
    overrides = [*(set_ or []), *([f"data.source={source}"] if source else [])]
    load_params(root, overrides)  # fail on bad params before any work
    with pipeline_lock(Paths(root).lock):
        from mnist_mlops.platform import prefect_server

        server = prefect_server.start()  # boots in parallel with the imports below
        changed = write_params(root, overrides)
        if changed:
            err_console.print(f"params.yaml updated: {', '.join(changed)}")
        from pipelines.training import training_flow

        with prefect_server.api(server):
            summary = training_flow(root=str(root), package_bento=package)
    uri = tracking_uri(root)
    summary["MLflow UI"] = uri if uri.startswith("http") else f"mnist-mlops ui  (store: {uri})"
    print_summary("mnist-mlops run", summary)


@app.command()
def fetch(
    source: Annotated[Optional[str], typer.Option(help="sample | mnist | a path or URL to .npz/IDX.")] = None,
    set_: SetOption = None,
) -> None:
    """Fetch the data source into data/ (validated, written atomically) without training."""
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.training.data import fetch as fetch_data

    root = _root()
    params = load_params(root, [*(set_ or []), *([f"data.source={source}"] if source else [])])
    paths = Paths(root)
    result = fetch_data(params.data, paths.data, paths.cache)
    print_summary("mnist-mlops fetch", {"digits": result.count, "source": result.source,
                                         "data/": "updated" if result.changed else "unchanged"})


@app.command()
def verify() -> None:
    """Check that data/ is what data.dvc pins: a hand-edited or corrupt file is reported (exit 2)."""
    from mnist_mlops.config import Paths
    from mnist_mlops.training.data import dvc_md5
    from mnist_mlops.platform.versioning import data_drift

    paths = Paths(_root())
    pinned = dvc_md5(paths.data_dvc)
    if pinned is None:
        raise UserError(f"no pin in {paths.data_dvc}: run `mnist-mlops run` first")
    if not paths.data.is_dir():
        raise UserError(f"no {paths.data}: run `mnist-mlops fetch` or `dvc checkout data.dvc`")
    drift = data_drift(paths.root, paths.data, paths.data_dvc)
    if drift:
        raise UserError(f"{drift}: restore it with `mnist-mlops fetch` or `dvc checkout --force data.dvc`")
    print_summary("mnist-mlops verify", {"data/": "matches data.dvc", "md5": pinned})


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Registered version of mnist-convnet.")],
    force: Annotated[bool, typer.Option(help="Promote even below evaluate.min_accuracy.")] = False,
) -> None:
    """Make VERSION the champion by hand (refuses one below the accuracy floor unless --force)."""
    from mnist_mlops import registry
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.platform.tracking import setup_mlflow

    root = _root()
    params = load_params(root)
    setup_mlflow(root)
    x, y = registry.test_data(Paths(root).prepared)
    d = registry.promote(version, x, y, params.evaluate.min_accuracy, force=force)
    print_summary("mnist-mlops promote", {"champion": f"v{d.version}", "previous": d.previous_champion or "none",
                                           "test accuracy": f"{d.accuracy:.4f}" if d.accuracy is not None else "n/a",
                                           "why": d.reason})


@app.command()
def rollback() -> None:
    """Move the champion back to the version it replaced."""
    from mnist_mlops import registry
    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(_root())
    d = registry.rollback()
    print_summary("mnist-mlops rollback", {"champion": f"v{d.version}", "was": f"v{d.previous_champion}"})


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI for the project's store (Ctrl-C stops it)."""
    from mnist_mlops.config import tracking_uri

    root = _root()
    uri = tracking_uri(root)
    if uri.startswith("http"):
        raise UserError(f"MLFLOW_TRACKING_URI is a server ({uri}): open it in a browser instead")
    console.print(f"MLflow UI on http://{host}:{port}  (store: {uri})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    try:
        raise typer.Exit(subprocess.call(cmd, cwd=root))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def package(
    force: Annotated[bool, typer.Option(help="Rebuild even if the champion's Bento exists.")] = False,
) -> None:
    """Import the champion into the BentoML store and build its Bento (bentofile.yaml)."""
    from mnist_mlops.serving.package import package_champion

    result = package_champion(_root(), force=force)
    print_summary("mnist-mlops package", {"bento": result["bento"], "model": result["model"],
                                           "champion": f"v{result['model_version']}", "MLflow run id": result["run_id"],
                                           "built": "yes" if result["built"] else "no (up to date)"})


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port of the prediction service.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
) -> None:
    """Serve the champion's Bento over HTTP (built first if missing; Ctrl-C stops it)."""
    from mnist_mlops.serving.package import champion_bento, package_champion

    root = _root()
    try:
        tag = champion_bento(root)
    except UserError as exc:
        if not str(exc).startswith("no Bento"):
            raise
        err_console.print(f"{exc}; building it now")
        tag = package_champion(root)["bento"]
    console.print(f"serving {tag} on http://{host}:{port}  (docs: /, digits: POST /predict, /predict_image)")
    cmd = [sys.executable, "-m", "bentoml", "serve", tag, "--host", host, "--port", str(port)]
    try:
        raise typer.Exit(subprocess.call(cmd, cwd=root))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="PNG or JPEG digits.", exists=False)],
    url: Annotated[str, typer.Option(help="The running service.")] = "http://127.0.0.1:3000",
) -> None:
    """Send images to a running service (`mnist-mlops serve`) and print what it sees."""
    import httpx

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    headers = {"X-API-Key": key} if (key := os.environ.get("MNIST_MLOPS_API_KEY")) else {}
    table = Table(title=f"mnist-mlops predict ({url})", title_justify="left")
    for column in ("file", "digit", "confidence", "model version", "error"):
        table.add_column(column)
    failed = 0
    with httpx.Client(base_url=url, timeout=60, headers=headers) as client:
        for path in files:
            try:
                resp = client.post("/predict_image", files={"image": (path.name, path.read_bytes())})
            except httpx.HTTPError as exc:
                raise UserError(f"no prediction service at {url} ({type(exc).__name__}): "
                                "start one with `mnist-mlops serve`") from None
            body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {}
            if resp.status_code == 200:
                table.add_row(path.name, str(body["digit"]), f"{body['confidence']:.3f}", str(body["model_version"]), "")
            else:
                failed += 1
                detail = body.get("detail") if isinstance(body, dict) else None
                reason = (detail[0].get("msg") if isinstance(detail, list) and detail and isinstance(detail[0], dict)
                          else body.get("error") if isinstance(body, dict) else None) or resp.text[:200]
                table.add_row(path.name, "", "", "", f"{resp.status_code}: {reason}")
    console.print(table)
    if failed:
        raise typer.Exit(1)


@app.command()
def schedule(
    cron: Annotated[Optional[str], typer.Option(help='Cron schedule, e.g. "0 3 * * *" (03:00 daily).')] = None,
    interval: Annotated[Optional[float], typer.Option(help="Run every SECONDS instead of a cron schedule.")] = None,
    timezone: Annotated[Optional[str], typer.Option(help="Time zone of the cron schedule (default UTC).")] = None,
    name: Annotated[str, typer.Option(help="Deployment name: mnist-training/NAME.")] = "scheduled",
    port: Annotated[int, typer.Option(help="Port of the local Prefect server (when PREFECT_API_URL is unset).")] = 4200,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
    lock_wait: Annotated[float, typer.Option(help="Seconds a scheduled run waits for another run to finish.")] = 600,
) -> None:
    """Run the training flow on a schedule on a Prefect server until Ctrl-C.

    Uses the server at PREFECT_API_URL, else starts `prefect server start` on 127.0.0.1.
    """
    import signal

    from mnist_mlops.config import load_params
    from mnist_mlops.platform.scheduling import prefect_api

    if (cron is None) == (interval is None):
        raise UserError("give exactly one of --cron or --interval")
    if interval is not None and interval <= 0:
        raise UserError(f"--interval must be a positive number of seconds (got {interval:g})")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron, timezone=timezone)
        except ValueError as exc:
            msg = exc.errors()[0]["msg"] if hasattr(exc, "errors") else str(exc)
            raise UserError(f"--cron/--timezone: {msg.removeprefix('Value error, ')}") from None
    root = _root()
    load_params(root)  # fail on bad params now, not at 03:00

    def stop(signum, frame):  # SIGTERM (systemd, kill) takes the same clean path as Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        with prefect_api(port) as (api_url, server):
            os.environ["PREFECT_API_URL"] = api_url
            from prefect.settings import PREFECT_API_URL, temporary_settings

            from pipelines.schedule import serve_training

            ui_url = api_url.removesuffix("/api")
            when = f"cron '{cron}' ({timezone or 'UTC'})" if cron else f"every {interval:g}s"
            rows = {"deployment": f"mnist-training/{name}", "schedule": when, "project": str(root),
                    "Prefect server": f"{ui_url} ({'started here, log ' + str(server.log) if server else 'PREFECT_API_URL'})",
                    "manual runs on this server": f"export PREFECT_API_URL={api_url}",
                    "stop": "Ctrl-C (pauses the schedule)"}
            print_summary("mnist-mlops schedule", rows)
            with temporary_settings(updates={PREFECT_API_URL: api_url}):
                serve_training(str(root), cron=cron, interval=interval, timezone=timezone, name=name,
                               package_bento=package, lock_wait_seconds=lock_wait)
    except KeyboardInterrupt:
        pass
    err_console.print("schedule stopped (paused on the server); a local Prefect server started here is shut down")


@app.command()
def sweep(
    grid: Annotated[list[str], typer.Option("--grid", "-g", help="section.key=v1,v2 (repeatable): every combination is trained.")],
    set_: SetOption = None,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
) -> None:
    """Train every grid combination as child runs of one MLflow run; evaluate and gate only the best."""
    from mnist_mlops.config import Paths, load_params, write_params
    from mnist_mlops.platform.locking import pipeline_lock
    from mnist_mlops.training.sweep import combinations

    root = _root()
    load_params(root, set_)
    combos = combinations(root, grid, base=set_)
    err_console.print(f"sweep: {len(combos)} combinations")
    with pipeline_lock(Paths(root).lock):
        from mnist_mlops.platform import prefect_server

        server = prefect_server.start()  # boots in parallel with the imports below
        changed = write_params(root, set_)
        if changed:
            err_console.print(f"params.yaml updated: {', '.join(changed)}")
        from pipelines.sweep import sweep_flow

        with prefect_server.api(server):
            summary = sweep_flow(root=str(root), grid=list(grid), package_bento=package)
    board = Table(title="sweep candidates (chosen by val accuracy)", title_justify="left")
    for column in ("combination", "val accuracy", "val loss", "MLflow run", "best"):
        board.add_column(column)
    for row in summary.pop("leaderboard"):
        board.add_row(row["combination"], f"{row['val_accuracy']:.4f}", f"{row['val_loss']:.4f}",
                      row["run_id"], "*" if row["best"] else "")
    console.print(board)
    print_summary("mnist-mlops sweep", summary)


def main() -> None:
    """Console entry: user errors become one red line and exit code 2, never a traceback."""
    quiet_env()
    try:
        app()
    except UserError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
