"""The champion's monitoring reference: logged by the evaluate stage with every model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_mlops.digit_features import FEATURES, REFERENCE_ARTIFACT
from mnist_mlops.errors import UserError


@dataclass(frozen=True)
class Reference:
    """What the champion was trained on and how sure it was on its test split."""

    version: str
    run_id: str
    label_counts: np.ndarray  # 10: the training labels
    predicted_counts: np.ndarray  # 10: the champion's answers on the base test split
    confidence: np.ndarray  # the champion's top probability on each base test digit
    features: dict[str, np.ndarray]  # FEATURES of the training digits (a sample)

    @classmethod
    def from_npz(cls, path: Path, version: str, run_id: str) -> Reference:
        with np.load(path) as z:
            return cls(version, run_id, z["labels"].astype(np.int64), z["predicted"].astype(np.int64), z["confidence"],
                       {name: z[f"feature_{name}"] for name in FEATURES})


def champion_reference() -> Reference:
    """Download the champion's reference (MLflow must be set up). One-line errors when there is
    no champion, or when the champion was registered before references were logged."""
    import mlflow

    from mnist_mlops.registry import get_version, require_champion

    version = require_champion()
    run_id = get_version(version).run_id
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=tmp)
        except Exception:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise UserError(f"champion v{version} has no monitoring reference ({REFERENCE_ARTIFACT} in run "
                            f"{run_id}): it was registered before monitoring existed; retrain with "
                            "`mnist-mlops run`") from None
        return Reference.from_npz(Path(local), version, run_id)
