"""Evaluation protocols (`data_formats.md` §5.2, §5.6): where predictions meet ground truth.

magnet    the official evaluation behind the published table: the input-size (S × S) logits
          (stride-4 mask logits, bilinear align_corners=True) against the ground truth resized
          to S × S with nearest neighbour; foreground where sigmoid > 0.5.
original  the stride-4 mask logits upsampled (bilinear, align_corners=True) straight to the
          image's original (H, W) and compared with the mask at its native resolution.

Both count per-expression intersection and union; the aggregates are metrics.py's. The
`original` upsampling runs on the host (every image has its own size, so one compiled
function per size would be wasteful): a separable product of two interpolation matrices,
the same weights as torch's `interpolate(mode="bilinear", align_corners=True)`.
"""

from __future__ import annotations

import numpy as np

PROTOCOLS = ("magnet", "original")


def align_corners_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out, in) float64 weights of 1-D linear interpolation with align_corners=True."""
    if out_size < 1 or in_size < 1:
        raise ValueError(f"sizes must be positive, got out {out_size}, in {in_size}")
    weights = np.zeros((out_size, in_size), np.float64)
    if in_size == 1 or out_size == 1:
        weights[:, 0] = 1.0
        return weights
    pos = np.arange(out_size, dtype=np.float64) * (in_size - 1) / (out_size - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), in_size - 2)
    frac = pos - lo
    rows = np.arange(out_size)
    weights[rows, lo] = 1.0 - frac
    weights[rows, lo + 1] += frac
    return weights


def resize_logits(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) logits -> (H, W) float32 by bilinear interpolation with align_corners=True."""
    logits = np.asarray(logits, np.float64)
    rows = align_corners_matrix(size[0], logits.shape[0])
    cols = align_corners_matrix(size[1], logits.shape[1])
    return (rows @ logits @ cols.T).astype(np.float32)


def intersection_union_np(logits: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(I, U) of one prediction (foreground where logit > 0, i.e. sigmoid > 0.5) and a mask."""
    pred = np.asarray(logits) > 0
    gt = np.asarray(target) != 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def check_protocol(name: str) -> str:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return name
