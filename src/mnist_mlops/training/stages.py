"""Entry point of the DVC stages (`python -m mnist_mlops.training.stages NAME`).

`dvc.yaml` and the Prefect flow both run the stages through here, so there is exactly
one implementation of each step and `dvc repro` alone gives what the flow gives. Each
stage is the `stage(params, paths)` function of its own module, imported by name, so the
modules a stage runs (its DVC dependencies) follow from that module's imports alone.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from mnist_mlops.platform.tracking import quiet_env

STAGES = {
    "prepare": "mnist_mlops.training.prepare",
    "robustness": "mnist_mlops.training.robustness",
    "foreign": "mnist_mlops.training.foreign",
    "train": "mnist_mlops.training.train",
    "evaluate": "mnist_mlops.training.evaluate",
}


def run_stage(name: str, root: Path) -> None:
    from mnist_mlops.config import Paths, load_params

    if name not in STAGES:
        raise SystemExit(f"unknown stage '{name}': expected {', '.join(STAGES)}")
    params = load_params(root)
    print(importlib.import_module(STAGES[name]).stage(params, Paths(root)))


def main(argv: list[str] | None = None) -> None:
    from mnist_mlops.errors import UserError

    quiet_env()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m mnist_mlops.training.stages {'|'.join(STAGES)}")
    try:
        run_stage(args[0], Path.cwd())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
