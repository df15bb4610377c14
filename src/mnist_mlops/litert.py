"""The served model without TensorFlow: a LiteRT (TensorFlow Lite) file beside each registered version.

Why: importing TensorFlow costs a serving worker ~570 MiB resident and seconds of start, only
to run a small ConvNet. LiteRT's interpreter (`ai-edge-litert`) runs the same graph with the
same weights: on the sample's 1,000 test digits the same digits, probabilities within 2e-6;
one digit in 0.12 ms (the `tf.function` takes 1.8 ms), 256 digits in the same 32 ms. TensorFlow
stays where it earns its keep: training, the export itself, and serving on a GPU host (LiteRT
runs on the CPU), so the Bento stays GPU-capable.

The flow's promote step calls `attach` once per registered version (TensorFlow is loaded
there anyway): the file is logged to the version's run at `litert/model.tflite` and the version
is tagged `litert` with that path. A version without the tag (registered before, or by hand)
is served by TensorFlow, imported only then.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

from mnist_mlops.config import MODEL_NAME
from mnist_mlops.preprocess import INPUT_SHAPE

logger = logging.getLogger("mnist_mlops.litert")
TAG = "litert"
ARTIFACT = "litert/model.tflite"


def export(keras_model) -> bytes:
    """The model as a LiteRT flatbuffer, its batch size left free (through a SavedModel: a
    Keras 3 model's concrete function alone converts without its weights)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="mnist-litert-") as tmp:
        keras_model.export(tmp, format="tf_saved_model", verbose=False)
        return tf.lite.TFLiteConverter.from_saved_model(tmp).convert()


def attach(version: str) -> bool:
    """Export a registered version to LiteRT and record it on the version, unless it has it.

    Returns True when this call exported it. A failure is logged and leaves the version as it
    was: TensorFlow then serves it, as before LiteRT.
    """
    import mlflow

    client = mlflow.MlflowClient()
    mv = client.get_model_version(MODEL_NAME, version)
    if mv.tags.get(TAG):
        return False
    try:
        model = mlflow.keras.load_model(f"models:/{MODEL_NAME}/{version}")
        with tempfile.TemporaryDirectory(prefix="mnist-litert-") as tmp:
            path = Path(tmp) / Path(ARTIFACT).name
            path.write_bytes(export(model))
            client.log_artifact(mv.run_id, str(path), str(Path(ARTIFACT).parent))
    except Exception as exc:  # noqa: BLE001 - serving falls back to TensorFlow for this version
        logger.warning("v%s: no LiteRT export (%s): TensorFlow will serve it", version, exc)
        return False
    client.set_model_version_tag(MODEL_NAME, version, TAG, ARTIFACT)
    return True


class Forward:
    """float32 N×28×28×1 → N×10 probabilities through LiteRT: what `LoadedModel.forward` holds.

    Resizing an interpreter costs ~1.5 ms, more than a one-digit answer, so a batch runs on the
    interpreter of the next power of two (padded with blank digits), each made once, when first
    needed. One call at a time: an interpreter is not thread-safe.
    """

    def __init__(self, model: bytes, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter_class = Interpreter
        self._model = model
        self._threads = threads or len(os.sched_getaffinity(0))
        self._by_size: dict[int, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path) -> Forward:
        return cls(Path(path).read_bytes())

    def _interpreter(self, size: int):
        if (interpreter := self._by_size.get(size)) is None:
            interpreter = self._interpreter_class(model_content=self._model, num_threads=self._threads)
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [size, *INPUT_SHAPE])
            interpreter.allocate_tensors()
            self._by_size[size] = interpreter
        return interpreter

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32).reshape(-1, *INPUT_SHAPE)
        n = len(x)
        size = 1 << max(0, (n - 1).bit_length())
        if size != n:
            x = np.concatenate([x, np.zeros((size - n, *INPUT_SHAPE), np.float32)])
        with self._lock:
            interpreter = self._interpreter(size)
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[:n].copy()
