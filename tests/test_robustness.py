"""The robustness slice (training/robustness.py) and the upload conversion it goes through
(imaging.to_mnist): deterministic, every corruption real, photos of paper read as digits."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_mlops import imaging
from mnist_mlops.config import Paths, load_params, write_params
from mnist_mlops.training import robustness
from mnist_mlops.training.data import load_sample, write_data
from mnist_mlops.training.prepare import prepare

from helpers import REPO, TELEMETRY_OFF

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sample():
    d = load_sample()
    rows = robustness.pick(d.labels, 30, seed=0)
    return d.images[rows], d.labels[rows]


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_slices_are_byte_identical_between_two_runs(tmp_path: Path) -> None:
    """The slices built twice (in this process, then by the DVC stage command) and a third time
    over a process per core write the same bytes: the slice is a pure function of the split."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_params(root, ["prepare.robust_digits=20"])
    paths, params = Paths(root), load_params(root)
    write_data(load_sample(), paths.data)
    prepare(paths, params)

    sizes = robustness.write_slices(params, paths, processes=1)
    assert sizes == {"robust": 20 * len(robustness.CORRUPTIONS), "robust_val": 20 * len(robustness.CORRUPTIONS)}
    first = digest(paths.robust)
    shutil.rmtree(paths.robust)
    subprocess.run([sys.executable, "-m", "mnist_mlops.training.stages", "robustness"], cwd=root, check=True,
                   env={**TELEMETRY_OFF, "PATH": str(Path(sys.executable).parent)}, capture_output=True)
    assert digest(paths.robust) == first
    shutil.rmtree(paths.robust)
    robustness.write_slices(params, paths, processes=2)
    assert digest(paths.robust) == first
    assert len(first) == 6  # x, y, kind of both slices

    test = robustness.load_slice(paths, "robust")
    assert test.x.dtype == np.float32 and test.x.shape == (len(test.y), 28, 28, 1)
    assert np.bincount(test.kind) .tolist() == [20] * len(robustness.CORRUPTIONS)
    assert np.bincount(test.y[test.kind == 0], minlength=10).tolist() == [2] * 10  # the same count of each digit


def test_every_corruption_changes_the_digits_and_keeps_them_digits(sample) -> None:
    """...except a shift, which the conversion's crop and re-centring undo to the pixel."""
    digits, _ = sample
    clean = np.stack([imaging.to_mnist(np.asarray(robustness.sheet(d))) for d in digits])
    for corruption in robustness.CORRUPTIONS:
        out = robustness.corrupt(digits, corruption)
        assert out.dtype == np.uint8 and out.shape == digits.shape, corruption.name
        assert (out.reshape(len(out), -1).max(axis=1) == 255).all(), f"{corruption.name}: a blank digit"
        changed = np.abs(out.astype(int) - clean).mean()
        if corruption.family == "shift":
            assert changed == 0, f"{corruption.name}: the re-centring left {changed:.2f} grey levels of change"
        else:
            assert changed > 1.0, f"{corruption.name} changed the digits by only {changed:.2f} grey levels"


def test_robust_accuracy_is_the_mean_over_corruptions() -> None:
    n = len(robustness.NAMES)
    kind = np.repeat(np.arange(n), 10)
    correct = np.zeros(n * 10, bool)
    correct[kind == 0] = True
    correct[(kind == 1) & (np.arange(n * 10) % 2 == 0)] = True
    metrics = robustness.per_corruption(correct, kind)
    assert metrics["robust_thick_1"] == 1.0 and metrics["robust_thick_2"] == 0.5
    assert metrics["robust_jpeg_8"] == 0.0
    assert metrics["robust_accuracy"] == pytest.approx(1.5 / n) == pytest.approx(correct.mean())


def test_a_missing_slice_is_one_clear_error(tmp_path: Path) -> None:
    from mnist_mlops.errors import UserError

    with pytest.raises(UserError, match="dvc repro robustness"):
        robustness.load_slice(Paths(tmp_path), "robust")


def ink(digit: np.ndarray) -> np.ndarray:
    return digit > 96


def test_photos_of_paper_convert_like_the_clean_digit(sample) -> None:
    """Uneven light and sensor grain are taken out before the ink is cropped: the digit comes
    out where and as large as the clean one (they used to stretch the crop to the whole photo)."""
    digits, _ = sample
    rng = np.random.default_rng(0)
    for d in digits[:10]:
        clean = ink(imaging.to_mnist(np.asarray(robustness.sheet(d))))
        lit = robustness.CORRUPTIONS[robustness.NAMES.index("paper_1")].apply(robustness.sheet(d), rng)
        photo = robustness.CORRUPTIONS[robustness.NAMES.index("noise_1")].apply(lit, rng)
        got = ink(imaging.to_mnist(np.asarray(photo)))
        overlap = (clean & got).sum() / (clean | got).sum()
        assert overlap > 0.5, f"ink overlap {overlap:.2f}"
