"""Referring-segmentation metrics (`data_formats.md` §5.1): oIoU, mIoU, precision@t.

Per sample i with binary prediction P_i and ground truth G_i:
    I_i = |P_i ∩ G_i|, U_i = |P_i ∪ G_i|, IoU_i = I_i / U_i, and IoU_i = 0 when U_i = 0
    (the official convention: an empty prediction on an empty target scores 0, not 1).
    oIoU = ΣI / ΣU, mIoU = mean IoU_i, prec@t = mean [IoU_i >= t] (>=, not CRIS's >).

`intersection_union` runs on device (jit-able) and returns per-sample integer counts;
`MetricAccumulator` sums them on the host in int64 / float64, so the result does not depend on
batch size, order or how samples are split over hosts (every metric is a ratio of sums).
Samples with weight 0 (evaluation padding) are ignored. Values are fractions, not ×100.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: jax.Array, gt: jax.Array, *,
                       from_logits: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-sample (I, U) int32 of shape (B,) from (B, H, W) predictions and 0/1 ground truth.

    Every axis after the first is a pixel axis ((B, H*W) works too).

    `pred` is either mask logits (float: foreground where sigmoid(logit) > 0.5, i.e. logit > 0)
    or a binary mask (bool/integer). `from_logits` overrides the dtype-based choice, e.g. for a
    float 0/1 mask pass False.
    """
    pred, gt = jnp.asarray(pred), jnp.asarray(gt)
    if pred.shape != gt.shape or pred.ndim < 2:
        raise ValueError(f"prediction shape {pred.shape} and ground-truth shape {gt.shape} must "
                         "be equal, (batch, pixels...)")
    if from_logits is None:
        from_logits = jnp.issubdtype(pred.dtype, jnp.floating)
    # sigmoid(x) > 0.5 <=> x > 0 exactly, and avoids float32 rounding of sigmoid near 0.5.
    p = pred > 0 if from_logits else pred != 0
    g = gt != 0
    axes = tuple(range(1, p.ndim))
    inter = jnp.sum(p & g, axis=axes, dtype=jnp.int32)
    union = jnp.sum(p | g, axis=axes, dtype=jnp.int32)
    return inter, union


def iou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """Per-sample IoU in float64, 0 where the union is empty."""
    inter = np.asarray(inter, np.float64)
    union = np.asarray(union, np.float64)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def gather_sums(ints: np.ndarray, floats: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every JAX process's (int64 sums, float64 sums), one pair per process (call on all).

    The sums travel bit-exactly as int32 words, since JAX without x64 would narrow them.
    """
    import jax
    from jax.experimental import multihost_utils

    ints = np.asarray(ints, np.int64)
    words = np.concatenate([ints.view(np.int32), np.asarray(floats, np.float64).view(np.int32)])
    if jax.process_count() > 1:
        words = np.asarray(multihost_utils.process_allgather(words, tiled=False))
    words = np.ascontiguousarray(words.reshape(-1, words.shape[-1]), np.int32)
    k = 2 * len(ints)
    return [(row[:k].view(np.int64).copy(), row[k:].view(np.float64).copy()) for row in words]


class MetricAccumulator:
    """Host-side sums of I, U, IoU, [IoU >= t] and N over real (weight != 0) samples."""

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        self.sum_i = np.int64(0)
        self.sum_u = np.int64(0)
        self.sum_iou = np.float64(0.0)
        self.hits = np.zeros(len(self.thresholds), np.int64)
        self.count = np.int64(0)
        self.num_empty_union = np.int64(0)

    def update(self, inter: Any, union: Any, weight: Any = None) -> None:
        """Add a batch; `weight` 0 marks padding (any other value counts the sample once)."""
        inter = np.asarray(inter, np.int64).reshape(-1)
        union = np.asarray(union, np.int64).reshape(-1)
        if inter.shape != union.shape:
            raise ValueError(f"intersection shape {inter.shape} != union shape {union.shape}")
        if weight is None:
            keep = np.ones(inter.shape, bool)
        else:
            keep = np.asarray(weight).reshape(-1) != 0
            if keep.shape != inter.shape:
                raise ValueError(f"weight shape {keep.shape} != intersection shape {inter.shape}")
        if np.any(inter[keep] < 0) or np.any(inter[keep] > union[keep]):
            raise ValueError("intersection must satisfy 0 <= I <= U for every sample")
        inter, union = inter[keep], union[keep]
        ious = iou(inter, union)
        self.sum_i += inter.sum(dtype=np.int64)
        self.sum_u += union.sum(dtype=np.int64)
        self.sum_iou += ious.sum(dtype=np.float64)
        self.hits += np.asarray([(ious >= t).sum() for t in self.thresholds], np.int64)
        self.count += np.int64(inter.size)
        self.num_empty_union += np.int64((union == 0).sum())

    def merge(self, other: MetricAccumulator) -> None:
        """Add another accumulator's sums (e.g. one per host)."""
        if other.thresholds != self.thresholds:
            raise ValueError("cannot merge accumulators with different thresholds")
        self.sum_i += other.sum_i
        self.sum_u += other.sum_u
        self.sum_iou += other.sum_iou
        self.hits += other.hits
        self.count += other.count
        self.num_empty_union += other.num_empty_union

    def all_processes(self) -> MetricAccumulator:
        """A new accumulator holding the sums over every JAX process (call on all of them),
        bit-exact (`gather_sums`)."""
        ints = np.concatenate([[self.sum_i, self.sum_u, self.count, self.num_empty_union],
                               self.hits])
        out = MetricAccumulator(self.thresholds)
        for vals, floats in gather_sums(ints, [self.sum_iou]):
            part = MetricAccumulator(self.thresholds)
            part.sum_i, part.sum_u, part.count, part.num_empty_union = vals[:4]
            part.hits = vals[4:]
            part.sum_iou = floats[0]
            out.merge(part)
        return out

    def result(self) -> dict[str, float | int]:
        """{"oIoU", "mIoU", "prec@0.5", ..., "prec@0.9", "count", "num_empty_union"}.

        With no samples the ratios are NaN (nothing was evaluated); oIoU is 0 when ΣU = 0 over
        a non-empty set, matching the per-sample convention.
        """
        n = int(self.count)
        out: dict[str, float | int] = {}
        if n == 0:
            out["oIoU"] = out["mIoU"] = float("nan")
        else:
            out["oIoU"] = float(self.sum_i / self.sum_u) if self.sum_u > 0 else 0.0
            out["mIoU"] = float(self.sum_iou / n)
        for t, h in zip(self.thresholds, self.hits):
            out[f"prec@{t:g}"] = float(h / n) if n else float("nan")
        out["count"] = n
        out["num_empty_union"] = int(self.num_empty_union)
        return out
