"""Service cold start: seconds from `mnist-mlops serve` to the first good prediction, idle RSS.

    python benchmarks/serving_coldstart.py [--project DIR] [--starts 2]

Starts the real CLI (`mnist-mlops serve --port P`) `--starts` times in the project (default:
a fresh temp project trained for one epoch by `mnist-mlops run`), and for each start
records: seconds to /readyz answering 200, seconds to the first 200 from POST /predict
(one digit), then, after 5 s idle, the resident memory of every process of the service's
tree (the CLI, BentoML's supervisor, its worker(s)). Prints a table; not a test; exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, make_project, print_table, project_env  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(pid: int) -> list[tuple[str, float]]:
    """(short command line, RSS MiB) of a process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            cmd = " ".join(proc.cmdline()[1:4]) or proc.name()
            out.append((cmd[:70], proc.memory_info().rss / 2**20))
        except psutil.Error:
            continue
    return out


def one_start(root: Path, env: dict, log: Path, idle_s: float) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"images": [[0] * 28 for _ in range(28)]}
    with log.open("w") as fh:
        start = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "mnist-mlops"), "serve", "--port", str(port)], cwd=root, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    ready = first = None
    try:
        while first is None:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - start > 600:
                raise SystemExit(f"no prediction after 600 s: see {log}")
            try:
                if ready is None and httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    ready = time.perf_counter() - start
                if ready is not None and httpx.post(f"{url}/predict", json=body, timeout=30).status_code == 200:
                    first = time.perf_counter() - start
            except httpx.HTTPError:
                pass
            if first is None:
                time.sleep(0.1)
        time.sleep(idle_s)
        rss = tree_rss(proc.pid)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return {"ready": ready, "first": first, "rss": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="a project with a champion (default: train one, 1 epoch)")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds idle before reading RSS")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.project:
        root = args.project.resolve()
        env = project_env(root) if not os.environ.get("MNIST_MLOPS_ROOT") else dict(os.environ)
    else:
        root = tmp / "project"
        env = make_project(root, ["train.epochs=1", "evaluate.min_accuracy=0.5"])
        print("training a champion (1 epoch) …", file=sys.stderr, flush=True)
        subprocess.run([str(BIN / "mnist-mlops"), "run"], cwd=root, env=env, check=True, capture_output=True)
        # build the Bento now, so the cold starts below measure serving only
        subprocess.run([str(BIN / "mnist-mlops"), "package"], cwd=root, env=env, check=True, capture_output=True)
    runs = []
    for i in range(args.starts):
        print(f"start {i + 1}/{args.starts}: mnist-mlops serve …", file=sys.stderr, flush=True)
        runs.append(one_start(root, env, tmp / f"serve-{i}.log", args.idle))
    rows = [[f"start {i + 1}", f"{r['ready']:.1f}", f"{r['first']:.1f}",
             f"{sum(m for _, m in r['rss']):,.0f}", str(len(r["rss"]))] for i, r in enumerate(runs)]
    print_table("mnist-mlops serve: cold start and idle memory",
                ["", "s to /readyz 200", "s to first /predict 200", "idle RSS MiB (process tree)", "processes"], rows)
    print_table("idle RSS by process (last start)", ["process", "RSS MiB"],
                [[cmd, f"{mib:,.0f}"] for cmd, mib in runs[-1]["rss"]])


if __name__ == "__main__":
    main()
