"""Follow the champion: every worker watches the registry alias and swaps models without a restart.

TensorFlow Serving's availability-preserving policy, on one machine: a new champion is
loaded *beside* the one answering (its LiteRT file, mnist_mlops.litert; or, on a GPU host or
for a version without one, the Keras file in safe mode, its `tf.function` traced), and a canary
run on labelled digits shipped with the service (`canary.npz`); only a version whose canary
score is consistent with its own recorded accuracy and the floor replaces the reference the
request path reads, in one assignment. A request therefore meets either the old model or the
new one, whole, and its answer names the version that computed it. A version that fails to
load or fails the canary is never served: the old one stays, one log line and a metric say
why, `/model` shows the error, and the next alias change is tried afresh; one whose artifacts
could not be fetched (a blip) is tried again with backoff. An unreachable registry keeps the
current model serving, logs once, and is polled again until it answers.

Each BentoML worker is its own process, so each runs its own follower: nothing depends on a
request reaching a particular worker. Polling (`get_model_version_by_alias`) works with the
sqlite store and with a tracking server alike; MLflow's registry webhooks are experimental,
server-only and fire-and-forget (see DESIGN.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.platform.tracking import first_line
from mnist_mlops.preprocess import INPUT_SHAPE, normalize
from mnist_mlops.serving.package import KERAS_IN_MLFLOW_MODEL

logger = logging.getLogger("mnist_mlops.serving.follow")
# MLflow's sqlite store logs a multi-line ERROR on every failed query: an unreachable store
# would print one per poll. The follower says it once, and says when the store is back.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# The canary: the first 20 digits of each class in the base test split of the sample (prepare's
# default split), uint8 as stored in data/: 200 labelled digits no version ever trained on.
CANARY_FILE = Path(__file__).resolve().parent / "canary.npz"


@dataclass(frozen=True)
class LoadedModel:
    """One model, ready to answer: what the request path reads, swapped whole."""

    version: str
    run_id: str
    forward: Callable[[np.ndarray], np.ndarray]
    source: str
    runtime: str = "tensorflow"  # or "litert" (mnist_mlops.litert)
    data_md5: str | None = None
    test_accuracy: float | None = None
    canary_accuracy: float | None = None
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


class ReloadError(Exception):
    """A version that is not served now: `transient` (its artifacts could not be fetched: a
    network blip, a store restarting) is tried again with backoff; otherwise it cannot be served
    at all (unloadable, or its canary digits say it is not the model its record says) and is
    refused until the alias moves again."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


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


def canary_correct(forward: Callable[[np.ndarray], np.ndarray]) -> tuple[int, int]:
    """(correct, n) on the canary digits; a model answering NaN gets none right."""
    images, labels = canary_digits()
    probs = forward(normalize(images))
    if not np.isfinite(probs).all():
        return 0, len(labels)
    return int((probs.argmax(axis=1) == labels).sum()), len(labels)


CANARY_P = 0.001  # a canary this unlikely under the version's own accuracy means: not that model


def canary_verdict(version: str, correct: int, n: int, recorded: float | None, floor: float | None) -> str | None:
    """Why the canary refuses a version (None: it passes).

    200 digits measure accuracy to about ±2 points, so a champion near the floor would fail a
    raw comparison by chance. The canary asks two questions that do not misfire: is the score
    far below the version's own recorded test accuracy (exact one-sided binomial test at
    `CANARY_P`), and is even the upper end of its 99.9 % Wilson interval below the floor?
    """
    from scipy import stats

    score = correct / n
    if recorded is not None:
        p = stats.binomtest(correct, n, min(max(recorded, 1e-6), 1.0), alternative="less").pvalue
        if p < CANARY_P:
            return (f"v{version} scores {score:.3f} on the {n} canary digits, far below its recorded test accuracy "
                    f"{recorded:.4f} (binomial p={p:.1g} < {CANARY_P})")
    if floor is not None:
        high = stats.binomtest(correct, n).proportion_ci(1 - CANARY_P, method="wilson").high
        if high < floor:
            return (f"v{version} scores {score:.3f} on the {n} canary digits (99.9% CI up to {high:.3f}), below the "
                    f"floor evaluate.min_accuracy={floor}")
    if recorded is None and floor is None:
        return f"v{version} has no recorded test accuracy and no gate.min_accuracy: nothing to check its canary against"
    return None


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


def load_version(version: str, min_accuracy: float | None) -> LoadedModel:
    """Load a registered version beside the current one and check it; ReloadError if unfit.

    The floor is `min_accuracy` (the service's evaluate.min_accuracy) or, when the service was
    started without one (a container), the floor the gate recorded on the version.
    """
    import mlflow

    from mnist_mlops import litert
    from mnist_mlops.scoring import load_keras
    from mnist_mlops.serving.settings import model_runtime

    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(MODEL_NAME, version)
        runtime = model_runtime() if mv.tags.get(litert.TAG) else "tensorflow"
        local = Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=mv.tags[litert.TAG])
                     if runtime == "litert" else
                     mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL_NAME}/{version}"))
    except Exception as exc:  # noqa: BLE001 - the store or its artifacts did not answer: try again later
        raise ReloadError(f"v{version} cannot be fetched now: {first_line(exc, named=True)}", transient=True) from None
    try:
        forward = (litert.Forward.from_file(local) if runtime == "litert"
                   else compile_forward(load_keras(local / KERAS_IN_MLFLOW_MODEL)))
    except Exception as exc:  # noqa: BLE001 - any failure to load the file means: not servable
        raise ReloadError(f"v{version} cannot be loaded: {first_line(exc, named=True)}") from None
    tags = mv.tags
    recorded = _tag_float(tags, "test_accuracy")
    floor = min_accuracy if min_accuracy is not None else _tag_float(tags, "gate.min_accuracy")
    correct, n = canary_correct(forward)
    if why := canary_verdict(str(version), correct, n, recorded, floor):
        raise ReloadError(why)
    return LoadedModel(version=str(version), run_id=str(mv.run_id), forward=forward, source="registry",
                       runtime=runtime, data_md5=tags.get("data.md5"), canary_accuracy=correct / n,
                       test_accuracy=recorded)


def champion_version() -> str:
    """The version the champion alias names; raises when the registry cannot say.

    Not `registry.champion_version`, which answers None for any MlflowException: the follower
    must tell "no answer" (keep serving, log why, poll again) from a version, and log the cause.
    """
    import mlflow

    return str(mlflow.MlflowClient().get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)


@dataclass
class FollowerState:
    """What /model reports about following (besides the model that answers)."""

    last_error: str | None = None
    registry_reachable: bool = True
    champion: str | None = None  # the version the alias names, as last read
    refused: str | None = None  # a version that cannot be served: not tried again until the alias moves
    retry_at: float | None = None  # monotonic time of the next try of a version that failed transiently

    def behind(self, serving: str) -> bool:
        """The alias names a version this worker does not serve (refused, or not loaded yet)."""
        return self.champion is not None and self.champion != serving


MAX_BACKOFF_SECONDS = 300.0


@functools.cache
def follower_metrics() -> dict:
    """Follow-mode metrics, per worker (BentoML serves them at /metrics, multiprocess-aware).

    Made once per process, on first use: Prometheus refuses a metric registered twice.
    """
    from prometheus_client import Counter, Gauge, Histogram

    return {
        "version": Gauge("mnist_served_model_version", "registered version this worker serves",
                         multiprocess_mode="liveall"),
        "reloads": Counter("mnist_model_reloads_total", "champion changes loaded and swapped in"),
        "failures": Counter("mnist_model_reload_failures_total",
                            "failed loads: refused (unloadable, failing the canary) or to be retried"),
        "behind": Gauge("mnist_follower_behind", "1 while the champion alias names a version this worker does "
                        "not serve (refused, or being retried)", multiprocess_mode="liveall"),
        "seconds": Histogram("mnist_model_reload_seconds", "seconds to load, trace and check a new version",
                             buckets=(0.5, 1, 2, 5, 10, 20, 40, 80)),
    }


class ChampionFollower:
    """Polls the alias; on a change loads, checks and hands the new model to `swap`.

    A version whose artifacts cannot be fetched is tried again with exponential backoff (from
    the poll interval up to `MAX_BACKOFF_SECONDS`); one that cannot be served is refused until
    the alias moves.
    """

    def __init__(self, current: Callable[[], LoadedModel], swap: Callable[[LoadedModel], None],
                 every_seconds: float, min_accuracy: float | None, metrics: dict | None = None) -> None:
        self.current, self.swap = current, swap
        self.every, self.min_accuracy = every_seconds, min_accuracy
        self.metrics = metrics or {}
        self.state = FollowerState()
        self._attempts = 0  # transient failures of the version the alias names

    async def run(self) -> None:
        """Poll forever (cancelled on shutdown); blocking work runs in a thread."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await asyncio.to_thread(self.poll_once)
            except Exception as exc:  # noqa: BLE001 - the follower must never die
                logger.exception("champion follower: unexpected error: %s", first_line(exc, named=True))

    def poll_once(self) -> None:
        try:
            wanted = champion_version()
        except Exception as exc:  # noqa: BLE001 - unreachable store, or no champion any more
            if self.state.registry_reachable:
                logger.warning("champion follower: registry unreachable (%s): serving v%s until it answers",
                               first_line(exc, named=True), self.current().version)
            self.state.registry_reachable = False
            return
        if not self.state.registry_reachable:
            logger.info("champion follower: registry reachable again (champion v%s)", wanted)
        self.state.registry_reachable = True
        if wanted != self.state.champion:  # the alias moved: a fresh start for the new version
            self.state.champion, self.state.refused, self.state.retry_at, self._attempts = wanted, None, None, 0
        self._set("behind", float(self.state.behind(self.current().version)))
        if wanted == self.current().version or wanted == self.state.refused:
            return
        if self.state.retry_at is not None and time.monotonic() < self.state.retry_at:
            return
        self.reload(wanted)

    def reload(self, version: str) -> None:
        started = time.perf_counter()
        old = self.current().version
        try:
            loaded = load_version(version, self.min_accuracy)
        except ReloadError as exc:
            self._refuse(version, old, exc)
            return
        self.state.retry_at, self._attempts = None, 0
        seconds = time.perf_counter() - started
        # Counted before the swap: whoever sees the new model on /model finds it on /metrics too.
        self._count("reloads")
        if "seconds" in self.metrics:
            self.metrics["seconds"].observe(seconds)
        self._set("version", float(version) if version.isdigit() else -1)
        self._set("behind", 0.0)
        self.swap(loaded)
        logger.info("champion follower: now serving v%s (was v%s), loaded and checked in %.1f s "
                    "(canary accuracy %.3f)", version, old, seconds, loaded.canary_accuracy or 0.0)

    def _refuse(self, version: str, old: str, exc: ReloadError) -> None:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self._count("failures")
        if exc.transient:
            self._attempts += 1
            delay = min(self.every * 2 ** self._attempts, MAX_BACKOFF_SECONDS)
            self.state.retry_at = time.monotonic() + delay
            self.state.last_error = f"{now} {exc}; retrying in {delay:.0f} s (attempt {self._attempts + 1})"
            logger.warning("champion follower: not serving %s; v%s keeps answering, retry in %.0f s", exc, old, delay)
        else:
            self.state.refused, self.state.retry_at = version, None
            self.state.last_error = f"{now} {exc}; refused until the alias moves"
            logger.error("champion follower: not serving %s; v%s keeps answering", exc, old)

    def _count(self, name: str) -> None:
        if name in self.metrics:
            self.metrics[name].inc()

    def _set(self, name: str, value: float) -> None:
        if name in self.metrics:
            self.metrics[name].set(value)
