"""Monitoring benchmark: seconds of one monitor check over 10,000 and 100,000 logged predictions.

    python benchmarks/monitoring.py [--project PATH] [--sizes 10000,100000]

The prediction log is written the way the service writes it (`PredictionLog`: real MNIST
digits from the offline sample, their features, ten probabilities each), into a temp folder
per size. Then, for each size:

- `check`: the statistics alone, in this process (read the window, features, scipy's tests,
  live accuracy, the decision), and `report`: rendering the HTML page;
- `monitor command`: `mnist-mlops monitor --since 1h --no-retrain --log-dir ...` end to end, as
  a user runs it (imports, its Prefect server, the flow, the MLflow run, the report).

`--project` names a project whose champion was trained by this code (it logs the monitoring
reference); without it a temp project is made and trained for one epoch first (~2 min).
Target: the monitor command ≤ 30 s for 100,000 predictions on 2 cores. Not a test; exits 0.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, make_project, met, print_table, project_env  # noqa: E402

TARGET_S = 30.0
BATCH = 1000


def write_log(directory: Path, n: int) -> float:
    """n predictions in the service's format; returns the seconds it took."""
    from mnist_mlops.records.prediction_log import PredictionLog, new_ids
    from mnist_mlops.training.data import load_sample

    digits = load_sample()
    rng = np.random.default_rng(0)
    log = PredictionLog(directory, max_mb=10_000, flush_seconds=3600)
    start = time.perf_counter()
    for offset in range(0, n, BATCH):
        idx = rng.integers(0, len(digits.labels), min(BATCH, n - offset))
        logits = rng.normal(0, 1, (len(idx), 10)) + 8 * np.eye(10)[digits.labels[idx]]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        x = digits.images[idx][..., None].astype(np.float32) / 255
        log.record(new_ids(len(idx)), "predict", "1", probs.astype(np.float32), x)
        log.flush()
    log.close()
    return time.perf_counter() - start


def timed_check(root: Path, log_dir: Path) -> tuple[float, float, int]:
    from mnist_mlops.config import Paths, load_params
    from mnist_mlops.monitoring import report
    from mnist_mlops.monitoring.check import run_check
    from mnist_mlops.monitoring.reference import champion_reference
    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root, "mnist-monitoring")
    reference = champion_reference()
    end = datetime.now(UTC)
    start = time.perf_counter()
    result = run_check(Paths(root), load_params(root), reference, end - timedelta(hours=1), end, log_dir)
    checked = time.perf_counter()
    report.render(result, reference)
    return checked - start, time.perf_counter() - checked, len(result.traffic.records)


def timed_command(root: Path, env: dict[str, str], log_dir: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "mnist-mlops"), "monitor", "--since", "1h", "--no-retrain",
                           "--log-dir", str(log_dir)], cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mnist-mlops monitor failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a trained project (default: a temp one, trained here)")
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.project:
            root = args.project.resolve()
            env = project_env(root)
        else:
            root = Path(tmp) / "project"
            env = make_project(root, ["train.epochs=1", "evaluate.min_accuracy=0"])
            print("training a 1-epoch champion in a temp project ...", flush=True)
            subprocess.run([str(BIN / "mnist-mlops"), "run", "--no-package"], cwd=root, env=env, check=True,
                           capture_output=True)
        import os

        os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI",) if k in env})
        rows = []
        for n in sizes:
            log_dir = Path(tmp) / f"log-{n}"
            wrote = write_log(log_dir, n)
            check_s, report_s, seen = timed_check(root, log_dir)
            command_s = timed_command(root, env, log_dir)
            rows.append([f"{n:,}", f"{seen:,}", f"{wrote:.1f}", f"{check_s:.2f}", f"{report_s:.2f}",
                         f"{command_s:.1f}", met(command_s, TARGET_S, higher_is_better=False)])
    print_table("monitor check over a logged window (seconds)",
                ["predictions", "read back", "writing the log", "check", "report", "monitor command",
                 f"≤ {TARGET_S:g} s"], rows)


if __name__ == "__main__":
    main()
