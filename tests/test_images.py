"""The one decode/encode path: depths, channels, orientation, limits, clear errors."""

from __future__ import annotations

import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image

from nafnet_core.images import (
    Decoded,
    ImageError,
    from_tensor,
    read_image,
    read_rgb8,
    to_tensor,
    to_uint8,
    write_image,
    write_rgb8,
)

RNG = np.random.default_rng(0)


def rand(shape, dtype=np.uint8):
    return RNG.integers(0, np.iinfo(dtype).max + 1, size=shape, dtype=np.int64).astype(dtype)


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".webp"])
def test_rgb8_lossless_roundtrip(tmp_path, suffix):
    a = rand((17, 23, 3))
    if suffix == ".webp":
        Image.fromarray(a).save(tmp_path / "a.webp", lossless=True)
    else:
        write_rgb8(tmp_path / f"a{suffix}", a)
    img = read_image(tmp_path / f"a{suffix}")
    assert img.dtype == np.uint8 and not img.gray and img.alpha is None
    np.testing.assert_array_equal(img.rgb, a)


def test_png16_rgb_is_read_at_full_depth(tmp_path):
    a = rand((9, 11, 3), np.uint16)
    with open(tmp_path / "a.png", "wb") as f:
        png.Writer(11, 9, greyscale=False, bitdepth=16).write(f, a.reshape(9, -1))
    img = read_image(tmp_path / "a.png")
    assert img.dtype == np.uint16
    np.testing.assert_array_equal(img.rgb, a)  # Pillow alone would give 8-bit values here
    write_image(tmp_path / "b.png", img)
    np.testing.assert_array_equal(read_image(tmp_path / "b.png").rgb, a)


def test_png16_gray_and_rgba(tmp_path):
    g = rand((8, 10), np.uint16)
    Image.fromarray(g).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.gray and img.dtype == np.uint16
    np.testing.assert_array_equal(img.rgb[:, :, 1], g)
    rgba = rand((8, 10, 4), np.uint16)
    with open(tmp_path / "rgba.png", "wb") as f:
        png.Writer(10, 8, greyscale=False, alpha=True, bitdepth=16).write(f, rgba.reshape(8, -1))
    img = read_image(tmp_path / "rgba.png")
    np.testing.assert_array_equal(img.rgb, rgba[:, :, :3])
    np.testing.assert_array_equal(img.alpha, rgba[:, :, 3])
    write_image(tmp_path / "out.png", img)
    with open(tmp_path / "out.png", "rb") as f:
        w, h, rows, info = png.Reader(file=f).asDirect()
        back = np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, 4)
    assert info["alpha"] and info["bitdepth"] == 16
    np.testing.assert_array_equal(back, rgba)


def test_rgba8_alpha_kept_and_gray_written_gray(tmp_path):
    rgba = rand((12, 14, 4))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(img.alpha, rgba[:, :, 3])
    out = from_tensor(to_tensor(img) * 0.5, img)
    write_image(tmp_path / "o.png", out)
    back = np.asarray(Image.open(tmp_path / "o.png"))
    assert back.shape == (12, 14, 4)
    np.testing.assert_array_equal(back[:, :, 3], rgba[:, :, 3])
    gray = rand((12, 14))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.gray and img.rgb.shape == (12, 14, 3)
    write_image(tmp_path / "g2.png", img)
    back = Image.open(tmp_path / "g2.png")
    assert back.mode == "L"
    np.testing.assert_array_equal(np.asarray(back), gray)


def test_palette_and_cmyk(tmp_path):
    a = rand((10, 10, 3))
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    ref = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(read_rgb8(tmp_path / "p.png"), ref)
    Image.fromarray(a).convert("CMYK").save(tmp_path / "c.jpg")
    img = read_image(tmp_path / "c.jpg")
    assert img.rgb.shape == (10, 10, 3) and img.alpha is None


@pytest.mark.parametrize("orientation, expect", [(1, lambda a: a), (3, lambda a: a[::-1, ::-1]),
                                                 (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_applied(tmp_path, orientation, expect):
    a = rand((6, 9, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(tmp_path / "o.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "o.png").rgb, expect(a))
    t = rand((6, 9, 3), np.uint16)
    tifffile.imwrite(tmp_path / "o.tif", t, photometric="rgb", extratags=[(274, "H", 1, orientation, True)])
    np.testing.assert_array_equal(read_image(tmp_path / "o.tif").rgb, expect(t))


def test_tiff_16bit_and_float(tmp_path):
    a = rand((7, 5, 3), np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb")
    img = read_image(tmp_path / "a.tif")
    np.testing.assert_array_equal(img.rgb, a)
    f = RNG.random((7, 5, 3), dtype=np.float32)
    tifffile.imwrite(tmp_path / "f.tif", f, photometric="rgb")
    img = read_image(tmp_path / "f.tif")
    assert img.dtype == np.float32
    torch.testing.assert_close(to_tensor(img), torch.from_numpy(f).permute(2, 0, 1)[None])
    write_image(tmp_path / "f2.tif", from_tensor(to_tensor(img), img))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "f2.tif"), f)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 2.5])
def test_float_tiff_out_of_range_refused(tmp_path, bad):
    f = np.zeros((4, 4, 3), np.float32)
    f[1, 2, 0] = bad
    tifffile.imwrite(tmp_path / "f.tif", f, photometric="rgb")
    with pytest.raises(ImageError, match="f.tif"):
        read_image(tmp_path / "f.tif")


def test_pixel_limit_and_corrupt_files(tmp_path):
    write_rgb8(tmp_path / "a.png", rand((20, 20, 3)))
    with pytest.raises(ImageError, match="decompression bomb"):
        read_image(tmp_path / "a.png", max_pixels=399)
    assert read_image(tmp_path / "a.png", max_pixels=400).size == (20, 20)
    tifffile.imwrite(tmp_path / "a.tif", rand((20, 20, 3), np.uint16), photometric="rgb")
    with pytest.raises(ImageError, match="decompression bomb"):
        read_image(tmp_path / "a.tif", max_pixels=399)
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ["cut.png", "text.jpg", "missing.png"]:
        with pytest.raises(ImageError, match=name):
            read_image(tmp_path / name)


def test_tensor_conversions_scale_and_round():
    a = np.array([[[0, 128, 255]]], np.uint8)
    t = to_tensor(a)
    assert t.shape == (1, 3, 1, 1) and t.dtype == torch.float32
    np.testing.assert_array_equal(to_uint8(t), a)
    img = Decoded(np.array([[[0, 32768, 65535]]], np.uint16))
    torch.testing.assert_close(to_tensor(img).flatten(), torch.tensor([0.0, 32768 / 65535, 1.0]))
    out = from_tensor(torch.tensor([-0.5, 0.5, 1.5]).view(1, 3, 1, 1), img)
    np.testing.assert_array_equal(out.rgb.ravel(), [0, 32768, 65535])  # clamped, 32767.5 rounds to even


def test_write_16bit_to_jpeg_reduces_depth(tmp_path):
    img = Decoded(np.full((8, 8, 3), 65535, np.uint16))
    write_image(tmp_path / "a.jpg", img)
    assert read_image(tmp_path / "a.jpg").rgb.min() >= 250
    with pytest.raises(ImageError, match="suffix"):
        write_image(tmp_path / "a.xyz", img)
