"""What the service takes in, checked before it reaches the model.

/predict's `images` is checked and normalised by a pydantic validator (`images_type`) while
the request is parsed, *before* the adaptive batcher merges it with other requests, so one bad
request can only fail itself (400 with a message). Arrays travel compact too: a raw
`application/octet-stream` body (N×28×28 uint8) or a `.npy` file (`binary_images`) is turned
by the HTTP guard into the base64 tensor form of `images` (`{"dtype", "shape", "base64"}`),
which the same validator decodes, so every form meets one check and one batcher. /feedback's body is parsed by
`parse_feedback`: every label or none, each reason one line. The limits are the build
arguments' (serving/settings.py), bound by the service; the defaults are params.yaml's.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from functools import partial
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator, WithJsonSchema
from pydantic_core import PydanticCustomError

from mnist_mlops.config import ServeParams
from mnist_mlops.preprocess import INPUT_SHAPE, normalize

DEFAULTS = ServeParams()


# --------------------------------------------------------------------------- /predict

def _bad(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_images", message)


def parse_images(value: Any, max_images: int = DEFAULTS.max_images_per_request) -> np.ndarray:
    """JSON `images` → float32 N×28×28×1 in [0, 1], or a one-line reason why not.

    Accepts one digit (28×28 or 28×28×1) or many (N×28×28 or N×28×28×1); integers are
    0–255 pixels, floats are already in [0, 1]. Then `preprocess.normalize`, the function
    training used, so served inputs are exactly what the model was trained on.
    """
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, dict):
        arr = decode_tensor(value)
    else:
        if not isinstance(value, list):
            raise _bad(f"'images' must be a list of 28×28 digits (nested lists of numbers), "
                       f"got {type(value).__name__}")
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):
            raise _bad("'images' is ragged: every digit must be 28 rows of 28 numbers") from None
    if arr.size == 0:
        raise _bad("'images' is empty: send at least one 28×28 digit")
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise _bad("'images' must hold numbers only (floats in [0, 1] or integers 0–255)")
    shape = arr.shape
    if arr.ndim == 4 and shape[-1] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and shape == INPUT_SHAPE:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != INPUT_SHAPE[:2]:
        raise _bad(f"each digit must be 28×28 (optionally ×1), got 'images' of shape {list(shape)}")
    if len(arr) > max_images:
        raise _bad(f"too many images: {len(arr)} in one request, at most {max_images}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise _bad("'images' contains NaN or infinite values")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise _bad(f"float pixel values must be in [0, 1] (got {arr.min():g}..{arr.max():g}); "
                       "send integers for 0–255 pixels")
    elif arr.min() < 0 or arr.max() > 255:
        raise _bad(f"integer pixel values must be in 0–255 (got {arr.min()}..{arr.max()})")
    return normalize(arr)


# --------------------------------------------------------------------------- compact arrays

TENSOR_DTYPES = {"uint8": np.uint8, "float32": np.float32}
BINARY_TYPES = ("application/octet-stream", "application/x-npy")
PIXELS = INPUT_SHAPE[0] * INPUT_SHAPE[1]


def decode_tensor(value: dict) -> np.ndarray:
    """`{"dtype": "uint8" | "float32", "shape": [...], "base64": "..."}` → the array it holds
    (C order, little-endian), or a one-line reason why not. Its shape is checked by the caller."""
    if set(value) != {"dtype", "shape", "base64"}:
        raise _bad("a tensor 'images' is {\"dtype\": \"uint8\" or \"float32\", \"shape\": [n, 28, 28], "
                   "\"base64\": \"...\"}")
    dtype, shape, data = value["dtype"], value["shape"], value["base64"]
    if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
        raise _bad(f"tensor dtype must be uint8 or float32, not {json.dumps(dtype)}")
    if (not isinstance(shape, list) or not shape or len(shape) > 4
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise _bad(f"tensor shape must be a list of sizes such as [n, 28, 28], not {json.dumps(shape)}")
    if not isinstance(data, str):
        raise _bad("tensor 'base64' must be a string of base64 bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("tensor 'base64' is not valid base64") from None
    itemsize = np.dtype(TENSOR_DTYPES[dtype]).itemsize
    if len(raw) != int(np.prod(shape)) * itemsize:
        raise _bad(f"tensor of shape {shape} and dtype {dtype} needs {int(np.prod(shape)) * itemsize} bytes, "
                   f"got {len(raw)}")
    return np.frombuffer(raw, np.dtype(TENSOR_DTYPES[dtype]).newbyteorder("<")).reshape(shape)


def encode_tensor(arr: np.ndarray) -> dict:
    """`decode_tensor`'s form of a uint8 or float32 array."""
    arr = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<"))
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "base64": base64.b64encode(arr.tobytes()).decode()}


def binary_images(body: bytes, media_type: str) -> np.ndarray:
    """A raw uint8 body (N×28×28 pixels, row-major) or a `.npy` file → uint8 or float32 digits.

    Raises ValueError with one line. Shape and range are `parse_images`' to check, as for JSON.
    """
    if media_type == "application/x-npy":
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError):  # allow_pickle=False: an object array is refused too
            raise ValueError("the body is not a .npy array of numbers (numpy.save writes one)") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf":
            raise ValueError("the .npy array must hold numbers (uint8 0–255 pixels or floats in [0, 1])")
        if arr.dtype.kind == "f":
            return arr.astype(np.float32)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"integer pixel values must be in 0–255 (got {arr.min()}..{arr.max()})")
        return arr.astype(np.uint8)
    if not body or len(body) % PIXELS:
        raise ValueError(f"a raw body is N×28×28 uint8 pixels, a multiple of {PIXELS} bytes: got {len(body)} "
                         "bytes (send a .npy file as application/x-npy for other shapes and dtypes)")
    return np.frombuffer(body, np.uint8).reshape(-1, *INPUT_SHAPE[:2])


def predict_body(images: np.ndarray) -> bytes:
    """The /predict JSON body holding `images` in the tensor form."""
    return json.dumps({"images": encode_tensor(images)}).encode()


def images_type(max_images: int) -> Any:
    """The type of /predict's `images`: checked by `parse_images` while the request is parsed."""
    schema = {
        "description": "One 28×28 digit or a list of them (each optionally 28×28×1): floats in [0, 1] "
                       f"or integers 0–255; at most {max_images} per request. Or the compact tensor form: "
                       '{"dtype": "uint8" or "float32", "shape": [n, 28, 28], "base64": "<the bytes, C order>"}.',
        "oneOf": [
            {"type": "array", "items": {"type": "array"}, "minItems": 1},
            {"type": "object", "required": ["dtype", "shape", "base64"], "additionalProperties": False,
             "properties": {"dtype": {"enum": list(TENSOR_DTYPES)},
                            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "base64": {"type": "string"}}},
        ],
    }
    return Annotated[Any, BeforeValidator(partial(parse_images, max_images=max_images)), WithJsonSchema(schema)]


Images = images_type(DEFAULTS.max_images_per_request)


# --------------------------------------------------------------------------- /feedback

class FeedbackError(ValueError):
    """A /feedback request that stores nothing: its HTTP status, error kind and one-line reason."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def parse_feedback(body: bytes, max_items: int = DEFAULTS.max_feedback_items) -> dict[str, int]:
    """`{"prediction_id", "label"}` or a list of them → {id: label}, a repeated id's last label winning."""
    def bad(message: str) -> FeedbackError:
        return FeedbackError(400, "invalid_feedback", message)

    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be a label
        raise bad('the body is not JSON: send {"prediction_id": "...", "label": 7} or a list of them') from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise bad("empty list: send at least one {prediction_id, label}")
    if len(items) > max_items:
        raise bad(f"too many items: {len(items)} in one request, at most {max_items}")
    labels: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"item {i}" if isinstance(data, list) else "the body"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object with 'prediction_id' and 'label'")
        if unknown := sorted(set(item) - {"prediction_id", "label"}):
            raise bad(f"{where}: unknown field '{unknown[0]}' (expected 'prediction_id' and 'label')")
        pid, label = item.get("prediction_id"), item.get("label")
        if not isinstance(pid, str) or not pid:
            raise bad(f"{where}: 'prediction_id' must be the id string a prediction returned")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 9:
            raise bad(f"{where}: 'label' must be an integer 0–9, got {json.dumps(label)}")
        labels[pid] = label
    return labels
