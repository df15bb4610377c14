"""Pipeline benchmark: wall time of `mnist-mlops run` by step, a no-change rerun, the overhead.

    python benchmarks/pipeline.py [--epochs N] [--set section.key=value] [--quick] [--keep]

Runs the real CLI twice in a fresh temp project (its own git repo, MLflow sqlite store,
BentoML home, Prefect home, DVC cache, as tests/conftest.py builds one):

1. a full run (default params: 12 epochs; `--quick` trains 1 epoch, `--epochs N` N),
2. a rerun with nothing changed (DVC skips every stage; the gate and the Bento are current).

The breakdown comes from the Prefect log lines the CLI prints (each task's "Finished"
timestamp) and the process' own start and exit:
imports (start → the Prefect API client's first use), Prefect start-up (temporary server),
fetch, version, prepare, train, evaluate, promote, package, finish (flow end → exit).
The train step is split further with the training run's per-epoch seconds: the Keras epochs vs the rest
(the DVC stage's process start, imports, saving and MLflow logging).

Targets: rerun ≤ 20 % of the full run; orchestration overhead (all but train and
evaluate) ≤ 25 % of the full run with default params. Not a test; exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, make_project, print_table  # noqa: E402

RERUN_TARGET = 0.20
OVERHEAD_TARGET = 0.25
STEPS = ["imports", "Prefect start-up", "fetch", "version", "prepare", "train", "evaluate", "promote",
         "package", "finish"]
ML_STEPS = {"train", "evaluate"}
STAMP = r"(\d\d:\d\d:\d\d\.\d\d\d) \| \w+\s*\| "
TASK_DONE = re.compile(STAMP + r"Task run '(.+?)-[0-9a-f]+' - Finished in state (\w+)")
SERVER = re.compile(STAMP + r"prefect - Starting temporary server")
FLOW_BEGIN = re.compile(STAMP + r"Flow run '[^']*' - Beginning flow run")
EARLY_SERVER = re.compile(STAMP + r"prefect\.mnist_mlops - Prefect API on .*waited ([0-9.]+) s")


def _clock(stamp: str, start: dt.datetime) -> float:
    """A log line's HH:MM:SS.mmm as seconds since `start` (same day, or the next)."""
    t = dt.datetime.combine(start.date(), dt.time.fromisoformat(stamp))
    if t < start - dt.timedelta(hours=1):
        t += dt.timedelta(days=1)
    return (t - start).total_seconds()


def breakdown(log: str, start: dt.datetime, wall: float) -> dict[str, float]:
    """Seconds per step from the log's timestamps (a step ends when its task finishes).

    Prefect start-up is the wait for the API server: with Prefect's own temporary server,
    "Starting temporary server" → "Beginning flow run"; with the server the CLI starts
    early (mnist_mlops.platform.prefect_server), the wait it logs plus the flow run's creation.
    """
    steps: dict[str, float] = dict.fromkeys(STEPS, 0.0)
    begin = _clock(m[1], start) if (m := FLOW_BEGIN.search(log)) else 0.0
    if m := SERVER.search(log):
        steps["imports"] = _clock(m[1], start)
    elif m := EARLY_SERVER.search(log):
        steps["imports"] = _clock(m[1], start) - float(m[2])
    else:  # PREFECT_API_URL names a running server
        steps["imports"] = begin
    steps["Prefect start-up"] = begin - steps["imports"]
    previous = begin
    for m in TASK_DONE.finditer(log):
        at = _clock(m[1], start)
        steps[m[2]] = steps.get(m[2], 0.0) + at - previous
        previous = at
    steps["finish"] = wall - previous
    # tasks beyond STEPS (e.g. checks) in the order they ran, before the final "finish"
    order = ["imports", "Prefect start-up", *dict.fromkeys(m[2] for m in TASK_DONE.finditer(log))]
    order += [k for k in steps if k not in order and k != "finish"] + ["finish"]
    return {k: steps.get(k, 0.0) for k in order}


# `mnist-mlops run` as before mnist_mlops.platform.prefect_server: Prefect starts its own temporary
# server at the flow's first API call (for the A/B comparison of --ab).
PREFECT_OWN_SERVER = ("import sys; import mnist_mlops.platform.prefect_server as p; p.start = lambda: None; "
                      "from mnist_mlops.cli import main; sys.argv = ['mnist-mlops', 'run']; main()")


def cli_run(root: Path, env: dict, label: str, own_server: bool = False) -> tuple[float, dict[str, float], str]:
    print(f"{label}: mnist-mlops run …", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-c", PREFECT_OWN_SERVER] if own_server else [str(BIN / "mnist-mlops"), "run"]
    start_dt = dt.datetime.now()
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed ({proc.returncode}):\n{log[-6000:]}")
    return wall, breakdown(log, start_dt, wall), log


def fit_seconds(root: Path) -> float:
    """The newest training run's Keras epochs, in seconds (its per-epoch `seconds` metric)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("mnist-convnet").experiment_id],
                               "tags.`model.weights_md5` != ''", order_by=["attributes.start_time DESC"],
                               max_results=1)
    return sum(m.value for m in client.get_metric_history(run.info.run_id, "seconds"))


def ab(root: Path, env: dict, n: int) -> None:
    """No-change reruns, alternating: Prefect's own temporary server vs the early-started one."""
    runs: dict[bool, list[tuple[float, dict[str, float]]]] = {True: [], False: []}
    # Prefect gives its own server ~20 s to answer: too little on a busy 2-core machine.
    env = {**env, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    for i in range(n):
        for own in ((True, False) if i % 2 == 0 else (False, True)):
            wall, steps, _ = cli_run(root, env, f"A/B {i + 1}/{n} ({'Prefect' if own else 'early'} server)", own)
            runs[own].append((wall, steps))

    def median(own: bool, step: str | None) -> float:
        return statistics.median(w if step is None else st.get(step, 0.0) for w, st in runs[own])

    steps = list(dict.fromkeys(k for w, st in runs[False] for k in st))
    rows = [[step, f"{median(True, step):.1f}", f"{median(False, step):.1f}",
             f"{median(False, step) - median(True, step):+.1f}"] for step in steps]
    rows.append(["[bold]total (wall)", f"{median(True, None):.1f}", f"{median(False, None):.1f}",
                 f"{median(False, None) - median(True, None):+.1f}"])
    print_table(f"No-change rerun, median of {n} alternating runs each: Prefect's temporary server "
                "vs the one `mnist-mlops run` starts early",
                ["step", "Prefect's own s", "started early s", "Δ s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs (default: params.yaml's)")
    parser.add_argument("--quick", action="store_true", help="one epoch (the overhead target is for defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="section.key=value")
    parser.add_argument("--keep", action="store_true", help="keep the temp project (its path is printed)")
    parser.add_argument("--reruns", type=int, default=1, help="no-change reruns (the median is reported)")
    parser.add_argument("--ab", type=int, default=0, metavar="N",
                        help="then N alternating no-change reruns: Prefect's own temporary server vs "
                             "the server started early by the CLI")
    args = parser.parse_args()
    overrides = list(args.overrides)
    epochs = 1 if args.quick else args.epochs
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if args.quick:  # one epoch scores below the default floor: lower it so promote and package run
        overrides.append("evaluate.min_accuracy=0.5")

    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    root = tmp / "project"
    env = make_project(root, overrides)
    full_wall, full, full_log = cli_run(root, env, "full run")
    keras_fit = fit_seconds(root)
    reruns = [cli_run(root, env, f"no-change rerun {i + 1}") for i in range(args.reruns)]
    reruns.sort(key=lambda r: r[0])
    re_wall, rerun, re_log = reruns[len(reruns) // 2]
    if "no (DVC skipped" not in re_log:
        print("warning: the rerun trained again (DVC did not skip train)", file=sys.stderr)

    ml = sum(full[s] for s in ML_STEPS)
    overhead = full_wall - ml
    rows = []
    for step in [*full, *(k for k in rerun if k not in full)]:
        tag = "ML" if step in ML_STEPS else "overhead"
        f, r = full.get(step, 0.0), rerun.get(step, 0.0)
        rows.append([f"{step} ({tag})", f"{f:.1f}", f"{f / full_wall:.1%}", f"{r:.1f}", f"{r / re_wall:.1%}"])
    rows.append(["  of train: Keras epochs (history.csv)", f"{keras_fit:.1f}", f"{keras_fit / full_wall:.1%}", "", ""])
    rows.append(["  of train: stage process, imports, save, log",
                 f"{full['train'] - keras_fit:.1f}", f"{(full['train'] - keras_fit) / full_wall:.1%}", "", ""])
    rows.append(["[bold]total (wall)", f"[bold]{full_wall:.1f}", "100%", f"[bold]{re_wall:.1f}", "100%"])
    from mnist_mlops.config import load_params

    n_epochs = load_params(root).train.epochs
    print_table(f"mnist-mlops run by step, seconds ({n_epochs} epochs; project {root if args.keep else 'temp'})",
                ["step", "full run s", "share", "no-change rerun s", "share"], rows)

    rerun_ratio = re_wall / full_wall
    overhead_ratio = overhead / full_wall
    verdict = lambda ok: "[green]met[/]" if ok else "[red]not met[/]"  # noqa: E731
    print_table("Ratios", ["measure", "value", "target", ""], [
        ["no-change rerun / full run", f"{rerun_ratio:.1%} ({re_wall:.1f} s / {full_wall:.1f} s)",
         f"≤ {RERUN_TARGET:.0%}", verdict(rerun_ratio <= RERUN_TARGET)],
        ["orchestration overhead / full run", f"{overhead_ratio:.1%} ({overhead:.1f} s / {full_wall:.1f} s)",
         f"≤ {OVERHEAD_TARGET:.0%}" + ("" if epochs is None and not args.overrides else " (for defaults)"),
         verdict(overhead_ratio <= OVERHEAD_TARGET)],
        ["all but Keras epochs / full run", f"{(full_wall - keras_fit) / full_wall:.1%}", "(for information)", ""],
    ])
    if args.ab:
        ab(root, env, args.ab)
    if "Task run 'package" not in full_log:
        print("note: the full run promoted nothing, so nothing was packaged", file=sys.stderr)
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
