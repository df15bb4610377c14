"""`mnist-mlops feedback`: the labelled digits from people: counts, import, export, review."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mnist_mlops.commands.common import console, err_console, print_summary, project_dir
from mnist_mlops.errors import UserError

app = typer.Typer(help="Labelled digits from people: counts, import, export, review.", no_args_is_help=False,
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


@app.command("review")
def feedback_review(
    ids: Annotated[list[str] | None, typer.Argument(help="Quarantined labels to release or reject (with --accept "
                                                         "or --reject): prediction ids or digit shas.")] = None,
    accept: Annotated[bool, typer.Option("--accept", help="Release them: the next run trains on them.")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="Reject these labels: never trained on.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print the quarantined labels as JSON.")] = False,
    html_file: Annotated[Path | None, typer.Option("--html", help="Write them as an HTML page.")] = None,
) -> None:
    """Screen new labels, list the ones quarantined as likely label errors, release or reject them."""
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.platform.tracking import setup_mlflow
    from mnist_mlops.records import verdicts
    from mnist_mlops.training import review

    if accept and reject:
        raise UserError("--accept and --reject: choose one")
    if (accept or reject) and not ids:
        raise UserError("name the labels to decide on: `mnist-mlops feedback review --accept ID…` (or --reject)")
    if ids and not (accept or reject):
        raise UserError(f"release or reject {ids[0]!r}? add --accept or --reject")
    root = project_dir()
    paths, params = Paths(root), load_params(root)
    if accept or reject:
        decided = review.decide(paths.feedback, list(ids or []), verdicts.ACCEPTED if accept else verdicts.REJECTED)
        print_summary("mnist-mlops feedback review", {
            "released (the next run trains on them)" if accept else "rejected (never trained on)":
                " ".join(s.id for s in decided)})
        return
    setup_mlflow(root)
    review.screen_pending(paths, params)
    waiting = review.suspects(paths.feedback)
    if json_:
        typer.echo(json.dumps([s.for_json() for s in waiting], indent=1))
        return
    if html_file is not None:
        html_file.write_text(review_page(waiting))
    print_suspects(waiting, html_file)


def print_suspects(waiting: list, html_file: Path | None) -> None:
    """The quarantined labels as a table with each digit drawn in blocks, then what to do next."""
    from mnist_mlops.lineage.render import terminal_picture

    table = Table(title=f"{len(waiting)} labels quarantined as likely label errors", title_justify="left")
    for column in ("id", "label", "model", "score"):
        table.add_column(column, overflow="fold")
    table.add_column("digit", no_wrap=True, min_width=28)
    for s in waiting:
        table.add_row(s.id, str(s.label), "?" if s.predicted is None else str(s.predicted),
                      "?" if s.score is None else f"{s.score:.3f}", terminal_picture(s.image))
    console.print(table)
    if waiting:
        console.print("release: mnist-mlops feedback review --accept ID…   reject: mnist-mlops feedback review "
                      "--reject ID…" + (f"\npage: {html_file}" if html_file else ""), soft_wrap=True)


def review_page(waiting: list) -> str:
    """A self-contained HTML page of the quarantined labels, each digit as a PNG."""
    import html

    from mnist_mlops.lineage.render import png_data_url

    rows = "".join(
        f"<tr><td><img alt='digit' src='{png_data_url(s.image)}'></td><td><code>{html.escape(s.id)}</code></td>"
        f"<td>{s.label}</td><td>{'?' if s.predicted is None else s.predicted}</td>"
        f"<td>{'?' if s.score is None else f'{s.score:.3f}'}</td><td>{html.escape(s.time)}</td></tr>"
        for s in waiting)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>Quarantined labels</title></head><body>"
            f"<h1>{len(waiting)} labels quarantined as likely label errors</h1><table><tr><th>digit</th><th>id</th>"
            f"<th>label given</th><th>model's answer</th><th>score</th><th>labelled at</th></tr>{rows}</table>"
            "<p>Release: <code>mnist-mlops feedback review --accept ID…</code>; reject: "
            "<code>mnist-mlops feedback review --reject ID…</code></p></body></html>")
