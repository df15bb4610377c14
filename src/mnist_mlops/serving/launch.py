"""`bentoml serve`, with this serve's own Prometheus multiprocess directory.

BentoML keeps every server's metric files in one folder, `$BENTOML_HOME/prometheus_multiproc_dir`,
and empties it whenever a server starts: two services side by side (`mnist-mlops serve` on
:3000 and `serve --pin 2 --port 3001`) would each report the other's workers on `/metrics`,
and each start would wipe the other's counters. Only a private BentoML setting names that
folder: `use_prometheus_dir` wraps it, and tests/test_library_contracts.py fails the day
BentoML renames it.

    python -m mnist_mlops.serving.launch DIR serve TAG --host H --port P
"""

from __future__ import annotations

import sys


def use_prometheus_dir(directory: str) -> None:
    """Where this process's BentoML server keeps (and, at start, empties) its metric files."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    BentoMLContainer.prometheus_multiproc_dir.set(directory)


def main(argv: list[str] | None = None) -> None:
    """Set the directory, then run BentoML's own command line with the rest of the arguments."""
    directory, *rest = sys.argv[1:] if argv is None else argv
    use_prometheus_dir(directory)
    from bentoml_cli.cli import cli

    cli.main(args=rest, prog_name="bentoml")


if __name__ == "__main__":
    main()
