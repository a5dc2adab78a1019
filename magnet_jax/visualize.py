"""Pictures for people: prediction overlays and training curves (PIL only, no matplotlib).

`overlay_prediction`: the input image (un-normalised) with the prediction filled in red and the
ground truth outlined in green, the sentence underneath.
`plot_curves`: metrics.jsonl curves (train loss, validation metrics) as one PNG.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from magnet_jax.data.images import IMAGENET_MEAN, IMAGENET_STD, mask_outline, overlay_mask

PRED_COLOUR = (230, 40, 40)
GT_COLOUR = (40, 220, 60)


def denormalize(image: np.ndarray) -> Image.Image:
    """A normalised (H, W, 3) float image back to an RGB PIL image."""
    rgb = (np.asarray(image, np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def overlay_prediction(image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None,
                       path: str | os.PathLike, caption: str = "", scale: int = 0) -> None:
    """Write the prediction (red fill) and ground truth (green outline) over the image.

    scale 0 picks an integer upscale so that small training images are at least 256 px wide.
    """
    img = overlay_mask(denormalize(image), np.asarray(pred, bool), PRED_COLOUR, 0.45, outline=0)
    rgb = np.asarray(img).copy()
    if gt is not None:
        rgb[mask_outline(np.asarray(gt) != 0, 1)] = GT_COLOUR
    img = Image.fromarray(rgb)
    scale = scale or max(1, math.ceil(256 / img.width))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if caption:
        canvas = Image.new("RGB", (img.width, img.height + 16), (255, 255, 255))
        canvas.paste(img, (0, 0))
        ImageDraw.Draw(canvas).text((3, img.height + 2), caption[:80], fill=(0, 0, 0))
        img = canvas
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The objects of a metrics.jsonl file (an unfinished last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike,
                keys: Sequence[str] | None = None, width: int = 640, height: int = 200) -> list[str]:
    """One panel per key (default: train/loss and every */mIoU, */oIoU) against step.

    Returns the keys drawn."""
    rows = read_metrics(metrics_path)
    if keys is None:
        found = sorted({k for r in rows for k in r})
        keys = [k for k in found if k == "train/loss"] + \
               [k for k in found if k.endswith("/oIoU") or k.endswith("/mIoU")]
    keys = [k for k in keys if any(k in r for r in rows)]
    canvas = Image.new("RGB", (width, max(1, len(keys)) * height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for panel, key in enumerate(keys):
        pts = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
        top = panel * height
        left, right, bottom = 50, width - 10, top + height - 20
        draw.rectangle((left, top + 10, right, bottom), outline=(160, 160, 160))
        draw.text((left + 4, top + 12), key, fill=(0, 0, 0))
        if not pts:
            continue
        xs, ys = np.asarray(pts, np.float64).T
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1)
        y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-9)
        draw.text((2, top + 10), f"{y1:.3g}", fill=(0, 0, 0))
        draw.text((2, bottom - 10), f"{y0:.3g}", fill=(0, 0, 0))
        draw.text((right - 60, bottom + 4), f"step {int(x1)}", fill=(0, 0, 0))
        px = left + (xs - x0) / (x1 - x0) * (right - left)
        py = bottom - (ys - y0) / (y1 - y0) * (bottom - top - 20)
        line = list(zip(px.tolist(), py.tolist()))
        if len(line) > 1:
            draw.line(line, fill=(30, 90, 200), width=2)
        else:
            draw.ellipse((line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2),
                         fill=(30, 90, 200))
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return list(keys)
