"""Sweeps: train every combination of a parameter grid, keep the best by validation accuracy.

Design (one implementation of each step, DVC and the registry kept consistent):
1. `--grid section.key=v1,v2` lists are expanded into combinations, each validated as params.
2. One parent MLflow run; each combination trains in its own process
   (`python -m mnist_mlops.training.candidate --out DIR -S k=v ...`, see `candidate`) through the same `train.train` the
   `train` stage uses, as a nested child run (MNIST_MLOPS_PARENT_RUN_ID), writing its model
   and curves into its own work dir. Children see only train/val data: no test metric
   exists before the choice, so the choice cannot use it.
3. The best child by its selection score, the mean of final val accuracy, robust-val
   accuracy (the val split through the robustness slice's corruptions) and foreign-val
   accuracy (digits of the foreign slice's val families), then lower val loss, then grid
   order, wins: its
   params are written into params.yaml, its outputs moved to where the `train` stage puts
   them, and `dvc commit train` records them in dvc.lock (training is deterministic, so
   they are what `dvc repro` would produce; nothing is trained twice).
4. The normal `evaluate` stage and champion gate then run on that one model: it is
   registered from the winning child run, so a sweep adds at most one model version.

Fanned out (`--pool`), each candidate is a flow run of `mnist-sweep-candidate` on a Prefect
work pool, trained by whichever worker takes it, in that worker's checkout, on the CPUs the
worker is pinned to (`placement`). Its outputs travel through its MLflow run (`OUTPUTS`), so
the parent installs the winner from the tracking server, wherever it was trained. A
candidate whose worker dies is stopped and fails; the best of the others still wins.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

from mnist_mlops.config import Paths, load_params
from mnist_mlops.errors import UserError
from mnist_mlops.training.candidate import Candidate, candidate_paths

LIST_PARAMS = {"model.filters"}  # a scalar given for these means a one-element list


# ----------------------------------------------------------------------------- the grid


def split_values(raw: str) -> list[str]:
    """`0.001,0.003` -> two values; commas inside [...] stay: `[32,64],[64]` -> two lists."""
    values, depth, current = [], 0, []
    for ch in raw:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    values.append("".join(current).strip())
    return values


def parse_grid(specs: list[str] | None) -> list[tuple[str, list[str]]]:
    """`["train.learning_rate=0.001,0.003", "model.filters=32,64"]` -> keys with their values."""
    if not specs:
        raise UserError("a sweep needs at least one --grid section.key=v1,v2")
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or "." not in key or not raw.strip():
            raise UserError(f"bad --grid '{spec}': expected section.key=value1,value2")
        values = split_values(raw)
        if any(not v for v in values):
            raise UserError(f"bad --grid '{spec}': empty value")
        if key in LIST_PARAMS:
            values = [v if v.startswith("[") else f"[{v}]" for v in values]
        if key in grid:
            raise UserError(f"--grid {key} given twice")
        grid[key] = list(dict.fromkeys(values))  # drop repeats, keep order
    return list(grid.items())


def combinations(root: Path, specs: list[str] | None, base: list[str] | None = None) -> list[list[str]]:
    """Every combination as `section.key=value` overrides, each validated against params.yaml."""
    grid = parse_grid(specs)
    combos = [[f"{key}={value}" for key, value in zip([k for k, _ in grid], values, strict=False)]
              for values in itertools.product(*[v for _, v in grid])]
    for combo in combos:
        load_params(root, [*(base or []), *combo])  # a bad value fails here, before any work
    return combos



# ----------------------------------------------------------------------------- MLflow parent


def start_parent(root: Path, specs: list[str], combos: list[list[str]], tags: dict[str, str]) -> str:
    """The parent run (left RUNNING so children can nest under it; `finish_parent` ends it)."""
    import mlflow

    from mnist_mlops.platform.tracking import EXPERIMENT, setup_mlflow

    setup_mlflow(root)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name="sweep",
                            tags={**tags, "sweep.grid": json.dumps(specs), "sweep.combinations": str(len(combos))})
    client.log_param(run.info.run_id, "sweep.grid", " ".join(specs)[:6000])
    client.log_param(run.info.run_id, "sweep.size", len(combos))
    return run.info.run_id


def record_candidate(root: Path, parent_run_id: str, cand: Candidate) -> None:
    import mlflow

    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    client = mlflow.MlflowClient()
    client.log_metric(parent_run_id, "candidate_val_accuracy", cand.val_accuracy, step=cand.index)
    client.log_metric(parent_run_id, "candidate_robust_val_accuracy", cand.robust_val_accuracy, step=cand.index)
    client.log_metric(parent_run_id, "candidate_foreign_val_accuracy", cand.foreign_val_accuracy, step=cand.index)
    client.log_metric(parent_run_id, "candidate_score", cand.score, step=cand.index)
    client.set_tag(cand.run_id, "sweep.combination", cand.label)


def finish_parent(root: Path, parent_run_id: str, best: Candidate | None, ok: bool) -> None:
    import mlflow

    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    client = mlflow.MlflowClient()
    if best is not None:
        client.log_metric(parent_run_id, "best_val_accuracy", best.val_accuracy)
        client.log_metric(parent_run_id, "best_robust_val_accuracy", best.robust_val_accuracy)
        client.log_metric(parent_run_id, "best_foreign_val_accuracy", best.foreign_val_accuracy)
        client.set_tag(parent_run_id, "sweep.best_run_id", best.run_id)
        client.set_tag(parent_run_id, "sweep.best", best.label)
    client.set_terminated(parent_run_id, "FINISHED" if ok else "FAILED")



# ----------------------------------------------------------------------------- the choice


def best(candidates: list[Candidate]) -> Candidate:
    """Highest score (clean + robust + foreign val accuracy); ties: lower val loss, then grid order.
    Never test data."""
    if not candidates:
        raise UserError("the sweep trained no candidate")
    return min(candidates, key=lambda c: (-c.score, c.val_loss, c.index))



# ----------------------------------------------------------------------------- the winner


def install(root: Path, winner: Candidate) -> list[str]:
    """Make the winner the project's trained model: params.yaml, train outputs, dvc.lock."""
    from mnist_mlops.config import write_params
    from mnist_mlops.platform.versioning import dvc_repo

    paths = Paths(root)
    changed = write_params(root, winner.overrides)
    src = candidate_paths(root, Path(winner.workdir))
    moves = [(src.model_file, paths.model_file), (src.history, paths.history),
             (src.figures / "learning_curves.png", paths.figures / "learning_curves.png")]
    for a, b in moves:
        b.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(a, b.with_name(f".{b.name}.tmp"))
        os.replace(b.with_name(f".{b.name}.tmp"), b)
    with dvc_repo(root) as repo:
        try:
            repo.commit("train", force=True)
        except Exception as exc:  # noqa: BLE001 - surface DVC's one-line reason
            raise UserError(f"dvc commit train failed: {str(exc).splitlines()[0]}") from None
    return changed



# What installing a winner changes, beside the outputs of these stages: kept aside until the gate decides.
INSTALLED_FILES = ("params.yaml", "dvc.lock")
INSTALLED_STAGES = ("train", "evaluate")


def stage_outputs(root: Path, stages: tuple[str, ...] = INSTALLED_STAGES) -> list[str]:
    """Every output dvc.yaml declares for `stages` (outs, metrics and plots), as paths in the project."""
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [next(iter(item)) if isinstance(item, dict) else str(item)
            for name in stages for kind in ("outs", "metrics", "plots") for item in spec[name].get(kind, [])]


def _replace(source: Path, target: Path) -> None:
    """`target` := a copy of `source` (file or folder), or nothing when `source` does not exist."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def snapshot(root: Path, dest: Path) -> Path:
    """Keep a copy of what `install` changes (params.yaml, dvc.lock, the train and evaluate
    outputs), so a winner whose model the gate refuses leaves the project as it was."""
    for rel in [*INSTALLED_FILES, *stage_outputs(root)]:
        _replace(root / rel, dest / rel)
    return dest


def restore(root: Path, snap: Path) -> None:
    """Undo `install`: params.yaml, the train and evaluate outputs and their dvc.lock entries as
    `snapshot` found them; prepare and robustness, which ran for the sweep, recorded as they are."""
    from mnist_mlops.platform.versioning import dvc_repo

    for rel in [*INSTALLED_FILES, *stage_outputs(root)]:
        _replace(snap / rel, root / rel)
    with dvc_repo(root) as repo:
        try:
            for name in ("prepare", "robustness"):
                repo.commit(name, force=True)
        except Exception as exc:  # noqa: BLE001 - surface DVC's one-line reason
            raise UserError(f"dvc commit failed restoring the project: {str(exc).splitlines()[0]}") from None


def cleanup(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
