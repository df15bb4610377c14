"""The `mnist-mlops` console script: Ctrl-C and SIGTERM handled before anything heavy loads.

Importing the command line (typer, then MLflow, Prefect, ... as commands need them) takes
seconds on a busy machine. A stop signal in that window used to end in a KeyboardInterrupt
traceback from the middle of an import. This module imports only the standard library and
`platform.processes`, takes the signals first, and turns a stop during the import into the
same quiet "stopped" (exit 130) that a stop later on gives.
"""

from __future__ import annotations

import sys

from mnist_mlops.platform.processes import handle_stop_signals, stop_requested


def main() -> None:
    handle_stop_signals()
    try:
        from mnist_mlops.cli import main as cli_main
    except BaseException as exc:  # noqa: BLE001 - a library may wrap the interrupt in its own error
        if not (isinstance(exc, KeyboardInterrupt) or stop_requested()):
            raise
        stopped()
    try:
        cli_main()
    except KeyboardInterrupt:  # a stop between the import and the command's own handling
        stopped()


def stopped() -> None:
    print("stopped", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":
    main()
