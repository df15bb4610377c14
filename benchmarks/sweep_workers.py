"""Sweep benchmark: the same grid on a Prefect work pool with 1 worker, then with 2 workers.

    python benchmarks/sweep_workers.py [--candidates 4] [--epochs 3] [--set section.key=value] [--keep]

In a fresh temp project (its own git repo, MLflow sqlite store, DVC cache) with a local
`prefect server start` (sqlite) and a process work pool, it runs `mnist-mlops sweep --pool`
over `--candidates` learning rates twice:

1. one worker, allowed every CPU of this machine (its candidates train one after another,
   each with all the CPU threads);
2. as many workers as asked (`--workers`, default 2), each pinned to its share of the CPUs
   with `taskset` (their candidates train at once, each on its share).

It prints, for each: the whole sweep's wall time and the candidate phase (first candidate
submitted → last one finished, from the sweep's own log lines), and the ratio of the two.
On a machine with as many cores as workers × threads per candidate, the candidate phase
shrinks by up to the number of workers; on 2 cores, one training already uses both, so
expect little. Not a test; exits 0.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from mnist_mlops.platform.processes import LOOPBACK, free_port, start_group, stop_group, wait_http

from _common import BIN, make_project

STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| INFO .*candidate-(\d+): (Scheduled|Completed|Failed|Crashed)")


def cpu_shares(workers: int) -> list[str]:
    """`taskset -c` lists: the CPUs this process may use, split evenly between the workers."""
    cpus = sorted(os.sched_getaffinity(0))
    size = max(1, len(cpus) // workers)
    return [",".join(map(str, cpus[i * size:(i + 1) * size] or cpus[-1:])) for i in range(workers)]


def candidate_phase(output: str) -> float:
    """Seconds from the first candidate scheduled to the last one finished (the sweep's log)."""
    times = [datetime.strptime(m.group(1), "%H:%M:%S.%f") for line in output.splitlines()
             if (m := STAMP.match(line.strip()))]
    return (max(times) - min(times)).total_seconds() if len(times) >= 2 else float("nan")


def start_workers(root: Path, env: dict[str, str], pool: str, shares: list[str], logs: Path) -> list:
    procs = []
    for i, share in enumerate(shares):
        cmd = ["taskset", "-c", share, str(BIN / "prefect"), "worker", "start", "--pool", pool,
               "--name", f"cpus-{share}", "--limit", "1", "--type", "process"]
        procs.append(start_group(cmd, logs / f"worker-{i}.log", {**env, "MNIST_MLOPS_CHECKOUT": str(root)}, cwd=root))
    return procs


def wait_online(api: str, pool: str, count: int, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=30)
        if resp.status_code == 200 and sum(w["status"] == "ONLINE" for w in resp.json()) >= count:
            return
        time.sleep(1)
    raise SystemExit(f"{count} workers did not come online on pool {pool}")


def sweep(root: Path, env: dict[str, str], api: str, pool: str, shares: list[str], grid: str, logs: Path) -> dict:
    """One `mnist-mlops sweep --pool` with workers on `shares`; its timings."""
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], cwd=root, env=env,
                   check=True, capture_output=True)
    workers = start_workers(root, env, pool, shares, logs)
    try:
        wait_online(api, pool, len(shares))
        start = time.perf_counter()
        proc = subprocess.run([str(BIN / "mnist-mlops"), "sweep", "--pool", pool, "--no-package", "--grid", grid],
                              cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        for w in workers:
            stop_group(w)
    output = proc.stdout + proc.stderr
    (logs / f"{pool}.log").write_text(output)
    if proc.returncode != 0:
        raise SystemExit(f"sweep on {pool} failed:\n{output[-3000:]}")
    return {"wall": wall, "candidates": candidate_phase(output)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--keep", action="store_true", help="keep the temp project")
    args = ap.parse_args()
    rates = ",".join(f"{0.0005 * (i + 1):g}" for i in range(args.candidates))
    grid = f"train.learning_rate={rates}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    root, logs = tmp / "project", tmp / "logs"
    logs.mkdir(parents=True)
    env = make_project(root, [f"train.epochs={args.epochs}", *args.overrides])
    port = free_port()
    api = f"http://{LOOPBACK}:{port}/api"
    env["PREFECT_API_URL"] = api
    server = start_group([str(BIN / "prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port), "--no-ui"],
                         logs / "prefect-server.log", {k: v for k, v in env.items() if k != "PREFECT_API_URL"})
    try:
        wait_http(f"{api}/health", server, timeout=300, ok=lambda s: s == 200)
        print(f"project {root}; {args.candidates} candidates ({grid}), {args.epochs} epochs; "
              f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
        # both sweeps start from fetched, prepared data (the first would otherwise pay for it alone)
        for cmd in ([str(BIN / "mnist-mlops"), "fetch"], [str(BIN / "dvc"), "repro", "robustness"]):
            subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
        one = sweep(root, env, api, "one-worker", [",".join(map(str, sorted(os.sched_getaffinity(0))))], grid, logs)
        print(f"1 worker, all CPUs:       sweep {one['wall']:6.1f} s, candidates {one['candidates']:6.1f} s",
              flush=True)
        shares = cpu_shares(args.workers)
        many = sweep(root, env, api, f"{args.workers}-workers", shares, grid, logs)
        print(f"{args.workers} workers, CPUs {' | '.join(shares)}: sweep {many['wall']:6.1f} s, "
              f"candidates {many['candidates']:6.1f} s")
        print(f"speed-up with {args.workers} workers: sweep {one['wall'] / many['wall']:.2f}x, "
              f"candidate phase {one['candidates'] / many['candidates']:.2f}x")
    finally:
        stop_group(server)
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
