"""The robustness slice: the test digits as people really send them.

Each digit is drawn as dark ink on a sheet of paper (3× the MNIST scale, with margins), put
through one corruption that real inputs show, then converted back by the service's own
`imaging.to_mnist` (crop, resize to 20×20, centre of mass) and the training normalisation:
exactly the path an uploaded photo takes. Each corruption comes at two strengths:

- thick / thin     marker strokes and fine pen lines (dilation / erosion of the ink);
- lowres / blur    a digit scanned at 8–12 px and blown up, or out of focus;
- rotate / slant   rotated or italic handwriting (±15–25°, shear 0.3–0.5);
- shift            written far off-centre on a larger sheet;
- noise / paper / jpeg   sensor noise, uneven lighting of the paper, JPEG artefacts.

Everything random is drawn from a generator seeded per corruption and digit count, so the
slice is a pure function of the digits: byte-identical from run to run (a test checks it).
`robust_accuracy` is the mean accuracy over the corruptions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mnist_mlops.config import Params, Paths
from mnist_mlops.errors import UserError
from mnist_mlops.imaging import to_mnist
from mnist_mlops.preprocess import normalize, to_uint8

SCALE = 3  # the sheet is drawn at 3× the MNIST resolution ...
SHEET = 28 * SCALE + 2 * 14  # ... with a 14 px paper margin all round: 112×112
SEED = 20_261_127

SLICES = {"robust": "test", "robust_val": "val"}  # slice -> the prepared split it corrupts


@dataclass(frozen=True)
class RobustSlice:
    x: np.ndarray  # float32 N×28×28×1 in [0, 1], normalised like every split
    y: np.ndarray  # uint8 N
    kind: np.ndarray  # uint8 N: the corruption of each row, an index into NAMES


@dataclass(frozen=True)
class Corruption:
    name: str  # metric-safe: robust_<name>
    family: str
    apply: Callable[[object, np.random.Generator], object]  # PIL "L" sheet, rng -> PIL "L" sheet


def sheet(digit: np.ndarray):
    """A 28×28 MNIST digit (white on black) → a 112×112 sheet of paper with dark ink."""
    from PIL import Image

    up = np.asarray(Image.fromarray(digit).resize((28 * SCALE, 28 * SCALE), Image.Resampling.BICUBIC))
    margin = (SHEET - 28 * SCALE) // 2
    return Image.fromarray(np.pad(255 - up, margin, constant_values=255))


def _ink(filter_name: str, size: int):
    """Thicker strokes (`minimum_filter`: on dark ink the minimum grows it) or thinner ones
    (`maximum_filter`), over a `size`×`size` square."""

    def apply(img, rng):
        import scipy.ndimage
        from PIL import Image

        return Image.fromarray(getattr(scipy.ndimage, filter_name)(np.asarray(img), size))

    return apply


def _lowres(px: int):
    """The digit (≈20 px of 28 at MNIST scale) captured at `px` px, then blown up smoothly."""

    def apply(img, rng):
        from PIL import Image, ImageFilter

        small = max(4, round(SHEET * px / (20 * SCALE)))  # the digit's 20·SCALE px → px
        down = img.resize((small, small), Image.Resampling.BOX)
        return down.resize(img.size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1))

    return apply


def _blur(radius: float):
    def apply(img, rng):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius))

    return apply


def _rotate(degrees: float):
    def apply(img, rng):
        from PIL import Image

        return img.rotate(degrees * rng.choice((-1, 1)), Image.Resampling.BICUBIC, fillcolor=255)

    return apply


def _slant(shear: float):
    def apply(img, rng):
        from PIL import Image

        s = shear * rng.choice((-1, 1))
        half = img.size[1] / 2
        return img.transform(img.size, Image.Transform.AFFINE, (1, s, -s * half, 0, 1, 0),
                             Image.Resampling.BICUBIC, fillcolor=255)

    return apply


def _shift(factor: int):
    """Written in a corner of a sheet `factor`× as wide and tall."""

    def apply(img, rng):
        from PIL import Image

        w, h = img.size
        big = Image.new("L", (w * factor, h * factor), 255)
        big.paste(img, (int(rng.integers(0, w * (factor - 1) + 1)), int(rng.integers(0, h * (factor - 1) + 1))))
        return big

    return apply


def _noise(sigma: float):
    def apply(img, rng):
        from PIL import Image

        a = np.asarray(img, np.float32) + rng.normal(0.0, sigma, (img.size[1], img.size[0]))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))

    return apply


def _paper(shade: float):
    """Uneven lighting: the sheet darkens linearly by `shade` towards a random edge, and the
    ink is grey pencil rather than black."""

    def apply(img, rng):
        from PIL import Image

        h, w = img.size[1], img.size[0]
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w) - 0.5
        light = 1.0 - shade * (0.5 + (np.cos(angle) * xx + np.sin(angle) * yy))
        ink = np.asarray(img, np.float32) / 255.0
        a = (0.35 + 0.65 * ink) * np.clip(light, 0, 1) * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))

    return apply


def _jpeg(quality: int):
    def apply(img, rng):
        from PIL import Image

        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("L")

    return apply


CORRUPTIONS: tuple[Corruption, ...] = (
    Corruption("thick_1", "thick", _ink("minimum_filter", 5)),
    Corruption("thick_2", "thick", _ink("minimum_filter", 9)),
    Corruption("thin_1", "thin", _ink("maximum_filter", 3)),
    Corruption("thin_2", "thin", _ink("maximum_filter", 5)),
    Corruption("lowres_12px", "lowres", _lowres(12)),
    Corruption("lowres_8px", "lowres", _lowres(8)),
    Corruption("blur_1", "blur", _blur(3)),
    Corruption("blur_2", "blur", _blur(5)),
    Corruption("rotate_15", "rotate", _rotate(15)),
    Corruption("rotate_25", "rotate", _rotate(25)),
    Corruption("slant_03", "slant", _slant(0.3)),
    Corruption("slant_05", "slant", _slant(0.5)),
    Corruption("shift_2x", "shift", _shift(2)),
    Corruption("shift_4x", "shift", _shift(4)),
    Corruption("noise_1", "noise", _noise(25)),
    Corruption("noise_2", "noise", _noise(50)),
    Corruption("paper_1", "paper", _paper(0.3)),
    Corruption("paper_2", "paper", _paper(0.5)),
    Corruption("jpeg_20", "jpeg", _jpeg(20)),
    Corruption("jpeg_8", "jpeg", _jpeg(8)),
)
NAMES = tuple(c.name for c in CORRUPTIONS)


def corrupt(digits: np.ndarray, corruption: Corruption) -> np.ndarray:
    """uint8 N×28×28 digits → uint8 N×28×28: drawn on paper, corrupted, converted like an upload."""
    if not len(digits):
        return np.zeros((0, 28, 28), np.uint8)
    rng = np.random.default_rng([SEED, NAMES.index(corruption.name), len(digits)])
    return np.stack([to_mnist(np.asarray(corruption.apply(sheet(d), rng))) for d in digits])


def per_corruption(correct: np.ndarray, kind: np.ndarray) -> dict[str, float]:
    """`robust_<name>` accuracy per corruption plus `robust_accuracy`, their mean."""
    metrics = {f"robust_{name}": float(correct[kind == i].mean()) for i, name in enumerate(NAMES) if (kind == i).any()}
    # Every corruption holds the same digits: the slice's accuracy is the mean over corruptions,
    # computed as the gate computes it (one float path, one rounding).
    metrics["robust_accuracy"] = float(correct.mean()) if len(correct) else float("nan")
    return metrics


def pick(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Up to `count` row indices, the same number of each digit, seeded: the slice's base."""
    rng = np.random.default_rng(seed)
    per_class = max(1, count // 10)
    rows = [rng.permutation(np.flatnonzero(labels == d))[:per_class] for d in range(10)]
    return np.sort(np.concatenate(rows)).astype(np.int64)


def _corrupt_by_name(digits: np.ndarray, name: str) -> np.ndarray:
    return corrupt(digits, CORRUPTIONS[NAMES.index(name)])


def build(digits: np.ndarray, labels: np.ndarray, processes: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every corruption of every digit: (uint8 images, labels, corruption index), corruption-major,
    so accuracy over the whole set is the mean of the per-corruption accuracies.

    `processes` > 1 spreads the corruptions over spawned processes (the `prepare` stage, a
    `__main__`-guarded entry point, uses one per CPU): ~2 ms of Pillow and numpy per digit
    and corruption holds the GIL, so threads do not help. Spawned, not forked: a caller may
    hold TensorFlow's threads.
    """
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    n = len(CORRUPTIONS)
    if processes > 1 and len(digits):
        with ProcessPoolExecutor(min(processes, n), mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_corrupt_by_name, [digits] * n, NAMES))
    else:
        parts = [corrupt(digits, c) for c in CORRUPTIONS]
    return np.concatenate(parts), np.tile(labels, n), np.repeat(np.arange(n, dtype=np.uint8), len(labels))


def slice_of(x: np.ndarray, y: np.ndarray, count: int, seed: int,
             processes: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` digits of a split (the same number of each class), through every corruption."""
    rows = pick(y, count, seed)
    return build(to_uint8(x[rows]), y[rows], processes)


def write_slices(params: Params, paths: Paths, processes: int = 1) -> dict[str, int]:
    """artifacts/prepared → artifacts/robust/{slice}_{x,y,kind}.npy (x as uint8: 4× smaller)."""
    from mnist_mlops.training.prepare import load_split

    out = paths.robust
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, split in SLICES.items():
        source = load_split(paths.prepared, split)
        arrays = slice_of(source.x, source.y, params.prepare.robust_digits, params.prepare.seed, processes)
        for part, array in zip(("x", "y", "kind"), arrays, strict=True):
            np.save(out / f"{name}_{part}.npy", array, allow_pickle=False)
        sizes[name] = len(arrays[1])
    return sizes


def load_slice(paths: Paths, name: str) -> RobustSlice:
    try:
        x, y, kind = (np.load(paths.robust / f"{name}_{part}.npy") for part in ("x", "y", "kind"))
    except FileNotFoundError:
        raise UserError(f"no robustness slice '{name}' in {paths.robust}: run `dvc repro robustness`") from None
    return RobustSlice(normalize(x), y, kind)


def gate_slice(paths: Paths, params: Params) -> RobustSlice:
    """The robustness slice of the base test split for the gate: built by the stage, else
    rebuilt from the test split (a pure function of data/ and params, like the split itself)."""
    from mnist_mlops.training.prepare import test_split

    if (paths.robust / "robust_y.npy").exists():
        return load_slice(paths, "robust")
    test = test_split(paths, params)
    x, y, kind = slice_of(test.x, test.y, params.prepare.robust_digits, params.prepare.seed)
    return RobustSlice(normalize(x), y, kind)


PARALLEL_FROM = 100  # digits per slice from which spawning a process per core pays (~1 s each to start)


def stage(params: Params, paths: Paths) -> str:
    """The DVC `robustness` stage: the slices evaluation, the gate and sweeps score on."""
    processes = (os.cpu_count() or 1) if params.prepare.robust_digits >= PARALLEL_FROM else 1
    sizes = write_slices(params, paths, processes=processes)
    return (f"robustness: {sizes['robust']} corrupted test digits, {sizes['robust_val']} corrupted val digits "
            f"({len(CORRUPTIONS)} corruptions)")
