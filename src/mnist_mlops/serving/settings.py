"""The serving side's settings: the Bento's build arguments and the environment contract.

Build arguments (`bentoml build --arg`, set by `mnist-mlops package` from params.yaml's `serve`
section) pick the model and the limits; they are baked into the Bento. The environment says,
at serve time, what each worker follows and where it keeps its records: `mnist-mlops serve`
sets it from params.yaml (serving/package.py), a container's own environment sets it by hand.
Every MNIST_MLOPS_* variable the service, the follower, the prediction log and the feedback
store read is named here; the two store locations are config's (`Paths` honours them too, for
the fetch step and the monitor), re-exported under the service's names.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnist_mlops.config import FEEDBACK_ENV, MODEL_NAME, PREDICTION_LOG_ENV, ServeParams
from mnist_mlops.platform.devices import gpu_count

FOLLOW_ENV = "MNIST_MLOPS_FOLLOW"                  # "1": follow the champion alias
PIN_ENV = "MNIST_MLOPS_PIN"                        # a registered version to serve, and only it
FOLLOW_SECONDS_ENV = "MNIST_MLOPS_FOLLOW_SECONDS"  # else serve.follow_seconds baked into the Bento
MIN_ACCURACY_ENV = "MNIST_MLOPS_MIN_ACCURACY"      # the canary's floor: evaluate.min_accuracy
LOG_DIR_ENV = PREDICTION_LOG_ENV                   # the prediction log (else ./logs/predictions)
LOG_ON_ENV = "MNIST_MLOPS_LOG_PREDICTIONS"         # "1"/"0", else serve.log_predictions
LOG_MAX_MB_ENV = "MNIST_MLOPS_LOG_MAX_MB"          # else serve.log_max_mb
FEEDBACK_DIR_ENV = FEEDBACK_ENV                    # the feedback store (else ./feedback)
API_KEY_ENV = "MNIST_MLOPS_API_KEY"                # set: every path but the open ones needs it
ALLOW_ANONYMOUS_ENV = "MNIST_MLOPS_ALLOW_ANONYMOUS_FEEDBACK"  # "1": beyond loopback without a key (warns)
OPEN_PREDICT_ENV = "MNIST_MLOPS_OPEN_PREDICT"      # "1": /predict and /predict_image need no key (the rest do)
# auto (the default): LiteRT on a CPU host for a version that has it, TensorFlow on a GPU host;
# `tensorflow` or `litert` chooses (a version without a LiteRT file is served by TensorFlow).
RUNTIME_ENV = "MNIST_MLOPS_RUNTIME"
# Benchmarks only: answer without running the model, to measure the HTTP stack's ceiling.
NOOP_MODEL_ENV = "MNIST_MLOPS_NOOP_MODEL"


class ServeArgs(ServeParams):
    """Build arguments: the model to serve plus params.yaml's `serve` section."""

    model: str = f"{MODEL_NAME}:latest"


def build_args() -> ServeArgs:
    """The build arguments BentoML holds now (its defaults outside a build or a Bento).

    Read by the service module itself each time it is imported: a build imports (and, on a
    second build in one process, reloads) only that module, so it must not be cached here.
    """
    import bentoml

    return bentoml.use_arguments(ServeArgs)


def service_config(args: ServeArgs) -> dict[str, Any]:
    """`@bentoml.service`'s arguments: one worker per GPU, one on CPU (TF uses every core)."""
    gpus = gpu_count()
    return {
        "name": "mnist_classifier",
        "workers": args.workers or max(1, gpus),
        "traffic": {"timeout": args.timeout_seconds},
        "metrics": {"enabled": True, "namespace": "bentoml_service"},
        **({"resources": {"gpu": gpus}} if gpus else {}),
    }


@dataclass(frozen=True)
class Runtime:
    """What the environment tells a worker at start, the build arguments filling the gaps."""

    follow: bool
    pin: str | None
    follow_seconds: float
    min_accuracy: float | None  # None: each version's own gate.min_accuracy tag (a container)
    log_dir: Path
    log_predictions: bool
    log_max_mb: float
    feedback_dir: Path
    noop_model: bool


def runtime(args: ServeArgs, environ: Mapping[str, str] = os.environ) -> Runtime:
    floor, on = environ.get(MIN_ACCURACY_ENV), environ.get(LOG_ON_ENV)
    return Runtime(
        follow=environ.get(FOLLOW_ENV) == "1",
        pin=environ.get(PIN_ENV) or None,
        follow_seconds=float(environ.get(FOLLOW_SECONDS_ENV) or args.follow_seconds),
        min_accuracy=float(floor) if floor else None,
        log_dir=Path(environ.get(LOG_DIR_ENV) or "logs/predictions").resolve(),
        log_predictions=args.log_predictions if on is None else on == "1",
        log_max_mb=float(environ.get(LOG_MAX_MB_ENV) or args.log_max_mb),
        feedback_dir=Path(environ.get(FEEDBACK_DIR_ENV) or "feedback").resolve(),
        noop_model=environ.get(NOOP_MODEL_ENV) == "1",
    )


def model_runtime(environ: Mapping[str, str] = os.environ) -> str:
    """What runs a version that has a LiteRT file: `litert` or `tensorflow` (see RUNTIME_ENV)."""
    chosen = environ.get(RUNTIME_ENV, "auto")
    if chosen not in ("auto", "litert", "tensorflow"):
        raise ValueError(f"{RUNTIME_ENV} must be auto, litert or tensorflow, not {chosen!r}")
    if chosen == "auto":
        return "tensorflow" if gpu_count() else "litert"
    return chosen


def api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, allow_anonymous: bool, environ: Mapping[str, str] = os.environ,
                     opt_out: str = "pass --allow-anonymous-feedback", subject: str = "") -> str | None:
    """No anonymous writes beyond this machine: a bind other than loopback needs $MNIST_MLOPS_API_KEY
    (every label sent to /feedback becomes training data), unless the user says so; then the
    warning to print. None when there is nothing to warn about."""
    from mnist_mlops.errors import UserError

    if is_loopback(host) or api_key(environ):
        return None
    if not allow_anonymous:
        key_hint = f"export {API_KEY_ENV}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        raise UserError(f"{subject or '--host ' + host} serves beyond this machine and /feedback would take "
                        f"training labels from anyone: set {API_KEY_ENV} ({key_hint}), or {opt_out}")
    how = opt_out.removeprefix("pass ").removeprefix("set ")
    return (f"warning: serving on {host} without {API_KEY_ENV} ({how}): anyone who reaches it can predict "
            "and send labels that become training data")


def open_predict(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(OPEN_PREDICT_ENV) == "1"


def bound_host(argv: Sequence[str] = sys.argv) -> str | None:
    """The address this BentoML worker's HTTP socket is bound to, None outside a worker.

    `bentoml serve` binds 0.0.0.0 unless told otherwise (a container always does), and hands
    each worker the listening socket as `--fd N`: its address is the bind, however it was set.
    """
    try:
        fd = int(argv[list(argv).index("--fd") + 1])
        with socket.socket(fileno=os.dup(fd)) as sock:
            return str(sock.getsockname()[0])
    except (ValueError, IndexError, OSError):
        return None


def worker_exposure(environ: Mapping[str, str] = os.environ) -> str | None:
    """The worker's own check of its bind (a Bento or a container started without `mnist-mlops
    serve`): the same rule as `serve --host`; raises UserError, or returns the warning."""
    host = bound_host()
    if host is None:
        return None
    return exposure_warning(host, environ.get(ALLOW_ANONYMOUS_ENV) == "1", environ,
                            opt_out=f"set {ALLOW_ANONYMOUS_ENV}=1", subject=f"this server, bound to {host},")


def refuse_anonymous_exposure(logger) -> None:
    """In a worker: stop the whole server when it is bound beyond loopback without a key and
    without the explicit opt-out (one line; the worker's parent, BentoML's process manager,
    would otherwise restart it forever); warn when opted out."""
    import signal

    from mnist_mlops.errors import UserError

    try:
        warning = worker_exposure()
    except UserError as exc:
        logger.error("refusing to start: %s", exc)
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(2)
    if warning:
        logger.warning("%s", warning)
