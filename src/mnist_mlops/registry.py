"""The MLflow registry: the champion gate, manual promotion and rollback.

The champion is an alias (`mnist-convnet@champion`); stages are deprecated and unused.
Each decision leaves tags on the version it concerns, so the UI shows why a version was
promoted or rejected, and which version it replaced (what `rollback` goes back to).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.errors import UserError

TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_PREVIOUS = "gate.previous_champion"


@dataclass(frozen=True)
class Decision:
    version: str
    promoted: bool
    reason: str
    accuracy: float | None = None
    champion_accuracy: float | None = None
    previous_champion: str | None = None


def client():
    import mlflow

    return mlflow.MlflowClient()


def champion_version() -> str | None:
    """The version holding the champion alias, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def require_champion() -> str:
    version = champion_version()
    if version is None:
        raise UserError(f"no champion yet: run `mnist-mlops run` to train and promote '{MODEL_NAME}'")
    return version


def get_version(version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client().get_model_version(MODEL_NAME, str(version))
    except MlflowException:
        raise UserError(f"model '{MODEL_NAME}' has no version {version}") from None


def rescore(version: str, x: np.ndarray, y: np.ndarray):
    """Load a registered version and score it on the given test data (never trust old runs)."""
    import mlflow

    from mnist_mlops.training.evaluate import probabilities, score

    model = mlflow.keras.load_model(f"models:/{MODEL_NAME}/{version}",
                                    load_model_kwargs={"safe_mode": True, "compile": False})
    return score(probabilities(model, x), y)


def _set_alias(version: str, reason: str, previous: str | None) -> None:
    c = client()
    if previous and previous != version:
        c.set_model_version_tag(MODEL_NAME, version, TAG_PREVIOUS, previous)
    c.set_model_version_tag(MODEL_NAME, version, TAG_DECISION, "promoted")
    c.set_model_version_tag(MODEL_NAME, version, TAG_REASON, reason)
    c.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)


def _reject(version: str, reason: str) -> None:
    c = client()
    c.set_model_version_tag(MODEL_NAME, version, TAG_DECISION, "rejected")
    c.set_model_version_tag(MODEL_NAME, version, TAG_REASON, reason)


def gate(version: str, x: np.ndarray, y: np.ndarray, min_accuracy: float) -> Decision:
    """Promote `version` iff it clears the floor and is not worse than the champion re-scored."""
    existing = get_version(version).tags.get(TAG_DECISION)
    if existing:
        reason = get_version(version).tags.get(TAG_REASON, "")
        return Decision(version, existing == "promoted", f"already decided: {reason}")
    candidate = rescore(version, x, y)
    acc = candidate.accuracy
    if not candidate.finite:
        reason = "model outputs NaN or infinite values"
        _reject(version, reason)
        return Decision(version, False, reason, acc)
    if acc < min_accuracy:
        reason = f"test accuracy {acc:.4f} below the floor evaluate.min_accuracy={min_accuracy}"
        _reject(version, reason)
        return Decision(version, False, reason, acc)
    current = champion_version()
    if current is None:
        reason = f"first model above the floor ({acc:.4f} >= {min_accuracy})"
        _set_alias(version, reason, None)
        return Decision(version, True, reason, acc)
    if current == version:
        return Decision(version, True, "already champion", acc)
    champ = rescore(current, x, y)
    if acc < champ.accuracy:
        reason = f"test accuracy {acc:.4f} worse than champion v{current} ({champ.accuracy:.4f}) on the same test data"
        _reject(version, reason)
        return Decision(version, False, reason, acc, champ.accuracy, current)
    reason = f"test accuracy {acc:.4f} >= champion v{current} ({champ.accuracy:.4f}) on the same test data"
    _set_alias(version, reason, current)
    return Decision(version, True, reason, acc, champ.accuracy, current)


def promote(version: str, x: np.ndarray | None, y: np.ndarray | None, min_accuracy: float,
            force: bool = False) -> Decision:
    """Manual override: champion := version, still refusing one below the floor unless forced."""
    current = champion_version()
    get_version(version)
    acc = None
    if x is not None and y is not None:
        result = rescore(version, x, y)
        acc = result.accuracy
        if (not result.finite or acc < min_accuracy) and not force:
            raise UserError(
                f"version {version} scores {acc:.4f}, below the floor evaluate.min_accuracy="
                f"{min_accuracy}: refusing (use --force to override)"
            )
    reason = "manual promotion" + (" (forced)" if force else "")
    _set_alias(version, reason, current)
    return Decision(version, True, reason, acc, previous_champion=current)


def rollback() -> Decision:
    """Move the champion back to the version it replaced."""
    current = require_champion()
    previous = get_version(current).tags.get(TAG_PREVIOUS)
    if not previous:
        raise UserError(f"champion v{current} replaced no earlier version: nothing to roll back to")
    c = client()
    c.set_model_version_tag(MODEL_NAME, current, TAG_DECISION, "rolled_back")
    c.set_model_version_tag(MODEL_NAME, current, TAG_REASON, f"rolled back to v{previous}")
    c.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, previous)
    return Decision(previous, True, f"rolled back from v{current}", previous_champion=current)


def test_data(prepared: Path) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    from mnist_mlops.training.prepare import load_split

    try:
        split = load_split(prepared, "test")
    except UserError:
        return None, None
    return split.x, split.y
