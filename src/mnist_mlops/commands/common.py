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
    from mnist_mlops.lineage.card import Links
    from mnist_mlops.platform.tracking import project_runs_url

    rows = dict(summary)
    run_id = rows.pop("Prefect flow run id", None)
    uri = tracking_uri(root)
    links = Links.from_env(uri)  # the same UIs the lineage card links to
    if run_id:
        rows["Prefect UI"] = f"{links.prefect}/runs/flow-run/{run_id}" + (
            "" if os.environ.get("PREFECT_API_URL") else "  (after `mnist-mlops prefect-ui`)")
    runs = project_runs_url(root, None if uri.startswith("http") else links.mlflow)
    rows["MLflow UI"] = runs if uri.startswith("http") else f"{runs}  (after `mnist-mlops ui`)"
    return rows
