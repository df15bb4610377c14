"""Package: the MLflow champion → the BentoML model store → a Bento built by bentofile.yaml.

The BentoML model and the Bento are both tagged `v<registered version>-<run id prefix>`,
so the tag alone says which champion a Bento serves, a Bento is built once per champion,
and two projects sharing one `BENTOML_HOME` never mix their models up. The `serve`
section of params.yaml is baked into the Bento as build arguments (`bentoml.use_arguments`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME, load_params
from mnist_mlops.errors import UserError

BENTO_NAME = "mnist-classifier"
BENTOFILE = "bentofile.yaml"
MLFLOW_FOLDER = "mlflow_model"  # where bentoml.mlflow.import_model puts the MLflow model
KERAS_IN_MLFLOW_MODEL = "data/model.keras"  # the mlflow.keras flavor's file inside a logged MLflow model
KERAS_FILE = f"{MLFLOW_FOLDER}/{KERAS_IN_MLFLOW_MODEL}"  # ... and inside the BentoML model


def champion_info(root: Path) -> dict:
    """The champion's registered version, run id, data md5 and test accuracy (UserError if none)."""
    from mnist_mlops import registry
    from mnist_mlops.platform.tracking import setup_mlflow

    setup_mlflow(root)
    version = registry.require_champion()
    mv = registry.get_version(version)
    return {
        "model_name": MODEL_NAME,
        "model_version": str(mv.version),
        "run_id": mv.run_id,
        "data_md5": mv.tags.get("data.md5", "unknown"),
        "test_accuracy": float(mv.tags["test_accuracy"]) if "test_accuracy" in mv.tags else None,
        "alias": CHAMPION_ALIAS,
    }


def tag_version(info: dict) -> str:
    return f"v{info['model_version']}-{info['run_id'][:12]}"


def model_tag(info: dict) -> str:
    return f"{MODEL_NAME}:{tag_version(info)}"


def bento_tag(info: dict) -> str:
    return f"{BENTO_NAME}:{tag_version(info)}"


def _exists(getter, tag: str) -> bool:
    from bentoml.exceptions import NotFound

    try:
        getter(tag)
    except NotFound:
        return False
    return True


def import_champion(info: dict):
    """Copy the champion from MLflow into the BentoML model store (once per tag)."""
    import bentoml

    tag = model_tag(info)
    if _exists(bentoml.models.get, tag):
        return bentoml.models.get(tag)
    metadata = {k: v for k, v in info.items() if v is not None}
    return bentoml.mlflow.import_model(
        tag,
        model_uri=f"models:/{MODEL_NAME}/{info['model_version']}",
        labels={"mlflow_model": MODEL_NAME, "mlflow_version": info["model_version"], "stage": "champion"},
        metadata=metadata,
    )


def build_args(root: Path, info: dict) -> dict:
    """The Bento's build arguments: the model tag and the `serve` section of params.yaml."""
    return {"model": model_tag(info), **load_params(root).serve.model_dump()}


def package_champion(root: Path, force: bool = False) -> dict:
    """Import the champion into the BentoML store and build its Bento, unless it exists already.

    Returns {"bento": tag, "built": bool, "model": BentoML model tag, "model_version", "run_id"}.
    """
    import bentoml

    root = Path(root).resolve()
    info = champion_info(root)
    tag = bento_tag(info)
    result = {"bento": tag, "built": False, "model": model_tag(info),
              "model_version": info["model_version"], "run_id": info["run_id"]}
    if not force and _exists(bentoml.get, tag):
        return result
    bentofile = root / BENTOFILE
    if not bentofile.exists():
        raise UserError(f"{bentofile} not found: run from the project directory")
    import_champion(info)
    if force and _exists(bentoml.get, tag):
        bentoml.delete(tag)
    prev = os.getcwd()
    try:
        bento = bentoml.bentos.build_bentofile(
            str(bentofile), build_ctx=str(root / "src"), version=tag_version(info), reload=True,
            labels={"mlflow_model": MODEL_NAME, "mlflow_version": info["model_version"],
                    "mlflow_run_id": info["run_id"]},
            args=build_args(root, info),
        )
    finally:
        os.chdir(prev)  # the build imports the service from its context directory
    result.update(bento=str(bento.tag), built=True)
    return result


def champion_bento(root: Path) -> str:
    """The tag of the current champion's Bento (UserError when none is built yet)."""
    import bentoml

    info = champion_info(Path(root).resolve())
    tag = bento_tag(info)
    if not _exists(bentoml.get, tag):
        raise UserError(f"no Bento for champion v{info['model_version']} yet: run `mnist-mlops package`")
    return tag


def serve_command(root: Path, host: str, port: int, pin: str | None, metrics_dir: Path,
                  on_build=lambda message: None) -> tuple[list[str], dict[str, str], str]:
    """`bentoml serve` of the champion's Bento (built first if missing), and its environment:
    following the champion alias by default, or pinned to `pin`; its Prometheus files in
    `metrics_dir`, this serve's own (see serving/launch.py). Returns (cmd, env, Bento tag)."""
    from mnist_mlops import registry

    root = Path(root).resolve()
    try:
        tag = champion_bento(root)
    except UserError as exc:
        if not str(exc).startswith("no Bento"):
            raise
        on_build(f"{exc}; building it now")
        tag = package_champion(root)["bento"]
    if pin is not None:
        registry.get_version(pin)  # one line if there is no such version
    return launch_command(tag, host, port, metrics_dir), serve_env(root, pin, metrics_dir), tag


def quick_serve_command(root: Path, host: str, port: int, pin: str | None,
                        metrics_dir: Path) -> tuple[list[str], dict[str, str], str] | None:
    """`serve_command`'s answer without MLflow or BentoML, read from the project's sqlite store
    and the Bento store's folder; None whenever they cannot tell (another store, no Bento yet,
    an unknown version): then `serve_command` answers, with its one-line errors and its build."""
    from mnist_mlops.config import tracking_uri
    from mnist_mlops.platform import sqlite_registry

    root = Path(root).resolve()
    uri = tracking_uri(root)
    champion = sqlite_registry.alias_run(uri, MODEL_NAME, CHAMPION_ALIAS)
    if champion is None or (pin is not None and sqlite_registry.version_run(uri, MODEL_NAME, pin) is None):
        return None
    info = {"model_version": champion[0], "run_id": champion[1]}
    if not (bento_store() / BENTO_NAME / tag_version(info) / "bento.yaml").is_file():
        return None
    tag = bento_tag(info)
    return launch_command(tag, host, port, metrics_dir), serve_env(root, pin, metrics_dir), tag


def bento_store() -> Path:
    """Where BentoML keeps built Bentos: `$BENTOML_HOME/bentos` (default ~/bentoml)."""
    return Path(os.environ.get("BENTOML_HOME") or Path.home() / "bentoml") / "bentos"


def launch_command(tag: str, host: str, port: int, metrics_dir: Path) -> list[str]:
    return [sys.executable, "-m", "mnist_mlops.serving.launch", str(metrics_dir),
            "serve", tag, "--host", host, "--port", str(port)]


def serve_env(root: Path, pin: str | None, metrics_dir: Path) -> dict[str, str]:
    """The service's environment: the store, the `serve` params, follow or pin, its metrics folder."""
    from mnist_mlops.config import Paths, tracking_uri
    from mnist_mlops.serving.settings import (
        FEEDBACK_DIR_ENV,
        FOLLOW_ENV,
        FOLLOW_SECONDS_ENV,
        LOG_DIR_ENV,
        LOG_MAX_MB_ENV,
        LOG_ON_ENV,
        MIN_ACCURACY_ENV,
        PIN_ENV,
    )

    params, uri = load_params(root), tracking_uri(root)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           MIN_ACCURACY_ENV: repr(params.evaluate.min_accuracy),
           FOLLOW_SECONDS_ENV: repr(params.serve.follow_seconds),
           # The log and the labels live in the project (unless the environment says where).
           LOG_DIR_ENV: str(Paths(root).prediction_log),
           FEEDBACK_DIR_ENV: str(Paths(root).feedback),
           LOG_ON_ENV: "1" if params.serve.log_predictions else "0",
           LOG_MAX_MB_ENV: repr(params.serve.log_max_mb)}
    if env["MLFLOW_TRACKING_URI"].startswith("sqlite"):  # a fresh connection per poll: a moved or
        env.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")  # restored file is seen at once
    env.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as setup_mlflow: no URL, credentials and all
    env.pop("MLFLOW_EXPERIMENT_ID", None)  # the training experiment, as setup_mlflow left it: the service logs no runs
    env.pop(FOLLOW_ENV if pin else PIN_ENV, None)
    env.update({PIN_ENV: str(pin)} if pin else {FOLLOW_ENV: "1"})
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def serve_command_apart(root: Path, host: str, port: int, pin: str | None,
                        metrics_dir: Path) -> tuple[list[str], dict[str, str], str]:
    """`serve_command`, read at once when it can be (`quick_serve_command`), else worked out by
    a short-lived child process (`main` below).

    Finding (or building) the champion's Bento needs BentoML and MLflow: ~240 MiB that the
    `mnist-mlops serve` process would then hold for the server's whole life while it only
    waits for its child. The child exits once it has answered; its messages (a build) reach
    the terminal as they come, its one-line errors are this process's."""
    import json
    import tempfile

    from mnist_mlops.platform.processes import run_in_foreground, stop_requested

    if (quick := quick_serve_command(root, host, port, pin, metrics_dir)) is not None:
        return quick
    with tempfile.TemporaryDirectory(prefix="mnist-mlops-serve-") as tmp:
        answer_file = Path(tmp) / "serve.json"
        code = run_in_foreground([sys.executable, "-m", "mnist_mlops.serving.package", str(answer_file),
                                  str(root), host, str(port), pin or "", str(metrics_dir)], cwd=root)
        answer = json.loads(answer_file.read_text()) if answer_file.exists() else {}
    if stop_requested():
        raise KeyboardInterrupt
    if "error" in answer:
        raise UserError(answer["error"])
    if code or "cmd" not in answer:
        raise UserError(f"finding the champion's Bento failed (exit {code}): see the lines above")
    return answer["cmd"], answer["env"], answer["tag"]


def main(argv: list[str]) -> int:
    """`python -m mnist_mlops.serving.package ANSWER ROOT HOST PORT PIN METRICS_DIR`: serve_command's
    answer (or its UserError) written to ANSWER as JSON."""
    import json

    from mnist_mlops.platform.processes import handle_stop_signals
    from mnist_mlops.platform.tracking import quiet_env

    answer_file, root, host, port, pin, metrics_dir = argv
    quiet_env()
    handle_stop_signals()
    try:
        cmd, env, tag = serve_command(Path(root), host, int(port), pin or None, Path(metrics_dir),
                                      on_build=lambda message: print(message, file=sys.stderr, flush=True))
        answer: dict = {"cmd": cmd, "env": env, "tag": tag}
    except UserError as exc:
        answer = {"error": str(exc)}
    except KeyboardInterrupt:
        return 130
    Path(answer_file).write_text(json.dumps(answer))
    return 0 if "cmd" in answer else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
