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
from collections.abc import Mapping
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


def api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warning(host: str, allow_anonymous: bool, environ: Mapping[str, str] = os.environ) -> str | None:
    """No anonymous writes beyond this machine: a bind other than loopback needs $MNIST_MLOPS_API_KEY
    (every label sent to /feedback becomes training data), unless the user says so; then the
    warning to print. None when there is nothing to warn about."""
    from mnist_mlops.errors import UserError

    if is_loopback(host) or api_key(environ):
        return None
    if not allow_anonymous:
        raise UserError(f"--host {host} serves beyond this machine and /feedback would take training labels from "
                        f"anyone: set {API_KEY_ENV} (export {API_KEY_ENV}=$(python3 -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))')), or pass --allow-anonymous-feedback")
    return (f"warning: serving on {host} without {API_KEY_ENV} (--allow-anonymous-feedback): anyone who reaches "
            "it can predict and send labels that become training data")
