"""A client of the running service: what `mnist-mlops predict` sends and how it reads answers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mnist_mlops.errors import UserError
from mnist_mlops.serving.settings import API_KEY_ENV


@dataclass(frozen=True)
class Answer:
    file: str
    digit: int | None = None
    confidence: float | None = None
    model_version: str | None = None
    error: str | None = None
    blank: bool = False  # the image holds no digit: the digit is no reading of it


def error_reason(resp) -> str:
    """The service's own one-line reason for a refused request (its JSON error body)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict) and detail[0].get("msg"):
        return str(detail[0]["msg"])
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return resp.text[:200]


def _answer(name: str, body: dict) -> Answer:
    return Answer(name, int(body["digit"]), float(body["confidence"]), str(body["model_version"]),
                  blank=bool(body.get("blank")))


def _post(client, path: Path):
    """An image to /predict_image; a `.npy` array of digits to /predict as it is (the fast path)."""
    if path.suffix.lower() == ".npy":
        return client.post("/predict", content=path.read_bytes(), headers={"Content-Type": "application/x-npy"})
    return client.post("/predict_image", files={"image": (path.name, path.read_bytes())})


def predict_files(url: str, files: list[Path], timeout: float = 60) -> Iterator[Answer]:
    """POST each file (with $MNIST_MLOPS_API_KEY when set), in order: an image answers once, a
    `.npy` array once per digit (`name[i]`)."""
    import httpx

    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UserError(f"no such file: {', '.join(missing)}")
    headers = {"X-API-Key": key} if (key := os.environ.get(API_KEY_ENV)) else {}
    with httpx.Client(base_url=url, timeout=timeout, headers=headers) as client:
        for path in files:
            try:
                resp = _post(client, path)
            except httpx.HTTPError as exc:
                raise UserError(f"no prediction service at {url} ({type(exc).__name__}): "
                                "start one with `mnist-mlops serve`") from None
            if resp.status_code == 200 and isinstance(body := resp.json(), list):
                yield from (_answer(f"{path.name}[{i}]", b) for i, b in enumerate(body))
            elif resp.status_code == 200:
                yield _answer(path.name, body)
            else:
                yield Answer(path.name, error=f"{resp.status_code}: {error_reason(resp)}")
