"""The model file is reproducible: the same weights give the same bytes, so dvc.lock stays put."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np

from mnist_mlops.model_file import file_md5, save_keras
from mnist_mlops.scoring import load_keras


def tiny_model(weights: list[np.ndarray] | None = None):
    """The project's ConvNet, small: every layer shares one dtype policy (a `shared_object_id`),
    and a second one built in the same process gets no other layer names."""
    from mnist_mlops.config import ModelParams
    from mnist_mlops.training.model import build_model

    model = build_model(ModelParams(filters=[4], dense_units=8))
    if weights is not None:
        model.set_weights(weights)
    return model


def test_same_weights_saved_twice_are_the_same_bytes(tmp_path: Path) -> None:
    first = tiny_model()
    second = tiny_model(first.get_weights())  # other Python objects, other ids, same weights
    first.save(tmp_path / "plain-1.keras")
    save_keras(first, tmp_path / "a" / "model.keras")
    time.sleep(2.1)  # a zip entry's time has 2-second steps; metadata.json's date_saved has seconds
    second.save(tmp_path / "plain-2.keras")
    save_keras(second, tmp_path / "b" / "model.keras")

    # Keras as it writes: other bytes each time (the problem this module exists for)
    assert file_md5(tmp_path / "plain-1.keras") != file_md5(tmp_path / "plain-2.keras")
    assert (tmp_path / "a" / "model.keras").read_bytes() == (tmp_path / "b" / "model.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "a" / "model.keras") as z:
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert b"date_saved" not in z.read("metadata.json")


def test_the_canonical_file_loads_as_the_model_it_was(tmp_path: Path) -> None:
    model = tiny_model()
    save_keras(model, tmp_path / "model.keras")
    loaded = load_keras(tmp_path / "model.keras")
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert [w.shape for w in loaded.get_weights()] == [w.shape for w in model.get_weights()]
    assert not list(tmp_path.glob(".*"))  # no temp file left beside it
