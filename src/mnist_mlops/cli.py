"""`mnist-mlops`: the command line. Each command is thin; the work lives in the step modules.

This module is the map of the commands, in the order `--help` lists them; they live by role in
`mnist_mlops.commands`: `flows` (run, sweep, monitor, schedule, prefect-ui), `models` (fetch,
verify, promote, rollback, ui, package, serve, predict, trace) and `feedback`; `common` holds what they
share.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from mnist_mlops.commands import feedback, flows, models
from mnist_mlops.commands.common import err_console
from mnist_mlops.errors import UserError
from mnist_mlops.platform.tracking import quiet_env

# Plain help (rich_markup_mode=None): typer's rich panels print a type after every flag (`--verbose <bool>`).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, help="Train, track, promote and serve a ConvNet on MNIST.")


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


for command in (flows.run, flows.monitor, models.fetch, models.verify, models.promote, models.rollback, models.ui,
                models.package, models.serve, models.predict, models.trace):
    app.command()(command)
app.add_typer(feedback.app, name="feedback")
app.command()(flows.schedule)
app.command("prefect-ui")(flows.prefect_ui)
app.command()(flows.sweep)


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
