"""Image decoding, MagNet's input preprocessing, and mask outputs (overlay, PNG).

Preprocessing follows `data_formats.md` §4 exactly: PIL decode, `.convert("RGB")`, PIL
`resize((size, size), BILINEAR)` (antialiased when downscaling, aspect ratio not kept), then
`x / 255` and `(x - mean) / std` with the ImageNet statistics, in float32 and in that order.
The result is NHWC-ready (size, size, 3) float32.

Decoding matches the official loader (`Image.open(path).convert("RGB")`) for every mode that
loader handles sensibly: grey-scale, palette, CMYK, RGBA and LA (alpha is dropped, not
composited: that is what `.convert("RGB")` does). EXIF orientation is not applied, as in the
official loader. One deliberate difference: 16-bit grey images (modes `I;16*`, and `I` as
PNG/TIFF decoders produce for 16-bit samples) are mapped to 8 bit by keeping the high byte
(`v >> 8`, i.e. 0..65535 → 0..255); Pillow's own `.convert("RGB")` would clip every value above
255 to white.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = np.asarray((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.asarray((0.229, 0.224, 0.225), np.float32)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageReadError(ValueError):
    """A file that exists but cannot be decoded as an image."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_image_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` into an 8-bit RGB PIL image (first frame of animated files).

    Raises FileNotFoundError for a missing path and ImageReadError (a ValueError) for a file that
    is not a readable image; both messages are one line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageReadError(f"not an image file: {path}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageReadError(f"cannot read image {path}: {reason}") from None


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = size
    return int(height), int(width)


def preprocess_image(img: Image.Image, size: int | tuple[int, int]) -> np.ndarray:
    """MagNet's test-time transform: float32 (H, W, 3), normalised with the ImageNet statistics.

    `size` is an int (square, as MagNet uses: 480 or 448) or (height, width).
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r} (use load_image_rgb)")
    height, width = _hw(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    resized = img.resize((width, height), Image.BILINEAR)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def _as_mask(mask, height: int, width: int) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (height, width):
        raise ValueError(
            f"mask shape {mask.shape} does not match the image (height, width) ({height}, {width})"
        )
    return mask.astype(bool)


def _erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, constant_values=False)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The band of `mask` within `width` 4-neighbour steps of its outside (image borders count
    as outside); width 1 is the pixels with a 4-neighbour outside the mask."""
    mask = np.asarray(mask, bool)
    interior = mask
    for _ in range(max(int(width), 0)):
        interior = _erode(interior)
    return mask & ~interior


def overlay_mask(
    img: Image.Image,
    mask: np.ndarray,
    color: tuple[int, int, int] = (255, 0, 0),
    alpha: float = 0.5,
    outline: int = 2,
) -> Image.Image:
    """Blend `color` into the masked pixels of `img` and draw the mask's outline in `color`.

    img: RGB PIL image; mask: bool (H, W) at the image's resolution; outline: width in pixels of
    the opaque border drawn inside the mask (0: none). Returns a new RGB image.
    """
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.asarray(img.convert("RGB"), np.float32)
    mask = _as_mask(mask, rgb.shape[0], rgb.shape[1])
    paint = np.asarray(color, np.float32).reshape(1, 1, 3)
    out = np.where(mask[..., None], rgb * (1.0 - alpha) + paint * alpha, rgb)
    out = np.where(mask_outline(mask, outline)[..., None], paint, out)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def save_mask_png(mask: np.ndarray, path: str | os.PathLike) -> None:
    """Write a 2-D mask as an 8-bit grey-scale PNG: 255 inside, 0 outside."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask.astype(bool), 255, 0).astype(np.uint8)).save(path, format="PNG")
