"""The sweep flow: check → fetch → version → prepare → train each grid combination (child runs) →
keep the best by val and robust-val accuracy → evaluate → promote → package. The ML lives in
`mnist_mlops.training.sweep`; this flow only orders the steps and records them.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from mnist_mlops.config import Paths, load_params
from pipelines.training import gate_rows, package, promote, run_name, stage, summary_markdown, versioned_data


@task(name="candidate")
def candidate(root: str, index: int, overrides: list[str], parent_run_id: str, workdir: str) -> dict:
    """Train one combination as a nested MLflow child run; returns its val and robust-val accuracy."""
    from mnist_mlops.training import sweep

    cand = sweep.train_candidate(Path(root), index, overrides, parent_run_id, Path(workdir))
    sweep.record_candidate(Path(root), parent_run_id, cand)
    get_run_logger().info("candidate %s: val accuracy %.4f, robust val accuracy %.4f (run %s)", cand.label,
                          cand.val_accuracy, cand.robust_val_accuracy, cand.run_id)
    return asdict(cand)


@task(name="install-best")
def install_best(root: str, winner: dict) -> list[str]:
    """params.yaml := the winner's params; its outputs become the train stage's (dvc commit)."""
    from mnist_mlops.training import sweep

    changed = sweep.install(Path(root), sweep.Candidate(**winner))
    get_run_logger().info("best %s; params.yaml %s", " ".join(winner["overrides"]),
                          f"updated: {', '.join(changed)}" if changed else "unchanged")
    return changed


@flow(name="mnist-sweep", log_prints=True, flow_run_name=run_name)
def sweep_flow(root: str = ".", grid: list[str] | None = None, package_bento: bool = True,
               lock_wait_seconds: float = 0, trigger: str = "sweep") -> dict:
    """Every combination of `grid` (`section.key=v1,v2` strings) as child runs of one parent
    MLflow run; only the best (val and robust-val accuracy) is evaluated, gated and packaged."""
    from mnist_mlops.platform.locking import pipeline_lock
    from mnist_mlops.platform.tracking import run_tags
    from mnist_mlops.training import sweep

    root = str(Path(root).resolve())
    paths = Paths(Path(root))
    params = load_params(paths.root)
    combos = sweep.combinations(paths.root, grid)
    with pipeline_lock(paths.lock, wait_seconds=lock_wait_seconds):
        summary = {"Prefect flow run": flow_run.get_name(), "Prefect flow run id": flow_run.get_id(),
                   **versioned_data(root, params)}
        stage.with_options(name="prepare")(root, "prepare")
        stage.with_options(name="robustness")(root, "robustness")  # the candidates score on robust-val
        parent = sweep.start_parent(paths.root, list(grid or []), combos,
                                    run_tags(paths, summary["data source"]))
        paths.artifacts.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".sweep-", dir=paths.artifacts))
        winner = None
        try:
            cands = [candidate.with_options(name=f"candidate-{i}")(root, i, combo, parent, str(work / f"c{i}"))
                     for i, combo in enumerate(combos)]
            winner = sweep.best([sweep.Candidate(**c) for c in cands])
            install_best(root, asdict(winner))
            evaluated = stage.with_options(name="evaluate")(root, "evaluate")
            gate = promote(root, load_params(paths.root).evaluate.min_accuracy)
            sweep.finish_parent(paths.root, parent, winner, ok=True)
        except BaseException:
            sweep.finish_parent(paths.root, parent, winner, ok=False)
            raise
        finally:
            sweep.cleanup(work)
        summary |= {
            "candidates": len(cands),
            "best": winner.label,
            "best val accuracy": f"{winner.val_accuracy:.4f}",
            "best robust val accuracy": f"{winner.robust_val_accuracy:.4f}",
            "MLflow parent run id": parent,
            "evaluated": "yes" if evaluated else "no (DVC skipped: unchanged)",
            **gate_rows(gate),
        }
        if package_bento and gate["promoted"]:
            summary["bento"] = package(root)["bento"]
        table = [{"combination": " ".join(c["overrides"]), "val_accuracy": round(c["val_accuracy"], 4),
                  "robust_val_accuracy": round(c["robust_val_accuracy"], 4),
                  "score": round((c["val_accuracy"] + c["robust_val_accuracy"]) / 2, 4),
                  "val_loss": round(c["val_loss"], 4), "run_id": c["run_id"],
                  "best": c["run_id"] == winner.run_id} for c in cands]
        create_table_artifact(table=table, key="sweep-candidates",
                              description="sweep candidates: score = mean of val and robust-val accuracy")
        create_markdown_artifact(markdown=summary_markdown(summary).replace("MNIST training run", "MNIST sweep"),
                                 key="sweep-summary", description="summary of the sweep")
        summary["leaderboard"] = table
    return summary
