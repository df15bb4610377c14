"""The commands on data, models and the service: fetch, verify, promote, rollback, the MLflow UI,
package, serve, predict, trace."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnist_mlops.commands.common import SetOption, console, err_console, print_summary, project_dir
from mnist_mlops.errors import UserError
from mnist_mlops.platform.processes import run_in_foreground


def fetch(
    source: Annotated[str | None, typer.Option(help="sample | mnist | a path or URL to .npz/IDX.")] = None,
    set_: SetOption = None,
) -> None:
    """Fetch the data source into data/ (validated, written atomically) without training."""
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.records.feedback import held_back
    from mnist_mlops.training.fetch import fetch as fetch_data

    root = project_dir()
    params = load_params(root, [*(set_ or []), *([f"data.source={source}"] if source else [])])
    paths = Paths(root)
    result = fetch_data(params, paths)
    print_summary("mnist-mlops fetch", {"digits": result.count, "source": result.source,
                                         "labelled by people": result.feedback,
                                         **({"kept for later": result.kept} if result.kept else {}),
                                         **({"labels held back": held} if (held := held_back(result.screened))
                                            else {}),
                                         "data/": "updated" if result.changed else "unchanged"})


def verify() -> None:
    """Check that data/ is what data.dvc pins: a hand-edited or corrupt file is reported (exit 2)."""
    from mnist_mlops.config import Paths
    from mnist_mlops.platform.versioning import data_drift, dvc_md5

    paths = Paths(project_dir())
    pinned = dvc_md5(paths.data_dvc)
    if pinned is None:
        raise UserError(f"no pin in {paths.data_dvc}: run `mnist-mlops run` first")
    if not paths.data.is_dir():
        raise UserError(f"no {paths.data}: run `mnist-mlops fetch` or `dvc checkout data.dvc`")
    drift = data_drift(paths.root, paths.data, paths.data_dvc)
    if drift:
        raise UserError(f"{drift}: restore it with `mnist-mlops fetch` or `dvc checkout --force data.dvc`")
    print_summary("mnist-mlops verify", {"data/": "matches data.dvc", "md5": pinned})


def promote(
    version: Annotated[str, typer.Argument(help="Registered version of mnist-convnet.")],
    force: Annotated[bool, typer.Option(help="Promote even below evaluate.min_accuracy.")] = False,
) -> None:
    """Make VERSION the champion by hand (refuses one below the accuracy floor unless --force)."""
    from mnist_mlops import registry
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.platform.tracking import setup_mlflow
    from mnist_mlops.training.prepare import test_split

    root = project_dir()
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


def rollback() -> None:
    """Move the champion back to the version it replaced."""
    from mnist_mlops import registry
    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(project_dir())
    d = registry.rollback()
    print_summary("mnist-mlops rollback", {"champion": f"v{d.version}", "was": f"v{d.previous_champion}"})


def ui(
    port: Annotated[int, typer.Option(help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    open_: Annotated[bool, typer.Option("--open", help="Open the runs table in a browser.")] = False,
) -> None:
    """Start the MLflow UI for the project's store and print the URL of its runs table (Ctrl-C stops it)."""
    from mnist_mlops.config import tracking_uri
    from mnist_mlops.platform.tracking import project_runs_url

    root = project_dir()
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


def package(
    force: Annotated[bool, typer.Option(help="Rebuild even if the champion's Bento exists.")] = False,
) -> None:
    """Import the champion into the BentoML store and build its Bento (bentofile.yaml)."""
    from mnist_mlops.serving.package import package_champion

    result = package_champion(project_dir(), force=force)
    print_summary("mnist-mlops package", {"bento": result["bento"], "model": result["model"],
                                           "champion": f"v{result['model_version']}", "MLflow run id": result["run_id"],
                                           "built": "yes" if result["built"] else "no (up to date)"})


def serve(
    port: Annotated[int, typer.Option(help="Port of the prediction service.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to bind (127.0.0.1: this machine only).")] = "127.0.0.1",
    pin: Annotated[str | None, typer.Option(help="Serve this registered version only (no following).")] = None,
    allow_anonymous_feedback: Annotated[bool, typer.Option(
        help="Serve beyond loopback without MNIST_MLOPS_API_KEY: anyone can send labels.")] = False,
    open_predict: Annotated[bool, typer.Option(
        help="With MNIST_MLOPS_API_KEY set: /predict and /predict_image need no key (/feedback still does).")] = False,
) -> None:
    """Serve the champion over HTTP and follow it: a new champion is swapped in without a restart.

    Ctrl-C stops it. `--pin VERSION` serves one version and watches nothing. A host other than
    loopback needs MNIST_MLOPS_API_KEY (or --allow-anonymous-feedback).
    """
    import tempfile

    from mnist_mlops.serving.package import serve_command_apart
    from mnist_mlops.serving.settings import ALLOW_ANONYMOUS_ENV, OPEN_PREDICT_ENV, exposure_warning

    if warning := exposure_warning(host, allow_anonymous_feedback):
        err_console.print(f"[yellow]{warning}[/yellow]", highlight=False, soft_wrap=True)
    os.environ[ALLOW_ANONYMOUS_ENV] = "1" if allow_anonymous_feedback else "0"  # the workers check their bind too
    os.environ[OPEN_PREDICT_ENV] = "1" if open_predict else "0"
    root = project_dir()
    # this serve's own /metrics files: a second serve beside it never mixes in or wipes them
    with tempfile.TemporaryDirectory(prefix="mnist-mlops-serve-metrics-") as metrics_dir:
        cmd, env, tag = serve_command_apart(root, host, port, pin, Path(metrics_dir))
        mode = f"pinned to v{pin}" if pin else "following the champion"
        console.print(f"serving {tag} on http://{host}:{port}, {mode}  (docs: /, digits: POST /predict, "
                      "/predict_image)")
        code = run_in_foreground(cmd, cwd=root, env=env)
    raise typer.Exit(code)


def predict(
    files: Annotated[list[Path], typer.Argument(help="PNG or JPEG digits, or .npy arrays of N×28×28 digits.",
                                                exists=False)],
    url: Annotated[str, typer.Option(help="The running service.")] = "http://127.0.0.1:3000",
) -> None:
    """Send images (or .npy arrays of digits) to a running service (`mnist-mlops serve`) and
    print what it sees."""
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


def trace(
    prediction_id: Annotated[str | None, typer.Argument(help="A prediction id, as /predict returned it.")] = None,
    version: Annotated[str | None, typer.Option("--version", help="Trace this model version instead.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON (for machines).")] = False,
    html_file: Annotated[Path | None, typer.Option("--html", help="Also write the card as an HTML page.")] = None,
    mlflow_ui: Annotated[str | None, typer.Option(help="The MLflow UI the links open [default: the tracking "
                                                       "server, else `mnist-mlops ui`'s 127.0.0.1:5000]")] = None,
    prefect_ui: Annotated[str | None, typer.Option(help="The Prefect UI the links open [default: PREFECT_API_URL's "
                                                        "server, else http://127.0.0.1:4200]")] = None,
) -> None:
    """Why did the service say that? One answer (or model version) back to its data, code,
    labels and decisions, with the links that open each."""
    import json

    from mnist_mlops.config import Paths
    from mnist_mlops.lineage.card import Links, prediction_card, version_card
    from mnist_mlops.lineage.render import for_json, html_card, print_card
    from mnist_mlops.platform.tracking import setup_mlflow

    if (prediction_id is None) == (version is None):
        raise UserError("give a PREDICTION_ID or --version N (one of them)")
    root = project_dir()
    paths, found = Paths(root), Links.from_env(setup_mlflow(root))
    links = Links((mlflow_ui or found.mlflow).rstrip("/"), (prefect_ui or found.prefect).rstrip("/"))
    card = (prediction_card(paths.prediction_log, paths.feedback, prediction_id, links) if prediction_id
            else {"model": version_card(version, links)})
    if html_file:
        html_file.write_text(html_card(card))
    if as_json:
        sys.stdout.write(json.dumps(for_json(card), indent=2) + "\n")
    else:
        print_card(card)
        if html_file:
            console.print(f"card written to {html_file}")
