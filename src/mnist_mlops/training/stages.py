"""Entry point of the DVC stages (`python -m mnist_mlops.training.stages NAME`).

`dvc.yaml` and the Prefect flow both run the stages through here, so there is exactly
one implementation of each step and `dvc repro` alone gives what the flow gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mnist_mlops.platform.tracking import quiet_env


def run_stage(name: str, root: Path) -> None:
    from mnist_mlops.config import Paths, load_params

    params = load_params(root)
    paths = Paths(root)
    if name == "prepare":
        from mnist_mlops.training.prepare import prepare

        sizes = prepare(paths, params.prepare)
        print(f"prepare: {sizes['train']} train / {sizes['val']} val / {sizes['test']} test digits")
    elif name == "train":
        from mnist_mlops.training.train import train

        print(f"train: MLflow run {train(params, paths)}")
    elif name == "evaluate":
        from mnist_mlops.training.evaluate import evaluate

        r = evaluate(params, paths)
        print(f"evaluate: test accuracy {r['accuracy']:.4f}, registered version {r['version']}")
    else:
        raise SystemExit(f"unknown stage '{name}': expected prepare, train or evaluate")


def main(argv: list[str] | None = None) -> None:
    from mnist_mlops.errors import UserError

    quiet_env()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m mnist_mlops.training.stages prepare|train|evaluate")
    try:
        run_stage(args[0], Path.cwd())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
