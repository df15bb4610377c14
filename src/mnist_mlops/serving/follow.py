"""Follow the champion: every worker watches the registry alias and swaps models without a restart.

TensorFlow Serving's availability-preserving policy, on one machine: a new champion is
loaded *beside* the one answering (Keras safe mode), its `tf.function` traced, and a canary
run on labelled digits shipped with the service (`canary.npz`); only a version that scores at
least the accuracy floor there replaces the reference the request path reads, in one
assignment. A request therefore meets either the old model or the new one, whole, and its
answer names the version that computed it. A version that fails to load or fails the canary
is never served: the old one stays, one log line and a metric say why, `/model` shows the
error, and the next alias change is tried afresh. An unreachable registry keeps the current
model serving, logs once, and is polled again until it answers.

Each BentoML worker is its own process, so each runs its own follower: nothing depends on a
request reaching a particular worker. Polling (`get_model_version_by_alias`) works with the
sqlite store and with a tracking server alike; MLflow's registry webhooks are experimental,
server-only and fire-and-forget (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.preprocess import INPUT_SHAPE, normalize

logger = logging.getLogger("mnist_mlops.serving.follow")
# MLflow's sqlite store logs a multi-line ERROR on every failed query: an unreachable store
# would print one per poll. The follower says it once, and says when the store is back.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# The canary: the first 20 digits of each class in the base test split of the sample (prepare's
# default split), uint8 as stored in data/: 200 labelled digits no version ever trained on.
CANARY_FILE = Path(__file__).resolve().parent / "canary.npz"
KERAS_IN_MLFLOW_MODEL = "data/model.keras"  # the mlflow.keras flavor's file inside a logged model
# How `mnist-mlops serve` tells the service what to serve (params.yaml is read at serve time):
FOLLOW_ENV = "MNIST_MLOPS_FOLLOW"                  # "1": follow the champion alias
PIN_ENV = "MNIST_MLOPS_PIN"                        # a registered version to serve, and only it
FOLLOW_SECONDS_ENV = "MNIST_MLOPS_FOLLOW_SECONDS"  # else serve.follow_seconds baked into the Bento
MIN_ACCURACY_ENV = "MNIST_MLOPS_MIN_ACCURACY"      # the canary's floor: evaluate.min_accuracy


@dataclass(frozen=True)
class LoadedModel:
    """One model, ready to answer: what the request path reads, swapped whole."""

    version: str
    run_id: str
    forward: Callable[[np.ndarray], np.ndarray]
    source: str
    data_md5: str | None = None
    test_accuracy: float | None = None
    canary_accuracy: float | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class ReloadError(Exception):
    """A version that cannot be served (unloadable, or below the floor on the canary)."""


def compile_forward(model) -> Callable[[np.ndarray], np.ndarray]:
    """One `tf.function` for any batch size (never `model.predict`: ~50 ms a call), traced now."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, *INPUT_SHAPE], tf.float32)], reduce_retracing=True)
    def forward(x):
        return model(x, training=False)

    def run(x: np.ndarray) -> np.ndarray:
        return forward(x).numpy()

    run(np.zeros((1, *INPUT_SHAPE), np.float32))
    return run


def canary_digits() -> tuple[np.ndarray, np.ndarray]:
    """The labelled digits every new version must classify (uint8 N×28×28, labels N)."""
    with np.load(CANARY_FILE, allow_pickle=False) as npz:
        return npz["images"], npz["labels"]


def canary_accuracy(forward: Callable[[np.ndarray], np.ndarray]) -> float:
    images, labels = canary_digits()
    probs = forward(normalize(images))
    if not np.isfinite(probs).all():
        return 0.0
    return float((probs.argmax(axis=1) == labels).mean())


def load_version(version: str, min_accuracy: float) -> LoadedModel:
    """Load a registered version beside the current one and check it; ReloadError if unfit."""
    import mlflow

    from mnist_mlops.scoring import load_keras

    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(MODEL_NAME, version)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL_NAME}/{version}"))
        model = load_keras(local / KERAS_IN_MLFLOW_MODEL)
        forward = compile_forward(model)
    except Exception as exc:  # noqa: BLE001 - any failure to load means: not servable
        raise ReloadError(f"v{version} cannot be loaded: {one_line(exc)}") from None
    accuracy = canary_accuracy(forward)
    if accuracy < min_accuracy:
        raise ReloadError(f"v{version} scores {accuracy:.3f} on the canary digits, below the floor "
                          f"evaluate.min_accuracy={min_accuracy}")
    tags = mv.tags
    return LoadedModel(version=str(version), run_id=str(mv.run_id), forward=forward, source="registry",
                       data_md5=tags.get("data.md5"), canary_accuracy=accuracy,
                       test_accuracy=float(tags["test_accuracy"]) if "test_accuracy" in tags else None)


def champion_version() -> str:
    import mlflow

    return str(mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@dataclass
class FollowerState:
    """What /model reports about following (besides the model that answers)."""

    last_error: str | None = None
    last_check: str | None = None
    registry_reachable: bool = True


class ChampionFollower:
    """Polls the alias; on a change loads, checks and hands the new model to `swap`."""

    def __init__(self, current: Callable[[], LoadedModel], swap: Callable[[LoadedModel], None],
                 every_seconds: float, min_accuracy: float, metrics: dict | None = None) -> None:
        self.current, self.swap = current, swap
        self.every, self.min_accuracy = every_seconds, min_accuracy
        self.metrics = metrics or {}
        self.state = FollowerState()
        self._failed: str | None = None  # the version that failed: retried only after another change

    async def run(self) -> None:
        """Poll forever (cancelled on shutdown); blocking work runs in a thread."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception as exc:  # noqa: BLE001 - the follower must never die
                logger.exception("champion follower: unexpected error: %s", one_line(exc))

    def poll_once(self) -> None:
        try:
            wanted = champion_version()
        except Exception as exc:  # noqa: BLE001 - unreachable store, or no champion any more
            if self.state.registry_reachable:
                logger.warning("champion follower: registry unreachable (%s): serving v%s until it answers",
                               one_line(exc), self.current().version)
            self.state.registry_reachable = False
            return
        if not self.state.registry_reachable:
            logger.info("champion follower: registry reachable again (champion v%s)", wanted)
        self.state.registry_reachable = True
        self.state.last_check = datetime.now(UTC).isoformat(timespec="seconds")
        if wanted == self.current().version:
            self._failed = None
            return
        if wanted == self._failed:
            return
        self._failed = None
        self.reload(wanted)

    def reload(self, version: str) -> None:
        started = time.perf_counter()
        old = self.current().version
        try:
            loaded = load_version(version, self.min_accuracy)
        except ReloadError as exc:
            self._failed = version
            self.state.last_error = f"{datetime.now(UTC).isoformat(timespec='seconds')} {exc}"
            self._count("failures")
            logger.error("champion follower: not serving %s; v%s keeps answering", exc, old)
            return
        self.swap(loaded)
        seconds = time.perf_counter() - started
        self._count("reloads")
        if "seconds" in self.metrics:
            self.metrics["seconds"].observe(seconds)
        if "version" in self.metrics:
            self.metrics["version"].set(float(version) if version.isdigit() else -1)
        logger.info("champion follower: now serving v%s (was v%s), loaded and checked in %.1f s "
                    "(canary accuracy %.3f)", version, old, seconds, loaded.canary_accuracy or 0.0)

    def _count(self, name: str) -> None:
        if name in self.metrics:
            self.metrics[name].inc()
