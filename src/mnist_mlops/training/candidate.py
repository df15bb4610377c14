"""One sweep candidate: trained in a process of its own (`python -m mnist_mlops.training.candidate
--out DIR -S section.key=value ...`) as a nested MLflow child run of the sweep's parent run, through
the same `train.train` the `train` stage uses, into its own work dir; scored on val, robust-val and
foreign-val data (never test data).

Fanned out (`--pool`), a candidate runs on a Prefect worker, in that worker's checkout (which
must hold the sweep's params and prepared data: `check_checkout`), on the CPUs the worker is
pinned to (`placement`); its outputs travel through its MLflow run (`OUTPUTS`), read back by
`candidate_from_run` and `fetch_outputs` wherever the sweep runs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.config import Params, Paths, load_params
from mnist_mlops.errors import UserError

RESULT_FILE = "result.json"
OUTPUTS = "candidate"  # the artifact path of a fanned-out candidate's model and run.json
WATCH_SECONDS = 1.0  # how often a candidate checks that the worker that started it is alive


@dataclass(frozen=True)
class Candidate:
    index: int
    overrides: list[str]
    run_id: str
    val_accuracy: float
    val_loss: float
    workdir: str
    robust_val_accuracy: float = 0.0
    foreign_val_accuracy: float = 0.0

    @property
    def score(self) -> float:
        """What the sweep maximises: clean, robust and foreign accuracy on validation data, alike."""
        return (self.val_accuracy + self.robust_val_accuracy + self.foreign_val_accuracy) / 3

    @property
    def label(self) -> str:
        return " ".join(self.overrides)


def candidate_paths(root: Path, workdir: Path) -> Paths:
    """The project's paths, with the train step's outputs redirected into `workdir`."""
    return Paths(root).with_train_outputs_in(workdir)


def finite_val(acc: float, loss: float) -> tuple[float, float]:
    """A candidate's val accuracy and loss as the choice compares them: NaN or infinite counts as worst."""
    return (acc if math.isfinite(acc) else 0.0), (loss if math.isfinite(loss) else math.inf)


def final_val(history: Path) -> tuple[float, float]:
    with history.open() as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise UserError(f"{history} is empty: the candidate trained no epoch")
    return finite_val(float(rows[-1]["val_accuracy"]), float(rows[-1]["val_loss"]))


def candidate_process(root: Path, index: int, overrides: list[str], parent_run_id: str, workdir: Path,
                      upload: bool) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a candidate's own process (`child_main`)."""
    from mnist_mlops.platform.tracking import FLOW_RUN_ENV, PARENT_RUN_ENV, RUN_NAME_ENV

    env = {**os.environ, PARENT_RUN_ENV: parent_run_id, "MNIST_MLOPS_ROOT": str(root),
           RUN_NAME_ENV: f"sweep · candidate-{index} · {' '.join(overrides)}"}
    env.setdefault(FLOW_RUN_ENV, "none")
    cmd = [sys.executable, "-m", "mnist_mlops.training.candidate", "--out", str(workdir), *(["--upload"] * upload)]
    for override in overrides:
        cmd += ["-S", override]
    return cmd, env


def train_candidate(root: Path, index: int, overrides: list[str], parent_run_id: str,
                    workdir: Path, upload: bool = False, stop_with_parent: bool = False) -> Candidate:
    """Train one combination in a fresh process as a child run of `parent_run_id`.

    `upload`: also log the model to the child run (a fanned-out candidate's outputs must
    reach the parent's machine). `stop_with_parent`: this process runs under a worker; if
    the worker dies, the candidate is stopped, its MLflow run marked KILLED, and it fails
    (a worker's flow runs outlive it otherwise, and nobody would report them)."""
    from mnist_mlops.platform.processes import alive, ancestors, detach_output
    from mnist_mlops.platform.tracking import FLOW_RUN_ENV

    workdir.mkdir(parents=True, exist_ok=True)
    cmd, env = candidate_process(root, index, overrides, parent_run_id, workdir, upload)
    label = " ".join(overrides)
    starters = ancestors()  # the worker, and whatever Prefect put between it and this process

    def worker_died() -> UserError:
        detach_output()
        _stop(proc)
        killed = mark_orphaned_run(root, parent_run_id, env[FLOW_RUN_ENV])
        dead = ", ".join(str(pid) for pid in starters if not alive(pid))
        return UserError(f"sweep candidate {label}: its worker died mid-training (pid {dead} gone); candidate "
                         f"stopped{f', MLflow run {killed} marked KILLED' if killed else ''}")

    with (workdir / "candidate.log").open("w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            while proc.poll() is None:
                if stop_with_parent and not all(map(alive, starters)):
                    raise worker_died()
                time.sleep(WATCH_SECONDS)
        except BaseException:
            # When the worker dies, Prefect stops its flow runs (SIGTERM): say why the candidate
            # ended rather than "Execution was aborted by Python system exit call".
            if stop_with_parent and not all(map(alive, starters)):
                raise worker_died() from None
            raise
        finally:
            _stop(proc)
    return candidate_result(index, overrides, workdir, proc.returncode)


def candidate_result(index: int, overrides: list[str], workdir: Path, returncode: int) -> Candidate:
    """The finished candidate process's output passed on, and its result (one line if it failed)."""
    output = (workdir / "candidate.log").read_text(errors="replace")
    sys.stderr.write(output)
    if returncode != 0:
        tail = output.strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"sweep candidate {' '.join(overrides)} failed: {tail[0][:300]}")
    result = json.loads((workdir / RESULT_FILE).read_text())
    return Candidate(index=index, overrides=overrides, run_id=result["run_id"],
                     val_accuracy=result["val_accuracy"], val_loss=result["val_loss"], workdir=str(workdir),
                     robust_val_accuracy=result["robust_val_accuracy"],
                     foreign_val_accuracy=result["foreign_val_accuracy"])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mark_orphaned_run(root: Path, parent_run_id: str, flow_run_id: str) -> str | None:
    """The stopped candidate's MLflow run (found by its flow run), marked KILLED; its id."""
    import mlflow

    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                              f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    for run in runs:
        if run.info.status == "RUNNING":  # the stopped training usually ends it as KILLED itself
            client.set_terminated(run.info.run_id, "KILLED")
    return runs[0].info.run_id if runs else None



# ----------------------------------------------------------------------------- fanned out


def placement() -> dict[str, str]:
    """Where this candidate trains: the worker, the host, and the CPUs and GPUs it may use.

    A worker started with `taskset -c 0-7` (or `CUDA_VISIBLE_DEVICES=1`) passes its share on
    to every candidate it runs; TensorFlow then sizes its thread pools to those CPUs."""
    from mnist_mlops.platform.prefect_server import worker_name

    cpus = sorted(os.sched_getaffinity(0))
    return {"sweep.worker": worker_name(),
            "sweep.host": socket.gethostname(),
            "sweep.cpus": ",".join(map(str, cpus)),
            "sweep.threads": str(len(cpus)),
            "sweep.gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "all")}


def prepared_md5s(root: Path) -> dict[str, str]:
    """The md5s DVC recorded for the stage outputs candidates train and score on."""
    import yaml

    lock = root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    return {out["path"]: out.get("md5", "") for name in ("prepare", "robustness", "foreign")
            for out in stages.get(name, {}).get("outs", [])}


def check_checkout(root: Path, params: dict, prepared: dict[str, str]) -> None:
    """A worker's checkout must hold the sweep's params and prepared data (one line if not)."""
    here = load_params(root).model_dump(mode="json")
    for section, values in params.items():
        for key, value in values.items():
            mine = here.get(section, {}).get(key)
            if mine != value:
                raise UserError(f"this worker's checkout {root} has {section}.{key}={mine!r}, the sweep {value!r}: "
                                "commit params.yaml and update the checkout (git pull)")
    ours = prepared_md5s(root)
    for path, md5 in prepared.items():
        mine = ours.get(path) or "none"
        if mine != md5:
            raise UserError(f"this worker's checkout {root} has other {path} than the sweep ({mine} vs {md5}): "
                            "update it (git pull, dvc pull, dvc repro robustness foreign)")


def child_run(root: Path, parent_run_id: str, flow_run_id: str):
    """The MLflow child run a candidate's flow run trained (tagged with that flow run's id)."""
    import mlflow

    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                              f"tags.`prefect.flow_run_id` = '{flow_run_id}' and attributes.status = 'FINISHED'")
    if not runs:
        raise UserError(f"flow run {flow_run_id} completed but left no finished MLflow child run of {parent_run_id}")
    return runs[0]


def candidate_from_run(run, index: int, overrides: list[str]) -> Candidate:
    """A finished candidate, read back from its MLflow child run."""
    metrics = run.data.metrics
    acc, loss = finite_val(metrics.get("val_accuracy", 0.0), metrics.get("val_loss", math.inf))
    return Candidate(index=index, overrides=overrides, run_id=run.info.run_id, val_accuracy=acc, val_loss=loss,
                     workdir="",
                     robust_val_accuracy=metrics.get("robust_val_accuracy", 0.0),
                     foreign_val_accuracy=metrics.get("foreign_val_accuracy", 0.0))


def fetch_outputs(root: Path, run_id: str, workdir: Path) -> Path:
    """The winner's model, history and curves from its MLflow run, laid out as its
    work dir was on the worker (`candidate_paths`)."""
    import mlflow

    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    paths = candidate_paths(root, workdir)
    for artifact, dest in ((f"{OUTPUTS}/model.keras", paths.model_file),
                           ("reports/history.csv", paths.history),
                           ("figures/learning_curves.png", paths.figures / "learning_curves.png")):
        dest.parent.mkdir(parents=True, exist_ok=True)
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                       dst_path=str(workdir / ".download")))
        os.replace(got, dest)
    shutil.rmtree(workdir / ".download", ignore_errors=True)
    return workdir



# ----------------------------------------------------------------------------- child process


def use_cpu_share() -> None:
    """Size TensorFlow's thread pools to the CPUs this process may use (its worker's share)."""
    import tensorflow as tf

    threads = len(os.sched_getaffinity(0))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def upload_outputs(paths: Paths, run_id: str) -> None:
    """Log the model to the child run: the parent may be on another machine."""
    import mlflow

    client = mlflow.MlflowClient()
    client.log_artifact(run_id, str(paths.model_file), OUTPUTS)


def val_slices_accuracy(paths: Paths, run_id: str) -> tuple[float, float]:
    """The candidate's accuracy on the robust-val slice and on the foreign val families' digits,
    logged to its run as `robust_val_accuracy` and `foreign_val_accuracy`."""
    import mlflow

    from mnist_mlops.scoring import load_keras, probabilities
    from mnist_mlops.training.foreign import load
    from mnist_mlops.training.robustness import load_slice

    model = load_keras(paths.model_file)
    robust, foreign = load_slice(paths, "robust_val"), load(paths, "val")
    accs = tuple(float((probabilities(model, s.x).argmax(axis=1) == s.y).mean()) for s in (robust, foreign))
    client = mlflow.MlflowClient()
    client.log_metric(run_id, "robust_val_accuracy", accs[0])
    client.log_metric(run_id, "foreign_val_accuracy", accs[1])
    return accs


def child_main(argv: list[str] | None = None) -> None:
    """`python -m mnist_mlops.training.candidate --out DIR [-S section.key=value ...]`: one candidate."""
    import argparse

    from mnist_mlops.config import project_root
    from mnist_mlops.platform.tracking import quiet_env

    quiet_env()
    ap = argparse.ArgumentParser(prog="python -m mnist_mlops.training.candidate")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--upload", action="store_true", help="log the model to the run (fanned-out sweeps)")
    args = ap.parse_args(argv)
    try:
        root = project_root()
        params: Params = load_params(root, args.overrides)
        from mnist_mlops.training.train import train

        use_cpu_share()
        paths = candidate_paths(root, args.out.resolve())
        run_id = train(params, paths, tags=placement())
        acc, loss = final_val(paths.history)
        robust, alien = val_slices_accuracy(paths, run_id)
        if args.upload:
            upload_outputs(paths, run_id)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    result = {"run_id": run_id, "val_accuracy": acc, "val_loss": loss, "robust_val_accuracy": robust,
              "foreign_val_accuracy": alien, "overrides": args.overrides}
    (args.out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    print(f"candidate {' '.join(args.overrides)}: val accuracy {acc:.4f}, robust val accuracy {robust:.4f}, "
          f"foreign val accuracy {alien:.4f} (MLflow run {run_id})")



if __name__ == "__main__":
    child_main()
