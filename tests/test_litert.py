"""LiteRT serves what TensorFlow would: the export, the batch buckets, the runtime choice, and
the follower loading a registered version either way."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlops import litert
from mnist_mlops.config import ModelParams
from mnist_mlops.serving.settings import RUNTIME_ENV, model_runtime

from helpers import Project, copy_project, prepared_digits


@pytest.fixture(scope="module")
def small_model():
    from mnist_mlops.training.model import build_model

    return build_model(ModelParams(filters=[8, 16], dense_units=32))


def test_the_export_gives_tensorflows_answers_for_any_batch(small_model) -> None:
    forward = litert.Forward(litert.export(small_model))
    rng = np.random.default_rng(0)
    for n in (1, 3, 1, 256, 5, 257):  # buckets 1, 4, 256, 8, 512: made once, padded, reused
        x = rng.random((n, 28, 28, 1), np.float32)
        got = forward(x)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, np.asarray(small_model(x, training=False)), atol=1e-5)
    assert sorted(forward._by_size) == [1, 4, 8, 256, 512]


def test_the_runtime_is_chosen_by_the_host_unless_told(monkeypatch) -> None:
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    assert model_runtime() == "litert"  # no GPU here: LiteRT
    monkeypatch.setenv(RUNTIME_ENV, "tensorflow")
    assert model_runtime() == "tensorflow"
    monkeypatch.setenv(RUNTIME_ENV, "onnx")
    with pytest.raises(ValueError, match="auto, litert or tensorflow"):
        model_runtime()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_follower_loads_litert_when_a_version_has_it_and_tensorflow_otherwise(
        trained_project: Project, tmp_path, monkeypatch) -> None:
    """The flow's promote step attached the file; a version without it is served by TensorFlow."""
    from mnist_mlops.serving.follow import load_version

    proj = copy_project(trained_project, tmp_path / "copy")
    proj.use_env(monkeypatch)
    client = proj.mlflow_client()
    assert client.get_model_version("mnist-convnet", "1").tags[litert.TAG] == litert.ARTIFACT
    x, _ = prepared_digits(proj, "test")
    digits = (x[:64, ..., None] / 255).astype(np.float32)
    lite = load_version("1", None)
    assert lite.runtime == "litert"
    client.delete_model_version_tag("mnist-convnet", "1", litert.TAG)
    tf = load_version("1", None)
    assert tf.runtime == "tensorflow" and tf.canary_accuracy == lite.canary_accuracy
    np.testing.assert_allclose(lite.forward(digits), tf.forward(digits), atol=1e-5)
    assert litert.attach("1") and not litert.attach("1")  # once per version
    assert load_version("1", None).runtime == "litert"
