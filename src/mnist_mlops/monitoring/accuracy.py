"""Live accuracy: how often the service was right, by the labels people gave its answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from scipy import stats


@dataclass(frozen=True)
class Accuracy:
    """Accuracy over `n` labelled answers, with a 95% Wilson interval; per class of the label."""

    n: int
    correct: int
    low: float | None
    high: float | None
    per_class: dict[int, tuple[int, int]] = field(default_factory=dict)  # label -> (correct, n)

    @property
    def value(self) -> float | None:
        return self.correct / self.n if self.n else None

    def as_dict(self) -> dict:
        return {"n": self.n, "correct": self.correct, "accuracy": self.value, "ci95": [self.low, self.high],
                "per_class": {str(k): {"correct": c, "n": n} for k, (c, n) in sorted(self.per_class.items())}}


def accuracy(pairs: list[tuple[int, int]]) -> Accuracy:
    """From (predicted, label) pairs."""
    n = len(pairs)
    correct = sum(p == y for p, y in pairs)
    per_class: dict[int, tuple[int, int]] = {}
    for p, y in pairs:
        c, m = per_class.get(y, (0, 0))
        per_class[y] = (c + (p == y), m + 1)
    if not n:
        return Accuracy(0, 0, None, None, per_class)
    ci = stats.binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return Accuracy(n, correct, float(ci.low), float(ci.high), per_class)


def by_version(labels: list[dict]) -> dict[str, Accuracy]:
    """Feedback records (with `predicted` and `model_version`) -> accuracy per model version, and "all"."""
    rows = [r for r in labels if r.get("predicted") is not None]
    out = {"all": accuracy([(int(r["predicted"]), int(r["label"])) for r in rows])}
    for version in sorted({str(r.get("model_version")) for r in rows}):
        out[version] = accuracy([(int(r["predicted"]), int(r["label"])) for r in rows
                                 if str(r.get("model_version")) == version])
    return out
