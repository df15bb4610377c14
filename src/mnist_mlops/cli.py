"""`mnist-mlops`: the command line. Each command is thin; the work lives in the step modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mnist_mlops.errors import UserError
from mnist_mlops.platform.processes import run_in_foreground
from mnist_mlops.platform.tracking import quiet_env

# Plain help (rich_markup_mode=None): typer's rich panels print a type after every flag (`--verbose <bool>`).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train, track, promote and serve a ConvNet on MNIST.")
console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[list[str] | None,
                      typer.Option("--set", "-S", help="Override a parameter: section.key=value (repeatable).")]


def _root() -> Path:
    from mnist_mlops.config import project_root

    return project_root()


@app.callback()
def options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Show the libraries' own logs (TensorFlow, MLflow).")] = False,
) -> None:
    """Train, track, promote and serve a ConvNet on MNIST."""
    from mnist_mlops.platform.console import filter_native_stderr

    if verbose:
        os.environ.update(MNIST_MLOPS_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="0",
                          MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="true")
    else:
        filter_native_stderr()


def print_summary(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # URLs and ids whole, never cut with an ellipsis
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    console.print(table)


def with_ui_rows(root: Path, summary: dict) -> dict:
    """Where to look at the run afterwards: the Prefect UI of its flow run, the MLflow UI."""
    from mnist_mlops.config import tracking_uri
    from mnist_mlops.platform.prefect_server import DEFAULT_UI_PORT
    from mnist_mlops.platform.tracking import project_runs_url

    rows = dict(summary)
    run_id = rows.pop("Prefect flow run id", None)
    api = os.environ.get("PREFECT_API_URL")
    ui = api.rstrip("/").removesuffix("/api") if api else f"http://127.0.0.1:{DEFAULT_UI_PORT}"
    if run_id:
        rows["Prefect UI"] = f"{ui}/runs/flow-run/{run_id}" + ("" if api else "  (after `mnist-mlops prefect-ui`)")
    uri = tracking_uri(root)
    runs = project_runs_url(root, None if uri.startswith("http") else "http://127.0.0.1:5000")
    rows["MLflow UI"] = runs if uri.startswith("http") else f"{runs}  (after `mnist-mlops ui`)"
    return rows


@app.command()
def run(
    source: Annotated[str | None, typer.Option(help="sample | mnist | a path or URL to .npz/IDX.")] = None,
    set_: SetOption = None,
    package: Annotated[bool, typer.Option(help="Build a Bento when the champion changes.")] = True,
) -> None:
    """Run the whole pipeline: fetch, version, prepare, train, evaluate, promote, package."""
    root = _root()
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


@app.command()
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

    root = _root()
    hours = parse_duration(since, "--since") / 3600 if since else None
    load_params(root)  # fail on bad params before any work
    from mnist_mlops.platform import prefect_server

    server = prefect_server.start()
    from pipelines.monitoring import monitor_flow

    with prefect_server.api(server):
        summary = monitor_flow(root=str(root), since_hours=hours, retrain=retrain,
                               log_dir=str(log_dir.resolve()) if log_dir else None)
    print_summary("mnist-mlops monitor", summary)


@app.command()
def fetch(
    source: Annotated[str | None, typer.Option(help="sample | mnist | a path or URL to .npz/IDX.")] = None,
    set_: SetOption = None,
) -> None:
    """Fetch the data source into data/ (validated, written atomically) without training."""
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.feedback import held_back
    from mnist_mlops.training.fetch import fetch as fetch_data

    root = _root()
    params = load_params(root, [*(set_ or []), *([f"data.source={source}"] if source else [])])
    paths = Paths(root)
    result = fetch_data(params, paths)
    print_summary("mnist-mlops fetch", {"digits": result.count, "source": result.source,
                                         "labelled by people": result.feedback,
                                         **({"kept for later": result.kept} if result.kept else {}),
                                         **({"labels held back": held} if (held := held_back(result.screened))
                                            else {}),
                                         "data/": "updated" if result.changed else "unchanged"})


@app.command()
def verify() -> None:
    """Check that data/ is what data.dvc pins: a hand-edited or corrupt file is reported (exit 2)."""
    from mnist_mlops.config import Paths
    from mnist_mlops.platform.versioning import data_drift, dvc_md5

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
    from mnist_mlops.training.prepare import test_split

    root = _root()
    params = load_params(root)
    setup_mlflow(root)
    x = y = None
    try:
        test = test_split(Paths(root), params)
        x, y = test.x, test.y
    except UserError as exc:  # no data/ (a fresh clone), or unreadable: the floor cannot be checked
        if not force:
            raise UserError(f"cannot check version {version} against the floor evaluate.min_accuracy="
                            f"{params.evaluate.min_accuracy}: {exc}; or use --force to promote unchecked") from None
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
    open_: Annotated[bool, typer.Option("--open", help="Open the runs table in a browser.")] = False,
) -> None:
    """Start the MLflow UI for the project's store and print the URL of its runs table (Ctrl-C stops it)."""
    from mnist_mlops.config import tracking_uri
    from mnist_mlops.platform.tracking import project_runs_url

    root = _root()
    if not os.environ.get("MNIST_MLOPS_VERBOSE"):  # MLflow's INFO notices, here and in the UI's process
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    uri = tracking_uri(root)
    if uri.startswith("http"):  # a tracking server serves its own UI
        url = project_runs_url(root)
        console.print(f"MLflow UI (tracking server): {url}")
        if open_:
            open_when_up(url)
        return
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = project_runs_url(root, f"http://{shown}:{port}")
    console.print(f"MLflow UI: {url}\n  (store: {uri}; Ctrl-C stops it)", soft_wrap=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--registry-store-uri", uri,
           "--host", host, "--port", str(port), "--uvicorn-opts", "--log-level warning",
           "--workers", "1"]  # its default, 4, means four MLflow servers to import
    if open_:
        open_when_up(url)
    raise typer.Exit(run_in_foreground(cmd, cwd=root, env=mlflow_ui_env()))


def mlflow_ui_env() -> dict[str, str]:
    """The UI the project needs, quietly: no GenAI job runner (huey consumers polling on every
    core), and not the deprecation warning MLflow's own import of Starlette's WSGI bridge prints."""
    warnings = [w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:starlette.middleware.wsgi is deprecated") if w]
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONWARNINGS": ",".join(warnings)}


def open_when_up(url: str) -> None:
    """Open `url` in the user's browser once it answers (in the background)."""
    import threading
    import webbrowser

    from mnist_mlops.platform.processes import wait_http

    def opener() -> None:
        try:
            wait_http(url.split("#")[0], timeout=120)
        except UserError:
            return
        webbrowser.open(url)

    threading.Thread(target=opener, daemon=True).start()


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
    pin: Annotated[str | None, typer.Option(help="Serve this registered version only (no following).")] = None,
) -> None:
    """Serve the champion over HTTP and follow it: a new champion is swapped in without a restart.

    Ctrl-C stops it. `--pin VERSION` serves one version and watches nothing.
    """
    import tempfile

    from mnist_mlops.serving.package import serve_command

    root = _root()
    # this serve's own /metrics files: a second serve beside it never mixes in or wipes them
    with tempfile.TemporaryDirectory(prefix="mnist-mlops-serve-metrics-") as metrics_dir:
        cmd, env, tag = serve_command(root, host, port, pin, Path(metrics_dir),
                                      on_build=lambda msg: err_console.print(msg))
        mode = f"pinned to v{pin}" if pin else "following the champion"
        console.print(f"serving {tag} on http://{host}:{port}, {mode}  (docs: /, digits: POST /predict, "
                      "/predict_image)")
        code = run_in_foreground(cmd, cwd=root, env=env)
    raise typer.Exit(code)


@app.command()
def predict(
    files: Annotated[list[Path], typer.Argument(help="PNG or JPEG digits.", exists=False)],
    url: Annotated[str, typer.Option(help="The running service.")] = "http://127.0.0.1:3000",
) -> None:
    """Send images to a running service (`mnist-mlops serve`) and print what it sees."""
    from mnist_mlops.serving.client import predict_files

    table = Table(title=f"mnist-mlops predict ({url})", title_justify="left")
    for column in ("file", "digit", "confidence", "model version", "error"):
        table.add_column(column)
    answers = list(predict_files(url, files))
    for a in answers:
        table.add_row(a.file, "" if a.digit is None else "none (blank image)" if a.blank else str(a.digit),
                      "" if a.confidence is None else f"{a.confidence:.3f}", a.model_version or "", a.error or "")
    console.print(table)
    if any(a.error for a in answers):
        raise typer.Exit(1)


feedback_app = typer.Typer(help="Labelled digits from people: counts, import, export.", no_args_is_help=False,
                           rich_markup_mode=None)
app.add_typer(feedback_app, name="feedback")


@feedback_app.callback(invoke_without_command=True)
def feedback_counts(ctx: typer.Context) -> None:
    """Print the labelled digits: total, new since the current data version, per label, disagreement."""
    if ctx.invoked_subcommand is not None:
        return
    from mnist_mlops import feedback
    from mnist_mlops.config import Paths
    from mnist_mlops.training.data import feedback_meta

    paths = Paths(_root())
    meta = feedback_meta(paths.data)
    c = feedback.counts(paths.feedback, meta["newest"] if meta else None)
    share = "n/a" if c["disagreed_share"] is None else \
        f"{c['disagreed_share']:.1%} ({c['disagreed']} of {c['from_predictions']} labelled predictions)"
    print_summary("mnist-mlops feedback", {
        "labelled digits": c["total"],
        "new since the current data version": f"{c['new']} (data/ has {meta['count'] if meta else 0})",
        "per label": "  ".join(f"{d}:{n}" for d, n in c["per_label"].items()),
        "label disagreed with the prediction": share,
        "newest": c["newest"] or "none",
        "store": str(paths.feedback),
    })


@feedback_app.command("import")
def feedback_import(
    folder: Annotated[Path, typer.Argument(help="A folder with 0/ … 9/ subfolders of PNG/JPEG digits.")],
) -> None:
    """Store labelled images (DIR/<digit>/*.png|jpg), converted like the service converts uploads."""
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.serving.labelled import import_folder

    root = _root()
    serve = load_params(root).serve
    result = import_folder(folder, Paths(root).feedback, serve.max_image_pixels, serve.max_image_bytes)
    if result.skipped:
        table = Table(title=f"skipped {len(result.skipped)} files", title_justify="left")
        table.add_column("file")
        table.add_column("why")
        for name, why in result.skipped:
            table.add_row(name, why)
        err_console.print(table)
    print_summary("mnist-mlops feedback import", {
        "stored": result.stored, "skipped": len(result.skipped),
        "per label": "  ".join(f"{d}:{n}" for d, n in result.per_label.items()),
    })


@feedback_app.command("export")
def feedback_export(
    path: Annotated[Path, typer.Argument(help="Where to write the .npz (x: uint8 N×28×28, y: labels).")],
) -> None:
    """Write every labelled digit (newest label of each) to an .npz."""
    from mnist_mlops import feedback
    from mnist_mlops.config import Paths

    if path.suffix != ".npz":
        raise UserError(f"{path}: the export is an .npz file; name it FILE.npz")
    n = feedback.export(Paths(_root()).feedback, path)
    print_summary("mnist-mlops feedback export", {"digits": n, "file": str(path)})


@app.command()
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

    root = _root()
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


@app.command("prefect-ui")
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


@app.command()
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

    root = _root()
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


def main() -> None:
    """Console entry: user errors become one red line and exit code 2, never a traceback.

    SIGTERM (kill, timeout, systemd) takes Ctrl-C's path (flow run marked, lock released), and
    either, at any moment, stops the command: never a traceback, even when a library wrapped
    the interrupt in an error of its own."""
    from mnist_mlops.platform.processes import handle_stop_signals, stop_requested

    quiet_env()
    handle_stop_signals()
    try:
        app()
    except UserError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception:
        if not stop_requested():
            raise
        err_console.print("stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
