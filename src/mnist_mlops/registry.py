"""The MLflow registry: the champion gate, manual promotion and rollback.

The champion is an alias (`mnist-convnet@champion`); stages are deprecated and unused.
Each decision leaves tags on the version it concerns, so the UI shows why a version was
promoted or rejected, and which version it replaced (what `rollback` goes back to).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mnist_mlops.config import CHAMPION_ALIAS, MODEL_NAME
from mnist_mlops.errors import UserError
from mnist_mlops.model_file import TAG_WEIGHTS  # one version per trained model

TAG_DECISION = "gate.decision"
TAG_REASON = "gate.reason"
TAG_PREVIOUS = "gate.previous_champion"
MODEL_DESCRIPTION = (
    "The MNIST ConvNet (tf.keras Conv2D 3×3 / MaxPooling2D 2×2 blocks, softmax over 10 digits), "
    "trained by the mnist-mlops Prefect flow on the data version pinned by data.dvc. Every training "
    "registers one version per trained model; the alias `champion` is what the service serves. A version "
    "becomes champion only if its test accuracy clears evaluate.min_accuracy and it is not worse than the "
    "current champion re-scored on the same test data and slices, and better somewhere (a tie keeps the "
    "champion); each version's description and gate.* tags "
    "say what was decided and why. `mnist-mlops promote` / `rollback` move the alias by hand."
)
TAG_FLOOR = "gate.min_accuracy"  # the floor a decision was made under: a new floor re-gates
TOLERANCES = {"robust": "evaluate.max_robust_drop", "foreign": "evaluate.max_foreign_drop"}  # slice -> its param


@dataclass(frozen=True)
class Decision:
    """What the gate (or promote) made of a version. `promoted`: it is, or is let through to be,
    champion; `changed`: this call moved the alias to it; `earlier`: the decision reported was
    made before (promoted, rejected or rolled_back), so nothing was decided now."""

    version: str
    promoted: bool
    reason: str
    accuracy: float | None = None
    champion_accuracy: float | None = None
    previous_champion: str | None = None
    changed: bool = False
    earlier: str | None = None
    slice: str | None = None  # the set the gate's decision turned on (`Ruling.slice`)


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
    return rescore_on(version, {"test": (x, y)})["test"]


def load_version(version: str):
    """A registered version's Keras model (safe mode: loading never runs code from the file)."""
    import mlflow

    return mlflow.keras.load_model(f"models:/{MODEL_NAME}/{version}",
                                   load_model_kwargs={"safe_mode": True, "compile": False})


def rescore_on(version: str, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Load a registered version once and score it on each named (x, y) set that holds digits."""
    from mnist_mlops.scoring import probabilities, score

    model = load_version(version)
    return {name: score(probabilities(model, x), y) for name, (x, y) in sets.items() if len(y)}


def probabilities_of(version: str, images: np.ndarray) -> np.ndarray:
    """A registered version's class probabilities for uint8 28×28 digits (N×10)."""
    from mnist_mlops.preprocess import normalize
    from mnist_mlops.scoring import probabilities

    return probabilities(load_version(version), normalize(images))


def describe_version(version: str, gate_line: str) -> None:
    """The version page's description: what the version is, and what the gate made of it."""
    tags = get_version(version).tags
    text = (f"mnist-convnet v{version}, trained on data version {tags.get('data.md5', 'unknown')} "
            f"(data.dvc); test accuracy {tags.get('test_accuracy', 'n/a')}, robust accuracy "
            f"{tags.get('robust_accuracy', 'n/a')}, foreign accuracy {tags.get('foreign_accuracy', 'n/a')} "
            f"(worst class {tags.get('foreign_worst_class', 'n/a')}).\n\n{gate_line}")
    client().update_model_version(MODEL_NAME, version, description=text)


def _decide(version: str, decision: str, reason: str, floor: float | None) -> None:
    c = client()
    c.set_model_version_tag(MODEL_NAME, version, TAG_DECISION, decision)
    c.set_model_version_tag(MODEL_NAME, version, TAG_REASON, reason)
    if floor is not None:
        c.set_model_version_tag(MODEL_NAME, version, TAG_FLOOR, repr(float(floor)))
    describe_version(version, f"Gate: {decision.replace('_', ' ')}: {reason}.")


def _set_alias(version: str, reason: str, previous: str | None, floor: float | None = None) -> None:
    if previous and previous != version:
        client().set_model_version_tag(MODEL_NAME, version, TAG_PREVIOUS, previous)
    _decide(version, "promoted", reason, floor)
    client().set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version)


def _reject(version: str, reason: str, floor: float) -> None:
    _decide(version, "rejected", reason, floor)


def _decided_under(tags: dict[str, str], floor: float) -> bool:
    """A decision stands while the floor it was made under is the floor now."""
    try:
        return float(tags.get(TAG_FLOOR, "nan")) == float(floor)
    except ValueError:
        return False


@dataclass(frozen=True)
class Comparison:
    """Challenger vs the re-scored champion on one set (the base test split or a slice)."""

    name: str
    mine: float
    theirs: float
    digits: int
    tolerance: float = 0.0  # a slice named in the gate's tolerances refuses only a larger drop

    @property
    def worse(self) -> bool:
        return self.theirs - self.mine > self.tolerance if self.tolerance else self.mine < self.theirs

    @property
    def better(self) -> bool:
        return self.mine > self.theirs

    def sentence(self, champion: str) -> str:
        where = "the same test data" if self.name == "test" else f"the {self.name} slice ({self.digits} digits)"
        line = f"{self.name} accuracy {self.mine:.4f}"
        them = f"champion v{champion} ({self.theirs:.4f})"
        if self.tolerance and self.worse:
            return (f"{line} is {self.theirs - self.mine:.4f} below {them} on {where}: "
                    f"a drop of more than {TOLERANCES.get(self.name, 'the tolerance')}={self.tolerance}")
        if self.tolerance:
            return f"{line} within {self.tolerance} of {them} on {where}"
        if self.worse:
            return f"{line} worse than {them} on {where}"
        return f"{line} {'>' if self.better else '='} {them} on {where}"


@dataclass(frozen=True)
class Verdict:
    """What the gate made of a challenger that cleared the floor, against a champion."""

    comparisons: list[Comparison]

    @property
    def worse(self) -> list[Comparison]:
        return [c for c in self.comparisons if c.worse]

    @property
    def passed(self) -> bool:
        """Not worse anywhere, and better somewhere: a tie keeps the champion (and its followers)."""
        return not self.worse and any(c.better for c in self.comparisons)

    def reason(self, champion: str) -> str:
        if self.worse:
            return "; ".join(c.sentence(champion) for c in self.worse)
        text = "; ".join(c.sentence(champion) for c in self.comparisons)
        return text if self.passed else f"ties champion v{champion} ({text}): the champion stays"


def register(run_id: str, model_uri: str, weights_md5: str, tags: dict[str, str]) -> str:
    """The registered version of this trained model: registered once per run and weights, so
    an evaluate stage that re-runs (a code change) never adds a version of the same model."""
    import mlflow

    for mv in client().search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'"):
        if mv.tags.get(TAG_WEIGHTS) == weights_md5:
            return str(mv.version)
    mv = mlflow.register_model(model_uri, MODEL_NAME, tags={**tags, TAG_WEIGHTS: weights_md5})
    version = str(mv.version)
    client().update_registered_model(MODEL_NAME, description=MODEL_DESCRIPTION)
    describe_version(version, "Gate: not decided yet (the flow's promote step decides).")
    return version


@dataclass(frozen=True)
class Ruling:
    """What the gate decided about a challenger, before anything is written. `passed`: it is, or
    stays, let through; `slice`: the set the decision turned on (`test` for the floor, the first
    slice it is worse on; None when no set refused it); `reason`: the sentence, built from them.
    `action` is what the registry records: `crown` (move the champion alias to it), `reject`,
    or `keep` (it is champion already: its decision is re-recorded under this floor)."""

    passed: bool
    reason: str
    action: str
    slice: str | None = None


def _floor_ruling(version: str, result, min_accuracy: float, current: str | None) -> Ruling | None:
    """The ruling on a model with NaN outputs, under the floor, first above it or already champion
    (None: it clears the floor and a champion stands to compare it with)."""
    acc = result.accuracy
    if not result.finite:
        return Ruling(False, "model outputs NaN or infinite values", "reject", "test")
    if acc < min_accuracy:
        reason = f"test accuracy {acc:.4f} below the floor evaluate.min_accuracy={min_accuracy}"
        if current == version:
            return Ruling(False, reason + " (it stays champion: a floor blocks promotions, it never demotes)",
                          "keep", "test")
        return Ruling(False, reason, "reject", "test")
    if current is None:
        return Ruling(True, f"first model above the floor ({acc:.4f} >= {min_accuracy})", "crown")
    if current == version:
        return Ruling(True, f"already champion; it clears the floor evaluate.min_accuracy={min_accuracy} "
                      f"({acc:.4f})", "keep")
    return None


def _compare_ruling(verdict: Verdict, champion: str) -> Ruling:
    """The ruling of the comparison with the re-scored champion on the test split and every slice."""
    worse = verdict.worse
    return Ruling(verdict.passed, verdict.reason(champion), "crown" if verdict.passed else "reject",
                  worse[0].name if worse else None)


def _record(version: str, ruling: Ruling, min_accuracy: float, current: str | None, tags: dict[str, str]) -> None:
    """Write the ruling to the registry: tags, description and, for `crown`, the champion alias."""
    if ruling.action == "crown":
        _set_alias(version, ruling.reason, current, min_accuracy)
    elif ruling.action == "keep":  # the champion's own reason stands; only the floor is new
        _decide(version, "promoted", tags.get(TAG_REASON, "champion"), min_accuracy)
    else:
        _reject(version, ruling.reason, min_accuracy)


def gate(version: str, x: np.ndarray, y: np.ndarray, min_accuracy: float,
         slices: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
         tolerances: dict[str, float] | None = None) -> Decision:
    """Promote `version` iff it clears the floor on the base test split and, both re-scored,
    is not worse than the champion on the base test split nor on any slice (e.g. "feedback",
    "robust", "foreign"), and better on at least one: a tie keeps the champion. A slice named in
    `tolerances` refuses only a drop of more than its tolerance (the robustness slice:
    `evaluate.max_robust_drop`, the foreign slice: `evaluate.max_foreign_drop`).

    A version is decided once per floor: rerunning the gate under the same floor reports the
    earlier decision; under a new floor (`evaluate.min_accuracy` changed) it decides again
    (a floor blocks promotions, it never demotes the champion).
    """
    tags = get_version(version).tags
    decided = tags.get(TAG_DECISION)
    if decided and (TAG_FLOOR not in tags or decided == "rolled_back" or _decided_under(tags, min_accuracy)):
        return Decision(version, decided == "promoted", _earlier_reason(version, tags), earlier=decided)
    sets = {"test": (x, y), **(slices or {})}
    scores = rescore_on(version, sets)
    current = champion_version()
    champion_accuracy = None
    ruling = _floor_ruling(version, scores["test"], min_accuracy, current)
    if ruling is None:
        champ = rescore_on(current, sets)
        champion_accuracy = champ["test"].accuracy
        ruling = _compare_ruling(Verdict([Comparison(name, mine.accuracy, champ[name].accuracy, len(sets[name][1]),
                                                     (tolerances or {}).get(name, 0.0))
                                          for name, mine in scores.items()]), current)
    _record(version, ruling, min_accuracy, current, tags)
    return Decision(version, ruling.passed, ruling.reason, scores["test"].accuracy, champion_accuracy,
                    current if champion_accuracy is not None else None, changed=ruling.action == "crown",
                    slice=ruling.slice)


def _earlier_reason(version: str, tags: dict[str, str]) -> str:
    """Why the gate decides nothing now: the decision it reports, and when it would decide again."""
    reason = tags.get(TAG_REASON, "")
    if tags.get(TAG_DECISION) == "rolled_back":
        return (f"v{version} was {reason} by hand: a rolled-back version is not re-gated, not even under a new "
                f"floor (`mnist-mlops promote {version}` serves it again)")
    if TAG_FLOOR in tags:
        return f"decided earlier under evaluate.min_accuracy={float(tags[TAG_FLOOR]):g}: {reason}"
    return f"decided earlier: {reason}"


def promote(version: str, x: np.ndarray | None, y: np.ndarray | None, min_accuracy: float,
            force: bool = False) -> Decision:
    """Manual override: champion := version, still refusing one below the floor unless forced.

    Without test data the floor cannot be checked: only `force` promotes then.
    """
    current = champion_version()
    get_version(version)
    if current == str(version):  # nothing to do: no tag rewritten, no "previous" that is itself
        return Decision(str(version), True, f"v{version} is already champion: nothing changed")
    acc = None
    if x is None or y is None:
        if not force:
            raise UserError(f"no test data to check version {version} against the floor evaluate.min_accuracy="
                            f"{min_accuracy}: fetch it (`mnist-mlops fetch` or `dvc pull data.dvc`), "
                            "or use --force to promote unchecked")
    else:
        result = rescore(version, x, y)
        acc = result.accuracy
        if (not result.finite or acc < min_accuracy) and not force:
            raise UserError(
                f"version {version} scores {acc:.4f}, below the floor evaluate.min_accuracy="
                f"{min_accuracy}: refusing (use --force to override)"
            )
    reason = "manual promotion" + (" (forced)" if force else "")
    _set_alias(version, reason, current)
    return Decision(version, True, reason, acc, previous_champion=current, changed=True)


def rollback() -> Decision:
    """Move the champion back to the version it replaced."""
    current = require_champion()
    previous = get_version(current).tags.get(TAG_PREVIOUS)
    if not previous:
        raise UserError(f"champion v{current} replaced no earlier version: nothing to roll back to")
    _decide(current, "rolled_back", f"rolled back to v{previous}", None)
    client().set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, previous)
    return Decision(previous, True, f"rolled back from v{current}", previous_champion=current, changed=True)
