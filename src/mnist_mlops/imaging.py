"""Real images → MNIST-style digits: the classic MNIST normalisation, shared by uploads and drawings.

MNIST digits are white strokes on black, size-normalised to fit a 20×20 box (aspect ratio
kept) and centred by centre of mass in a 28×28 frame. A photo or a drawing is turned
into the same thing here, and then goes through `mnist_mlops.preprocess.normalize`,
the function training uses, so the model sees served images exactly as it saw its data.

Pillow + numpy only (no TensorFlow): cheap to import and safe to run in any process.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from mnist_mlops.preprocess import normalize

BOX = 20  # the digit is scaled to fit BOX×BOX ...
SIZE = 28  # ... and centred in SIZE×SIZE
DEFAULT_MAX_PIXELS = 25_000_000  # decoded width × height above which an image is refused
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
WORK_SIDE = 1024  # larger images are shrunk to this long side right after decoding
FORMATS = ("PNG", "JPEG")


class ImageError(ValueError):
    """The bytes are not a usable PNG/JPEG digit; the message says why, in one line."""


class ImageTooLarge(ImageError):
    """The image (bytes or decoded pixels) is over the configured limit."""


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """PNG/JPEG bytes → float32 H×W grayscale in [0, 1] (alpha composited on white).

    Refuses non-images, other formats, truncated files and images over `max_pixels`
    *before* decoding the pixel data (no decompression bombs).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError("empty image file")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image file is {len(data)} bytes: at most {max_bytes} allowed")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image is {width}×{height} pixels: at most {max_pixels} pixels allowed")
            if img.format == "JPEG" and max(width, height) > WORK_SIDE:  # decode at a fraction of the size
                img.draft(img.mode, (max(1, width * WORK_SIDE // max(width, height)),
                                     max(1, height * WORK_SIDE // max(width, height))))
            img.load()
            img = shrunk(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"image is too large to decode: at most {max_pixels} pixels allowed") from None
    except UnidentifiedImageError:
        raise ImageError("not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageError(f"corrupt or truncated image: {reason}") from None
    if width < 1 or height < 1:
        raise ImageError("image has no pixels")
    return to_grayscale(img)


def shrunk(img):
    """At most `WORK_SIDE` pixels on the long side (box-averaged: antialiased), before any float
    work: the digit ends up 20×20, and a 5000×5000 photo as float32 copies is hundreds of MB."""
    factor = -(-max(img.size) // WORK_SIDE)
    if factor <= 1:
        return img
    if img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("RGBA" if "transparency" in img.info or "A" in img.mode else "RGB")
    return img.reduce(factor)


def to_grayscale(img) -> np.ndarray:
    """A PIL image of any mode → float32 H×W in [0, 1]; transparency becomes white paper."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    gray = img.convert("L")
    return np.asarray(gray, dtype=np.float32) / 255.0


NOISY = 0.03  # background noise (robust σ) above which the image is median-filtered first
UNEVEN = 0.05  # a background varying more than this across the image is lit unevenly


def _border(g: np.ndarray) -> np.ndarray:
    return np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])


def background(g: np.ndarray) -> np.ndarray | float:
    """The paper's level under the ink, from the border (taken to be paper): its median, or,
    where the border shows uneven light (a phone photo lit from one side), the plane fitted
    to it, so a shadowed corner is not mistaken for ink."""
    h, w = g.shape
    ys = np.concatenate([np.zeros(w), np.full(w, h - 1), np.arange(h), np.arange(h)])
    xs = np.concatenate([np.arange(w), np.arange(w), np.zeros(h), np.full(h, w - 1)])
    design = np.column_stack([np.ones_like(ys), ys / max(h, w), xs / max(h, w)])
    coef, *_ = np.linalg.lstsq(design, _border(g), rcond=None)
    if abs(coef[1]) * h / max(h, w) + abs(coef[2]) * w / max(h, w) < UNEVEN:
        return float(np.median(_border(g)))
    yy, xx = np.ogrid[0:h, 0:w]  # broadcast: one h×w array, not two float64 grids
    return (coef[0] + coef[1] * (yy / max(h, w)) + coef[2] * (xx / max(h, w))).astype(np.float32)


def noise_level(ink: np.ndarray) -> float:
    """About σ of the border's grain (paper or sensor noise), from the 90th percentile of its
    deviations: robust to a few strokes touching the border, and not fooled when white
    paper clips half the noise away (a median absolute deviation reads 0 there)."""
    b = _border(ink)
    return float(np.percentile(np.abs(b - np.median(b)), 90) / 1.645)


def median3(a: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageFilter

    shift = float(a.min())
    img = Image.fromarray(np.clip((a - shift) * 255.0, 0, 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3))
    return np.asarray(img, np.float32) / 255.0 + shift


def without_specks(mask: np.ndarray) -> np.ndarray:
    """The mask opened (3×3 erosion, then dilation): grain the median left is dropped, so it
    cannot stretch the digit's bounding box; strokes, wider than 3 px, survive."""
    from PIL import Image, ImageFilter

    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))) > 0


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Grayscale H×W (floats in [0, 1] or uint8) → uint8 28×28, MNIST-style.

    1. light-on-dark: inverted when the background (the border) is lighter than the middle
       of the value range, so dark-on-light ink becomes white-on-black like MNIST;
       the paper's level (a plane where the light is uneven) is subtracted, and grainy
       images are median-filtered, so only the strokes count as ink;
    2. cropped to the bounding box of the ink;
    3. scaled (antialiased) so the longer side is 20 pixels, aspect ratio kept;
    4. placed in 28×28 so that its centre of mass is at the centre (whole pixels), and
       stretched so the strongest stroke is 255.
    A blank image gives a blank 28×28 digit.
    """
    ink = _ink(gray)
    return _centred(ink / ink.max()) if ink.any() else np.zeros((SIZE, SIZE), np.uint8)


def _ink(gray: np.ndarray) -> np.ndarray:
    """Step 1 of `to_mnist`: light-on-dark floats, the paper's level and grain removed; 0 where no ink."""
    g = np.asarray(gray)
    if g.ndim != 2:
        raise ImageError(f"expected a 2-D grayscale image, got shape {g.shape}")
    g = g.astype(np.float32) / 255.0 if np.issubdtype(g.dtype, np.integer) else g.astype(np.float32)
    g = np.clip(np.nan_to_num(g, nan=0.0), 0.0, 1.0)
    if float(np.median(_border(g))) > 0.5:
        g = 1.0 - g
    ink = g - background(g)
    level = noise_level(ink)
    noisy = level > NOISY
    if noisy:  # a grainy photo or scan: a 3×3 median removes the grain, keeps strokes
        ink = median3(ink)
        level = noise_level(ink)
    # Ink: anything clearly above the background (grey paper, uneven light, JPEG and sensor noise).
    ink[ink < max(0.1, 4.0 * level)] = 0.0
    if noisy:
        ink *= without_specks(ink > 0)
    return ink


def _centred(ink: np.ndarray) -> np.ndarray:
    """Steps 2-4 of `to_mnist`: the ink (max 1) cropped, scaled to 20 pixels, centred by mass in 28×28."""
    from PIL import Image

    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = Image.fromarray((crop * 255).astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS)
    digit = np.asarray(resized, dtype=np.float32)
    # Centre of mass to the frame's centre (as the original MNIST preparation did).
    total = digit.sum()
    cy, cx = ((np.indices(digit.shape) * digit).reshape(2, -1).sum(axis=1) / total) if total else (nh / 2, nw / 2)
    top = int(round(SIZE / 2 - cy))
    left = int(round(SIZE / 2 - cx))
    top = min(max(top, 0), SIZE - nh)
    left = min(max(left, 0), SIZE - nw)
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + nh, left : left + nw] = digit
    if out.max() > 0:
        out *= 255.0 / out.max()  # full-contrast strokes, like MNIST's
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def image_to_input(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                   max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """PNG/JPEG bytes → the model's input: float32 1×28×28×1 via the training normalisation."""
    return normalize(to_mnist(decode(data, max_pixels, max_bytes)))
