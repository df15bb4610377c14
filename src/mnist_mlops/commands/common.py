"""What every command shares: the consoles, the project folder, the summary table, the UI links."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

SetOption = Annotated[list[str] | None,
                      typer.Option("--set", "-S", help="Override a parameter: section.key=value (repeatable).")]


def project_dir() -> Path:
    from mnist_mlops.config import project_root

    return project_root()


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
