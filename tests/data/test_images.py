"""magnet_jax.data.images: decoding of every image mode, MagNet's preprocessing, overlays, PNG masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magnet_jax.data import images

SAMPLE = Path(images.__file__).resolve().parent.parent / "assets" / "sample.jpg"


def _gradient(h=24, w=32):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) % 256], -1).astype(
        np.uint8
    )


def _save(img: Image.Image, tmp_path, name) -> Path:
    path = tmp_path / name
    img.save(path)
    return path


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", ["rgb.png", "rgb.jpg", "rgb.bmp", "rgb.tif", "rgb.webp"])
def test_rgb_files_round_trip(tmp_path, name):
    src = Image.fromarray(_gradient())
    path = _save(src, tmp_path, name)
    img = images.load_image_rgb(path)
    assert img.mode == "RGB" and img.size == (32, 24)
    with Image.open(path) as ref:
        np.testing.assert_array_equal(np.asarray(img), np.asarray(ref.convert("RGB")))
    if name.endswith((".png", ".bmp", ".tif")):  # lossless
        np.testing.assert_array_equal(np.asarray(img), _gradient())


def test_greyscale_is_replicated(tmp_path):
    grey = _gradient()[..., 0]
    img = images.load_image_rgb(_save(Image.fromarray(grey), tmp_path, "l.png"))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.repeat(grey[..., None], 3, -1))


def test_rgba_alpha_is_dropped_not_composited(tmp_path):
    rgb = _gradient()
    alpha = np.zeros(rgb.shape[:2], np.uint8)  # fully transparent: composite on black would be 0
    img = images.load_image_rgb(
        _save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path, "rgba.png")
    )
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgb)


def test_la_alpha_is_dropped(tmp_path):
    grey = _gradient()[..., 1]
    src = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(np.full_like(grey, 7))])
    img = images.load_image_rgb(_save(src, tmp_path, "la.png"))
    np.testing.assert_array_equal(np.asarray(img), np.repeat(grey[..., None], 3, -1))


def test_palette(tmp_path):
    src = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = _save(src, tmp_path, "p.png")
    with Image.open(path) as check:
        assert check.mode == "P"
    img = images.load_image_rgb(path)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(src.convert("RGB")))


def test_palette_gif_with_transparency(tmp_path):
    src = Image.fromarray(_gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    path = tmp_path / "p.gif"
    src.save(path, transparency=0)
    img = images.load_image_rgb(path)
    assert img.mode == "RGB" and img.size == (32, 24)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
        expected = np.asarray(check.convert("RGB"))
    img = images.load_image_rgb(path)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), expected)


def test_bilevel(tmp_path):
    bits = _gradient()[..., 0] > 128
    img = images.load_image_rgb(_save(Image.fromarray(bits), tmp_path, "one.png"))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], np.where(bits, 255, 0))


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_sixteen_bit_grey_keeps_high_byte(tmp_path, suffix):
    values = np.array([[0, 255, 256, 4095], [32767, 32768, 65280, 65535]], np.uint16)
    path = tmp_path / f"g16.{suffix}"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode in ("I;16", "I;16B", "I;16L", "I")
        clipped = np.asarray(check.convert("RGB"))[..., 0]
    img = images.load_image_rgb(path)
    expected = np.array([[0, 0, 1, 15], [127, 128, 255, 255]], np.uint8)
    np.testing.assert_array_equal(np.asarray(img), np.repeat(expected[..., None], 3, -1))
    assert clipped.tolist() != expected.tolist()  # what plain Pillow would have produced


def test_int32_mode_i(tmp_path):
    values = np.array([[0, 256, 65535, 70000]], np.int32)
    img = images._to_rgb(Image.fromarray(values))
    np.testing.assert_array_equal(np.asarray(img)[..., 0], [[0, 1, 255, 255]])


def test_exif_orientation_is_not_applied(tmp_path):
    """The official loader ignores EXIF orientation; so do we (pixels come as stored)."""
    src = Image.fromarray(_gradient())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "exif.jpg"
    src.save(path, exif=exif, quality=95)
    assert images.load_image_rgb(path).size == (32, 24)


def test_returned_image_is_detached_from_file(tmp_path):
    path = _save(Image.fromarray(_gradient()), tmp_path, "rgb.png")
    img = images.load_image_rgb(path)
    path.unlink()
    assert np.asarray(img).shape == (24, 32, 3)


# ---------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError) as info:
        images.load_image_rgb(missing)
    assert str(info.value) == f"image not found: {missing}"


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        images.load_image_rgb(tmp_path)


def test_non_image_file(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ValueError) as info:
        images.load_image_rgb(path)
    assert isinstance(info.value, images.ImageReadError)
    assert str(info.value) == f"not an image file: {path}"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(images.ImageReadError, match="empty.png"):
        images.load_image_rgb(path)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_truncated_file(tmp_path, suffix):
    path = _save(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)),
        tmp_path,
        f"full.{suffix}",
    )
    data = path.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(images.ImageReadError) as info:
        images.load_image_rgb(cut)
    message = str(info.value)
    assert message.startswith(f"cannot read image {cut}: ") and "\n" not in message


# ---------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_definition():
    img = Image.fromarray(_gradient(40, 60))
    out = images.preprocess_image(img, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    resized = np.asarray(img.resize((16, 16), Image.BILINEAR), np.float32) / np.float32(255)
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    np.testing.assert_array_equal(out, (resized - mean) / std)


def test_preprocess_bilinear_antialiases_when_downscaling():
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = images.preprocess_image(Image.fromarray(checker).convert("RGB"), 8)
    grey = out[..., 0] * 0.229 + 0.485
    np.testing.assert_allclose(grey, 0.5, atol=0.01)  # PIL's filter averages the checkerboard


def test_preprocess_rectangular_size_is_height_width():
    out = images.preprocess_image(Image.fromarray(_gradient()), (10, 20))
    assert out.shape == (10, 20, 3)


def test_preprocess_matches_torchvision_style_reference():
    """x/255 then (x-mean)/std in float32, as ToTensor + Normalize (torch, when installed)."""
    torch = pytest.importorskip("torch")
    img = Image.fromarray(_gradient(30, 50))
    resized = img.resize((12, 12), Image.BILINEAR)
    t = torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    ref = t.sub(mean).div(std).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(images.preprocess_image(img, 12), ref)


def test_preprocess_sample_asset():
    img = images.load_image_rgb(SAMPLE)
    assert img.size == (320, 240)
    out = images.preprocess_image(img, 480)
    assert out.shape == (480, 480, 3) and np.isfinite(out).all()
    assert -2.2 < out.min() < out.max() < 2.7


def test_preprocess_errors():
    with pytest.raises(ValueError, match="expected an RGB image, got mode 'L'"):
        images.preprocess_image(Image.new("L", (4, 4)), 8)
    with pytest.raises(TypeError, match="PIL image"):
        images.preprocess_image(np.zeros((4, 4, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="positive"):
        images.preprocess_image(Image.new("RGB", (4, 4)), 0)


# ---------------------------------------------------------------------------- outputs


def test_overlay_blends_and_outlines():
    img = Image.new("RGB", (10, 8), (100, 100, 100))
    mask = np.zeros((8, 10), bool)
    mask[2:6, 3:8] = True
    out = np.asarray(images.overlay_mask(img, mask, color=(255, 0, 0), alpha=0.5, outline=1))
    assert out.shape == (8, 10, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], 100)  # outside untouched
    np.testing.assert_array_equal(out[3:5, 4:7], [[[178, 50, 50]] * 3] * 2)  # interior blended
    outline = mask.copy()
    outline[3:5, 4:7] = False
    np.testing.assert_array_equal(out[outline], [[255, 0, 0]] * int(outline.sum()))


def test_overlay_outline_width():
    img = Image.new("RGB", (12, 12), (0, 0, 0))
    mask = np.zeros((12, 12), bool)
    mask[1:11, 1:11] = True
    for width, opaque in [(0, 0), (1, 36), (2, 64), (3, 84)]:
        out = np.asarray(
            images.overlay_mask(img, mask, color=(200, 0, 0), alpha=0.5, outline=width)
        )
        assert int((out[..., 0] == 200).sum()) == opaque, width
        assert int((out[..., 0] == 100).sum()) == 100 - opaque, width
    default = np.asarray(images.overlay_mask(img, mask, color=(200, 0, 0)))
    assert int((default[..., 0] == 200).sum()) == 64  # 2-pixel outline by default


def test_overlay_empty_and_full_masks():
    img = Image.new("RGB", (5, 4), (10, 20, 30))
    np.testing.assert_array_equal(
        np.asarray(images.overlay_mask(img, np.zeros((4, 5), bool))), np.asarray(img)
    )
    full = np.asarray(
        images.overlay_mask(img, np.ones((4, 5), bool), color=(0, 0, 255), alpha=0.0, outline=1)
    )
    np.testing.assert_array_equal(
        full[1:3, 1:4], [[[10, 20, 30]] * 3] * 2
    )  # alpha 0: interior unchanged
    np.testing.assert_array_equal(full[0], [[0, 0, 255]] * 5)  # image border is outline


def test_overlay_errors():
    img = Image.new("RGB", (5, 4))
    with pytest.raises(ValueError, match=r"mask shape \(5, 4\) does not match"):
        images.overlay_mask(img, np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="alpha"):
        images.overlay_mask(img, np.zeros((4, 5), bool), alpha=1.5)


def test_save_mask_png(tmp_path):
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:5] = True
    path = tmp_path / "sub" / "mask.png"
    images.save_mask_png(mask, path)
    with Image.open(path) as back:
        assert back.format == "PNG" and back.mode == "L" and back.size == (7, 6)
        np.testing.assert_array_equal(np.asarray(back), np.where(mask, 255, 0))
    with pytest.raises(ValueError, match="2-D"):
        images.save_mask_png(np.zeros((1, 6, 7), bool), tmp_path / "bad.png")


def test_mask_outline_single_pixel_and_line():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    np.testing.assert_array_equal(images.mask_outline(mask), mask)
    block = np.zeros((5, 5), bool)
    block[1:4, 1:4] = True
    ring = block.copy()
    ring[2, 2] = False
    np.testing.assert_array_equal(images.mask_outline(block), ring)


def test_mask_outline_width():
    block = np.ones((7, 7), bool)
    np.testing.assert_array_equal(images.mask_outline(block, 0), np.zeros((7, 7), bool))
    inner = np.zeros((7, 7), bool)
    inner[2:5, 2:5] = True
    np.testing.assert_array_equal(images.mask_outline(block, 2), block & ~inner)
