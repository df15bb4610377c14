"""`mnist-mlops feedback`: the labelled digits from people: counts, import, export."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnist_mlops.commands.common import err_console, print_summary, project_dir
from mnist_mlops.errors import UserError

app = typer.Typer(help="Labelled digits from people: counts, import, export.", no_args_is_help=False,
                  rich_markup_mode=None)


@app.callback(invoke_without_command=True)
def feedback_counts(ctx: typer.Context) -> None:
    """Print the labelled digits: total, new since the current data version, per label, disagreement."""
    if ctx.invoked_subcommand is not None:
        return
    from mnist_mlops.config import Paths
    from mnist_mlops.records import feedback
    from mnist_mlops.training.data import feedback_meta

    paths = Paths(project_dir())
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


@app.command("import")
def feedback_import(
    folder: Annotated[Path, typer.Argument(help="A folder with 0/ … 9/ subfolders of PNG/JPEG digits.")],
) -> None:
    """Store labelled images (DIR/<digit>/*.png|jpg), converted like the service converts uploads."""
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.records.labelled import import_folder

    root = project_dir()
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


@app.command("export")
def feedback_export(
    path: Annotated[Path, typer.Argument(help="Where to write the .npz (x: uint8 N×28×28, y: labels).")],
) -> None:
    """Write every labelled digit (newest label of each) to an .npz."""
    from mnist_mlops.config import Paths
    from mnist_mlops.records import feedback

    if path.suffix != ".npz":
        raise UserError(f"{path}: the export is an .npz file; name it FILE.npz")
    n = feedback.export(Paths(project_dir()).feedback, path)
    print_summary("mnist-mlops feedback export", {"digits": n, "file": str(path)})
