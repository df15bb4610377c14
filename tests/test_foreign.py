"""The foreign slice (training/foreign.py): digits of font families the model never trained on,
built byte-identically, split by family, never from the families kept for outside checks."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_mlops.config import Paths, load_params, write_params
from mnist_mlops.errors import UserError
from mnist_mlops.training import foreign

from helpers import REPO, TELEMETRY_OFF

pytestmark = pytest.mark.timeout(300)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_slice_is_byte_identical_between_two_builds(tmp_path: Path) -> None:
    """Built in this process, then by the DVC stage command, then over two processes: the same bytes."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    write_params(root, ["foreign.digits=20", "foreign.train_digits=20"])
    paths, params = Paths(root), load_params(root)

    sizes = foreign.write(params, paths)
    assert sizes == {"train": 40, "val": 40, "test": 40}  # 2 of each digit from each of the 2 sources
    first = digest(paths.foreign)
    assert len(first) == 3 * 4 + 1  # x, y, source, family of each split; families.json
    shutil.rmtree(paths.foreign)
    subprocess.run([sys.executable, "-m", "mnist_mlops.training.stages", "foreign"], cwd=root, check=True,
                   env={**TELEMETRY_OFF, "PATH": str(Path(sys.executable).parent)}, capture_output=True)
    assert digest(paths.foreign) == first
    spread = foreign.build("test", 20, processes=2, chunk=10)
    alone = foreign.build("test", 20)
    assert all(np.array_equal(spread[k], alone[k]) for k in alone)

    test = foreign.load(paths, "test")
    assert test.x.dtype == np.float32 and test.x.shape == (40, 28, 28, 1)
    assert np.bincount(test.source).tolist() == [20, 20]
    assert np.bincount(test.y[test.source == 0], minlength=10).tolist() == [2] * 10


def test_families_are_disjoint_between_train_val_and_test() -> None:
    """No family, font file or glyph design in two splits; each split has both sources, and
    every digit drawn for a split comes from that split's families."""
    by_split: dict[str, set[str]] = {s: set() for s in foreign.SPLITS}
    for fam in foreign.families():
        for style in fam.styles:
            if fam.source == "printed":
                by_split[fam.split].add(hashlib.sha256(foreign.font_bytes(style)).hexdigest())
            else:  # Hershey fonts that share their digits' strokes are one design
                strokes = foreign.hershey_digits(style.partition(":")[2])
                by_split[fam.split].add(repr([[s.tolist() for s in strokes[d]] for d in range(10)]))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not by_split[a] & by_split[b], f"{a} and {b} share a font"
    names = [f.name for f in foreign.FAMILIES]
    assert len(names) == len(set(names))
    for split in foreign.SPLITS:
        assert {f.source for f in foreign.families(split)} == set(foreign.SOURCES), split
        built = foreign.build(split, 10)
        assert {foreign.FAMILIES[i].split for i in np.unique(built["family"])} == {split}


def test_dejavu_and_liberation_are_never_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside checks use them: refused by name, in the list and in the font files' own names."""
    from PIL import ImageFont

    for name in ("DejaVu Sans", "dejavu_sans_mono", "DejaVuSerif-Bold.ttf", "Liberation Serif",
                 "fonts-liberation2:LiberationMono-Regular.ttf"):
        assert not foreign.allowed(name), name
    for fam in foreign.families():
        assert foreign.allowed(fam.name) and all(foreign.allowed(s) for s in fam.styles)
        for style in fam.styles:
            if fam.source == "printed":
                import io

                family, _ = ImageFont.truetype(io.BytesIO(foreign.font_bytes(style)), 12).getname()
                assert foreign.allowed(family), f"{style} is {family}"
    sneaked = foreign.Family("DejaVu Sans", "printed", "train", ("somewhere:DejaVuSans.ttf",))
    monkeypatch.setattr(foreign, "FAMILIES", (*foreign.FAMILIES, sneaked))
    with pytest.raises(UserError, match="reserved for outside checks"):
        foreign.families("train")


def test_every_style_draws_every_digit() -> None:
    """A font without a digit would draw an empty box (.notdef): each style's digits differ and hold ink."""
    rng = np.random.default_rng(0)
    for fam in foreign.families():
        for style in fam.styles:
            draw = foreign.printed if fam.source == "printed" else foreign.stroked
            sheets = [255 - np.asarray(draw(style, d, rng), np.int16) for d in range(10)]
            assert all(s.sum() > 255 * 50 for s in sheets), style
            assert len({hashlib.sha256((s > 128).tobytes()).hexdigest() for s in sheets}) == 10, style


def test_metrics_per_source_and_the_worst_class() -> None:
    y = np.tile(np.arange(10), 4).astype(np.uint8)
    source = np.repeat([0, 1], 20).astype(np.uint8)
    s = foreign.ForeignSlice(np.zeros((40, 28, 28, 1), np.float32), y, source, np.zeros(40, np.uint8))
    correct = np.ones(40, bool)
    correct[(y == 7) & (source == 1)] = False  # the stroke-drawn 7s
    m = foreign.metrics(correct, s)
    assert m["foreign_accuracy"] == pytest.approx(38 / 40)
    assert m["foreign_printed"] == 1.0 and m["foreign_stroke"] == pytest.approx(18 / 20)
    assert m["foreign_class_7"] == 0.5 and m["foreign_worst_class"] == 0.5
    assert m["foreign_class_0"] == 1.0


def test_training_batches_mix_in_the_training_families() -> None:
    """`foreign.train_share` of each epoch's examples come from the training families' digits;
    the epoch keeps its length, and two pipelines with one seed give the same batches."""
    from mnist_mlops.training.train import dataset

    x, y = np.zeros((1000, 28, 28, 1), np.float32), np.zeros(1000, np.uint8)
    mx, my = np.ones((50, 28, 28, 1), np.float32), np.ones(50, np.uint8)

    def labels() -> np.ndarray:
        return np.concatenate([b.numpy() for _, b in dataset(x, y, 100, 7, mix=(mx, my, 0.2))])

    first = labels()
    assert len(first) == 1000 and 0.15 < first.mean() < 0.25
    assert np.array_equal(first, labels())


def test_foreign_digits_on_top_keep_every_mnist_epoch() -> None:
    """`foreign.on_top`: the epoch grows so that MNIST keeps its count (about every digit once),
    the share of foreign digits stays what `train_share` says."""
    from mnist_mlops.training.train import dataset, epoch_examples

    x, y = np.zeros((1000, 28, 28, 1), np.float32), np.zeros(1000, np.uint8)
    mix = (np.ones((50, 28, 28, 1), np.float32), np.ones(50, np.uint8), 0.2)
    assert epoch_examples(1000, mix, on_top=False) == 1000 and epoch_examples(1000, None, on_top=True) == 1000
    examples = epoch_examples(1000, mix, on_top=True)
    assert examples == 1250
    labels = np.concatenate([b.numpy() for _, b in dataset(x, y, 100, 7, mix=mix, examples=examples)])
    assert len(labels) == 1250 and 0.15 < labels.mean() < 0.25
    assert 900 < (labels == 0).sum() < 1100, "MNIST keeps about its whole epoch"
