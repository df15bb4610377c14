"""The foreign slice: digits that never were MNIST, read the way an uploaded photo is read.

Two sources, each built offline from what the project's own install brings:
- printed: digits typeset in font families shipped inside pinned PyPI wheels (serif, sans,
  mono, rounded and hand-drawn faces; several weights and italics), at small and large
  point sizes (small ones are blocky once blown up), slightly rotated;
- stroke: digits drawn as pen strokes along the Hershey vector fonts' centre lines, each by
  a "writer" of its own: slant, width, a smooth wobble of the line and a pen from fine
  (2 px) to marker (12 px).
Every digit is drawn dark on a 112×112 sheet of paper, given one of the robustness slice's
looks (clean, thick, thin, low-resolution, blurred, noisy, unevenly lit, JPEG) and converted
back by `imaging.to_mnist`, exactly like an upload.

Families are split, never digits: a family (a typeface with all its weights, a Hershey
glyph design with all the fonts that share it) is in `train` (mixed into the training
batches), `val` (sweeps choose by it) or `test` (the slice evaluation, the gate and the README
report), never in two. The DejaVu and Liberation families are refused by name wherever they
would come from: outside checks use them, and a check that the model trained on tells nobody
anything. Randomness is drawn per digit from a generator seeded by (split, source, class,
index): the slice is byte-identical from run to run, and a larger count keeps the smaller's digits.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from functools import cache

import numpy as np

from mnist_mlops.config import Params, Paths
from mnist_mlops.errors import UserError
from mnist_mlops.imaging import to_mnist
from mnist_mlops.preprocess import normalize
from mnist_mlops.training.robustness import CORRUPTIONS, NAMES, SHEET

SEED = 20_261_201
SOURCES = ("printed", "stroke")
SPLITS = ("train", "val", "test")
RESERVED = ("dejavu", "liberation")  # families kept for outside checks: never drawn here
LOOKS = ("clean", "clean", "clean", "thick_1", "thin_1", "lowres_12px", "lowres_8px", "blur_1", "noise_1",
         "paper_1", "jpeg_20")  # each digit gets one, uniformly: 3 in 11 clean
POINT_SIZES = (14, 20, 32, 72)  # the font's pixel size before the digit is scaled to the sheet


@dataclass(frozen=True)
class Family:
    name: str
    source: str  # printed | stroke
    split: str  # train | val | test
    styles: tuple[str, ...]  # "package:file" of a font in a wheel, or "hershey:font"


def faces(package: str, file: str, *styles: str) -> tuple[str, ...]:
    """The "package:file" of each style of a face: `faces("font_lato", "Lato-{}.ttf", "Regular", "Bold")`."""
    return tuple(f"{package}:{file.format(style)}" for style in styles)


# Chosen before any model was scored on them: each split holds sans and mono faces; serif and
# hand-drawn faces go to train and test. Hershey fonts that share their digits are one family;
# the blackletter (gothic) ones are left out: nobody writes or prints prices and meters in them.
FAMILIES: tuple[Family, ...] = (
    Family("Source Sans/Serif Pro", "printed", "train",
           faces("font_source_sans_pro", "SourceSansPro-{}.ttf", "Regular", "Bold", "Light", "It")
           + faces("font_source_serif_pro", "SourceSerifPro-{}.ttf", "Regular", "Bold", "Light", "It")),
    Family("Fira", "printed", "train", faces("pymupdf_fonts", "FiraGO_{}", "Regular", "Bold", "Italic")
           + faces("pymupdf_fonts", "FiraMono_{}", "Regular", "Bold")),
    Family("Space Mono", "printed", "train", faces("pymupdf_fonts", "SpaceMono_{}", "Regular", "Bold", "Italic")),
    Family("Lato", "printed", "train",
           faces("font_lato", "Lato-{}.ttf", "Regular", "Bold", "Light", "Black", "Italic")),
    Family("Manrope", "printed", "train", faces("font_manrope", "Manrope-{}.ttf", "Regular", "Bold", "ExtraLight")),
    Family("Fredoka One", "printed", "train", ("font_fredoka_one:FredokaOne-Regular.ttf",)),
    Family("Amatic SC", "printed", "train", faces("font_amatic_sc", "AmaticSC-{}.ttf", "Regular", "Bold")),
    Family("Hanken Grotesk", "printed", "val",
           faces("font_hanken_grotesk", "HankenGrotesk-{}.otf", "Regular", "Bold", "Light", "Italic")),
    Family("Cascadia Mono", "printed", "val", faces("pymupdf_fonts", "CascadiaMono_{}", "Regular", "Bold", "Italic")),
    Family("Caladea", "printed", "test",
           faces("font_caladea", "Caladea-{}.ttf", "Regular", "Bold", "Italic", "BoldItalic")),
    Family("Ubuntu", "printed", "test", faces("pymupdf_fonts", "Ubuntu_{}", "Regular", "Bold", "Italic")
           + faces("pymupdf_fonts", "UbuntuMono_{}", "Regular", "Bold")),
    Family("Noto Sans", "printed", "test", faces("pymupdf_fonts", "NotoSans_{}", "Regular", "Bold", "Italic")),
    Family("Red Hat Display", "printed", "test",
           faces("font_rhd", "RedHatDisplay-{}.ttf", "Regular", "Bold", "Light", "Black", "Italic")),
    Family("Intuitive", "printed", "test", ("font_intuitive:Intuitive.ttf",)),
    Family("Hershey simplex", "stroke", "train", ("hershey:futural", "hershey:rowmans", "hershey:cursive")),
    Family("Hershey complex", "stroke", "train", ("hershey:timesr", "hershey:timesi", "hershey:scripts")),
    Family("Hershey duplex", "stroke", "val", ("hershey:futuram", "hershey:rowmand")),
    Family("Hershey triplex", "stroke", "test", ("hershey:timesrb", "hershey:timesib")),
)


def allowed(name: str) -> bool:
    """False for a family or font the project must never draw (DejaVu, Liberation), by name."""
    flat = name.lower().replace(" ", "").replace("_", "").replace("-", "")
    return not any(word in flat for word in RESERVED)


def families(split: str | None = None, source: str | None = None) -> list[Family]:
    """The families of a split and source, reserved ones refused loudly (a typo can't slip one in)."""
    for fam in FAMILIES:
        if not allowed(fam.name) or not all(allowed(s) for s in fam.styles):
            raise UserError(f"foreign family '{fam.name}' is reserved for outside checks (DejaVu, Liberation)")
    return [f for f in FAMILIES if (split is None or f.split == split) and (source is None or f.source == source)]


# ----------------------------------------------------------------------------- printed


@cache
def font_bytes(style: str) -> bytes:
    """The TrueType/OpenType file of "package:file" (a file in a font wheel, or a pymupdf-fonts
    module holding one)."""
    import importlib
    from importlib import resources

    package, _, name = style.partition(":")
    try:
        if package == "pymupdf_fonts":
            return bytes(importlib.import_module(f"pymupdf_fonts.{name}").fontbuffer)
        return (resources.files(package) / "files" / name).read_bytes()
    except (ImportError, FileNotFoundError, OSError) as exc:
        raise UserError(f"font {style} is missing ({exc}): reinstall the project (make install)") from None


@cache
def _font(style: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(io.BytesIO(font_bytes(style)), size)


def _on_sheet(ink: np.ndarray, height: float, rng: np.random.Generator):
    """Dark ink (float 0–1, 1 = ink) scaled to `height` px, on a white SHEET×SHEET sheet at a
    small random offset, as a PIL "L" image."""
    from PIL import Image

    rows, cols = np.flatnonzero(ink.max(axis=1) > 0.05), np.flatnonzero(ink.max(axis=0) > 0.05)
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = min(height / crop.shape[0], (SHEET - 20) / crop.shape[1])
    w, h = max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))
    img = Image.fromarray(np.clip(crop * 255, 0, 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    sheet = np.zeros((SHEET, SHEET), np.uint8)
    top = (SHEET - h) // 2 + int(rng.integers(-4, 5))
    left = (SHEET - w) // 2 + int(rng.integers(-4, 5))
    top, left = min(max(top, 0), SHEET - h), min(max(left, 0), SHEET - w)
    sheet[top : top + h, left : left + w] = np.asarray(img)
    return Image.fromarray(255 - sheet)


def printed(style: str, digit: int, rng: np.random.Generator):
    """A digit typeset in `style` at a random point size, scaled to 44–76 px, rotated ±5°."""
    from PIL import Image, ImageDraw

    size = int(rng.choice(POINT_SIZES))
    font = _font(style, size)
    canvas = Image.new("L", (size * 3, size * 3), 0)
    ImageDraw.Draw(canvas).text((size, size // 2), str(digit), fill=255, font=font)
    sheet = _on_sheet(np.asarray(canvas, np.float32) / 255.0, rng.uniform(44, 76), rng)
    return sheet.rotate(rng.uniform(-5, 5), Image.Resampling.BICUBIC, fillcolor=255)


# ----------------------------------------------------------------------------- stroke


@cache
def hershey_digits(font: str) -> dict[int, tuple[np.ndarray, ...]]:
    """A Hershey font's centre lines of each digit, as float arrays of (x, y) points (y down)."""
    from HersheyFonts import HersheyFonts

    fonts = HersheyFonts()
    fonts.load_default_font(font)
    digits = {d: tuple(np.asarray(s, np.float64) for s in fonts.strokes_for_text(str(d)) if len(s))
              for d in range(10)}
    if not all(digits.values()):
        raise UserError(f"Hershey font {font} lacks a digit")
    return digits


def _densify(points: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Points every `step` units along a polyline (so a wobble bends lines, not just corners),
    and the mask of the original vertices among them (where the pen turns)."""
    if len(points) < 2:
        return points, np.ones(len(points), bool)
    seg = np.diff(points, axis=0)
    n = np.maximum(1, np.ceil(np.linalg.norm(seg, axis=1) / step).astype(int))
    t = np.concatenate([np.arange(k) / k for k in n])
    start = np.repeat(np.arange(len(seg)), n)
    out = np.vstack([points[start] + seg[start] * t[:, None], points[-1:]])
    corner = np.concatenate([t == 0, [True]])
    return out, corner


def stroked(style: str, digit: int, rng: np.random.Generator):
    """A digit drawn along a Hershey font's strokes by a random writer: slant, width, wobble, pen."""
    from PIL import Image, ImageDraw

    strokes = hershey_digits(style.partition(":")[2])[digit]
    pts = np.concatenate(strokes)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    height = max(hi[1] - lo[1], 1.0)
    slant, stretch = rng.uniform(-0.3, 0.3), rng.uniform(0.75, 1.25)
    freq, phase = rng.uniform(0.5, 2.0, 4), rng.uniform(0, 2 * np.pi, 4)
    wobble = rng.uniform(0.0, 0.03)  # of the digit's height, per sine
    target, pen = rng.uniform(44, 76), int(rng.choice((2, 3, 4, 6, 8, 10, 12)))
    lines = []
    for s in strokes:
        p, corner = _densify((s - (lo + hi) / 2) / height, 0.05)  # unit height, centred
        u, v = p[:, 0], p[:, 1]
        u = u + wobble * (np.sin(freq[0] * 2 * np.pi * v + phase[0]) + np.sin(freq[1] * 2 * np.pi * u + phase[1]))
        v = v + wobble * (np.sin(freq[2] * 2 * np.pi * u + phase[2]) + np.sin(freq[3] * 2 * np.pi * v + phase[3]))
        lines.append((np.column_stack([u * stretch - slant * v, v]), corner))
    every = np.concatenate([q for q, _ in lines])
    lo2, hi2 = every.min(axis=0), every.max(axis=0)
    scale = min(target / max(hi2[1] - lo2[1], 1e-6), (SHEET - 20) / max(hi2[0] - lo2[0], 1e-6))
    offset = SHEET / 2 - (lo2 + hi2) / 2 * scale + rng.integers(-4, 5, 2)
    img = Image.new("L", (SHEET, SHEET), 255)
    pen_draw = ImageDraw.Draw(img)
    r = pen / 2
    for q, corner in lines:
        xy = q * scale + offset
        if len(xy) > 1:
            pen_draw.line([tuple(c) for c in xy.tolist()], fill=0, width=pen)
        for cx, cy in xy[corner].tolist():  # round pen at the ends and where the line turns
            pen_draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    return img


# ----------------------------------------------------------------------------- the slices


def look(sheet, rng: np.random.Generator) -> np.ndarray:
    """One of LOOKS, then the upload conversion; a look that wipes the digit out (a thin pen
    eroded away) falls back to the clean sheet, so every digit in the slice is there to read."""
    name = LOOKS[int(rng.integers(len(LOOKS)))]
    if name == "clean":
        return to_mnist(np.asarray(sheet))
    out = to_mnist(np.asarray(CORRUPTIONS[NAMES.index(name)].apply(sheet, rng)))
    return out if out.max() > 0 else to_mnist(np.asarray(sheet))


@cache
def styles_of(split: str, source: str) -> tuple[tuple[Family, str], ...]:
    return tuple((f, s) for f in families(split, source) for s in f.styles)


def draw(split: str, source: str, digit: int, index: int) -> tuple[np.ndarray, int]:
    """The `index`-th digit `digit` of a split's source: uint8 28×28 and its family's index."""
    styles = styles_of(split, source)
    rng = np.random.default_rng([SEED, SPLITS.index(split), SOURCES.index(source), digit, index])
    fam, style = styles[(index + 3 * digit) % len(styles)]
    sheet = printed(style, digit, rng) if source == "printed" else stroked(style, digit, rng)
    return look(sheet, rng), FAMILIES.index(fam)


Row = tuple[str, int, int, int]  # split, source index, class, index within the class


def rows_of(split: str, count: int) -> list[Row]:
    """`count` digits of each source, the same number of each class, source-major."""
    per_class = max(1, count // 10)
    return [(split, src, d, i) for src in range(len(SOURCES)) for d in range(10) for i in range(per_class)]


def _draw_rows(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    drawn = [draw(split, SOURCES[src], d, i) for split, src, d, i in rows]
    return np.stack([x for x, _ in drawn]).astype(np.uint8), np.array([f for _, f in drawn], np.uint8)


CHUNK = 400  # digits per task when the stage draws over several processes


def build(split: str, count: int, processes: int = 1, chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """x uint8 N×28×28, y, source (index into SOURCES), family (index into FAMILIES) of a split.

    ~3 ms of Pillow and numpy per digit holds the GIL: `processes` > 1 spreads chunks over
    spawned processes (spawned, not forked: a caller may hold TensorFlow's threads)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    rows = rows_of(split, count)
    chunks = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    if processes > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(min(processes, len(chunks)), mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_draw_rows, chunks))
    else:
        parts = [_draw_rows(c) for c in chunks]
    return {"x": np.concatenate([x for x, _ in parts]), "y": np.array([r[2] for r in rows], np.uint8),
            "source": np.array([r[1] for r in rows], np.uint8), "family": np.concatenate([f for _, f in parts])}


def write(params: Params, paths: Paths, processes: int = 1) -> dict[str, int]:
    """artifacts/foreign/{train,val,test}_{x,y,source,family}.npy and families.json."""
    counts = {"train": params.foreign.train_digits, "val": params.foreign.digits, "test": params.foreign.digits}
    out = paths.foreign
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for split, count in counts.items():
        arrays = build(split, count, processes)
        for part, array in arrays.items():
            np.save(out / f"{split}_{part}.npy", array, allow_pickle=False)
        sizes[split] = len(arrays["y"])
    listing = [{"name": f.name, "source": f.source, "split": f.split, "styles": list(f.styles)} for f in FAMILIES]
    (out / "families.json").write_text(json.dumps(listing, indent=2) + "\n")
    return sizes


@dataclass(frozen=True)
class ForeignSlice:
    x: np.ndarray  # float32 N×28×28×1, normalised like every split
    y: np.ndarray
    source: np.ndarray
    family: np.ndarray


def load(paths: Paths, split: str) -> ForeignSlice:
    try:
        parts = {p: np.load(paths.foreign / f"{split}_{p}.npy") for p in ("x", "y", "source", "family")}
    except FileNotFoundError:
        raise UserError(f"no foreign '{split}' slice in {paths.foreign}: run `dvc repro foreign`") from None
    return ForeignSlice(normalize(parts["x"]), parts["y"], parts["source"], parts["family"])


def gate_slice(paths: Paths, params: Params) -> ForeignSlice:
    """The foreign test slice for the gate: built by the stage, else rebuilt (a pure function of params)."""
    if (paths.foreign / "test_y.npy").exists():
        return load(paths, "test")
    a = build("test", params.foreign.digits)
    return ForeignSlice(normalize(a["x"]), a["y"], a["source"], a["family"])


def metrics(correct: np.ndarray, s: ForeignSlice) -> dict[str, float]:
    """`foreign_accuracy` (every digit alike: the sources hold the same count), one per source,
    one per class and the worst class's (a mean must not hide a digit the model cannot read)."""
    out = {"foreign_accuracy": float(correct.mean()) if len(correct) else float("nan")}
    out |= {f"foreign_{name}": float(correct[s.source == i].mean())
            for i, name in enumerate(SOURCES) if (s.source == i).any()}
    per_class = {d: float(correct[s.y == d].mean()) for d in range(10) if (s.y == d).any()}
    out |= {f"foreign_class_{d}": acc for d, acc in per_class.items()}
    if per_class:
        out["foreign_worst_class"] = min(per_class.values())
    return out


def per_family(correct: np.ndarray, s: ForeignSlice) -> dict[str, float]:
    """Accuracy per family of the slice (the README's table)."""
    return {FAMILIES[f].name: round(float(correct[s.family == f].mean()), 4) for f in np.unique(s.family)}


def stage(params: Params, paths: Paths) -> str:
    """The DVC `foreign` stage: the training families' digits, the val and test slices."""
    processes = (os.cpu_count() or 1) if params.foreign.train_digits + params.foreign.digits >= 2 * CHUNK else 1
    sizes = write(params, paths, processes)
    return (f"foreign: {sizes['train']} training-family digits, {sizes['val']} val and {sizes['test']} test digits "
            f"({len(families('test'))} test families of {len(FAMILIES)})")
