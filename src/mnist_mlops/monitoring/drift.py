"""Drift: does a window of traffic look like the reference? scipy's tests, plus effect sizes.

A test alone flags trivial differences once the window is large (100,000 predictions make
any p-value tiny), and an effect size alone flags noise in a small window. A check drifts
only when both say so: p < `monitor.p_value` and effect >= `monitor.drift_threshold`, with
PSI as the effect of the class distribution and the KS statistic D for the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from mnist_mlops.digit_features import FEATURES
from mnist_mlops.monitoring.reference import Reference

PSI_FLOOR = 1e-4  # share given to an empty class, so PSI stays finite


@dataclass(frozen=True)
class Check:
    name: str  # "classes", "confidence", or a feature name
    test: str  # chi-square | KS
    statistic: float  # chi-square statistic, or KS D
    p_value: float
    effect: float  # PSI (classes) or KS D
    drifted: bool

    def as_dict(self) -> dict:
        return asdict(self)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins."""
    e = np.maximum(expected / max(expected.sum(), 1), PSI_FLOOR)
    a = np.maximum(actual / max(actual.sum(), 1), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def class_check(reference: Reference, predicted: np.ndarray, threshold: float, alpha: float) -> Check:
    """The champion's answers in the window vs its answers on the base test split: a two-sample
    chi-square test (contingency table), and PSI as the effect.

    Answers against answers, not against the training labels: a model that over-predicts a
    class does so on any in-distribution traffic, and that is the gate's business, not drift.
    """
    observed = np.bincount(predicted.astype(int), minlength=10)[:10]
    table = np.stack([reference.predicted_counts, observed])
    table = table[:, table.sum(axis=0) > 0]  # a class neither side answered carries no information
    if table.shape[1] < 2:
        return Check("classes", "chi-square", 0.0, 1.0, 0.0, False)
    chi2 = stats.chi2_contingency(table, correction=False)
    effect = psi(reference.predicted_counts.astype(float), observed.astype(float))
    return Check("classes", "chi-square", float(chi2.statistic), float(chi2.pvalue), effect,
                 bool(chi2.pvalue < alpha and effect >= threshold))


def ks_check(name: str, reference: np.ndarray, window: np.ndarray, threshold: float, alpha: float) -> Check:
    result = stats.ks_2samp(reference, window)
    d = float(result.statistic)
    return Check(name, "KS", d, float(result.pvalue), d, bool(result.pvalue < alpha and d >= threshold))


def checks(reference: Reference, predicted: np.ndarray, confidence: np.ndarray,
           features: dict[str, np.ndarray], threshold: float, alpha: float) -> list[Check]:
    """Every drift check of one window: classes, confidence, then each input feature."""
    out = [class_check(reference, predicted, threshold, alpha),
           ks_check("confidence", reference.confidence, confidence, threshold, alpha)]
    out += [ks_check(name, reference.features[name], features[name], threshold, alpha) for name in FEATURES]
    return out
