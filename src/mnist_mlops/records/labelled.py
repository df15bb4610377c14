"""`mnist-mlops feedback import DIR`: folders of labelled images → the feedback store.

People keep labelled digits as `DIR/0/ … DIR/9/` folders of PNG/JPEG files. Each file goes
through the service's own conversion (`imaging.image_to_input`: the classic MNIST
normalisation), so an imported digit is exactly what the service would have seen had it
been uploaded. Unreadable files are listed and skipped; nothing half-imported is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mnist_mlops.errors import UserError
from mnist_mlops.imaging import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, image_to_input
from mnist_mlops.preprocess import to_uint8
from mnist_mlops.records.feedback import FeedbackStore


@dataclass
class ImportResult:
    stored: int = 0
    per_label: dict[int, int] = field(default_factory=lambda: dict.fromkeys(range(10), 0))
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)


def import_folder(folder: Path, store_dir: Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> ImportResult:
    """Convert and store every image under `folder/<digit>/`; one append for the lot."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder: expected {folder}/0/ … {folder}/9/ holding PNG/JPEG digits")
    label_dirs = [(d, folder / str(d)) for d in range(10) if (folder / str(d)).is_dir()]
    if not label_dirs:
        raise UserError(f"{folder} has no digit folders: put each image in {folder}/<digit>/ (0 to 9)")
    result = ImportResult()
    records, images = [], []
    for label, directory in label_dirs:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = str(path.relative_to(folder))
            try:
                x = image_to_input(path.read_bytes(), max_pixels, max_bytes)
            except ImageError as exc:
                result.skipped.append((rel, str(exc)))
                continue
            except OSError as exc:
                result.skipped.append((rel, f"unreadable: {exc.strerror or exc}"))
                continue
            records.append({"label": label, "source": "import", "file": rel})
            images.append(to_uint8(x)[0])
            result.per_label[label] += 1
    if records:
        FeedbackStore(store_dir).add(records, np.stack(images))
    result.stored = len(records)
    return result
