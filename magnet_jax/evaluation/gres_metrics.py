"""GRES metrics (generalised RIS, gRefCOCO): cIoU, gIoU, N-acc, T-acc and precision@t.

Definitions follow ReLA's evaluator (henghuiding/ReLA at 3ca9551,
`gres_model/evaluation/refer_evaluation.py`, with its commit 884ef17 "fix eval metrics"). Per
sample i: I_i, U_i = |P_i ∩ G_i|, |P_i ∪ G_i| of the predicted mask P_i (as the mask head
outputs it) and the ground truth G_i (empty for a no-target sample); pred_nt_i = the model says
"no target"; gt_nt_i = the sample has no target. The four cases:

| gt \\ prediction | no target (pred_nt)              | target                              |
|-----------------|----------------------------------|-------------------------------------|
| no target       | IoU 1, adds I 0, U 0   ("TP")    | IoU 0, adds I 0, U U_i   ("FN")     |
| target          | IoU 0, adds I 0, U U_i ("FP")    | IoU I_i/U_i, adds I_i, U_i ("TN")   |

    gIoU = mean IoU over all samples        cIoU = ΣI / ΣU over all samples
    N-acc = TP / (TP + FN)  (no-target samples recognised as such)
    T-acc = TN / (TN + FP)  (target samples not called no-target)
    prec@t = mean [IoU_i >= t] over target samples only (ReLA reports t = 0.7, 0.8, 0.9)

ReLA quirks kept on purpose: on a "FP" sample the intersection is zeroed but the union stays
that of the mask the model still output (not |G_i|), so pass the mask head's I and U, not
those of an emptied mask. Differences from ReLA, which only matter in corner cases: values are
fractions, not ×100; a ratio whose denominator is zero is NaN (ReLA reports N-acc = T-acc = 0
when a set has no no-target sample, and fails on ΣU = 0).

How "no target" is predicted is the caller's choice: ReLA uses its own no-target head
(`nt_label`, argmax of two logits), independent of the mask. A model without such a head
(MagNet) predicts "no target" by an empty mask: `no_target_from_area(pred_area)`.

`GresAccumulator` sums on the host in int64 / float64, so results do not depend on batching,
order or hosts; samples with weight 0 (evaluation padding) are ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from magnet_jax.evaluation.metrics import gather_sums

THRESHOLDS = (0.7, 0.8, 0.9)

# Counts per (ground truth, prediction) case, in ReLA's names in parentheses.
CASES = ("gt_nt_pred_nt", "gt_nt_pred_t", "gt_t_pred_nt", "gt_t_pred_t")  # TP, FN, FP, TN


def no_target_from_area(pred_area: Any, min_area: int = 1) -> np.ndarray:
    """pred_nt for models without a no-target head: fewer than `min_area` foreground pixels."""
    return np.asarray(pred_area).reshape(-1) < min_area


def _flags(value: Any, name: str, n: int) -> np.ndarray:
    arr = np.asarray(value).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"{name} has {arr.size} entries, intersection has {n}")
    return arr.astype(bool)


def gres_sample_scores(
    inter: Any, union: Any, pred_no_target: Any, gt_no_target: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (I, U, IoU) as GRES counts them (int64, int64, float64); table above."""
    inter = np.asarray(inter, np.int64).reshape(-1)
    union = np.asarray(union, np.int64).reshape(-1)
    n = inter.size
    if union.shape != (n,):
        raise ValueError(f"intersection has {n} entries, union has {union.size}")
    if np.any(inter < 0) or np.any(inter > union):
        raise ValueError("intersection must satisfy 0 <= I <= U for every sample")
    pred_nt = _flags(pred_no_target, "pred_no_target", n)
    gt_nt = _flags(gt_no_target, "gt_no_target", n)
    if np.any(gt_nt & (inter > 0)):
        raise ValueError("a no-target sample has a non-zero intersection (its mask must be empty)")
    eff_i = np.where(pred_nt | gt_nt, 0, inter)
    eff_u = np.where(gt_nt & pred_nt, 0, union)
    iou = np.divide(eff_i, eff_u, out=np.zeros(n, np.float64), where=eff_u > 0)
    iou = np.where(gt_nt & pred_nt, 1.0, iou)
    return eff_i, eff_u, iou


class GresAccumulator:
    """Host-side sums for GRES metrics over real (weight != 0) samples."""

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLDS):
        self.thresholds = tuple(float(t) for t in thresholds)
        self.reset()

    def reset(self) -> None:
        self.sum_i = np.int64(0)
        self.sum_u = np.int64(0)
        self.sum_iou = np.float64(0.0)
        self.cases = np.zeros(len(CASES), np.int64)
        self.hits = np.zeros(len(self.thresholds), np.int64)  # target samples only

    def update(
        self, inter: Any, union: Any, pred_no_target: Any, gt_no_target: Any, weight: Any = None
    ) -> None:
        """Add a batch of per-sample I, U, predicted and true no-target flags; `weight` 0 marks
        padding (any other value counts the sample once)."""
        inter, union = np.asarray(inter).reshape(-1), np.asarray(union).reshape(-1)
        n = inter.size
        if union.shape != (n,):
            raise ValueError(f"intersection has {n} entries, union has {union.size}")
        keep = np.ones(n, bool) if weight is None else _flags(np.asarray(weight) != 0, "weight", n)
        pred_nt = _flags(pred_no_target, "pred_no_target", n)
        gt_nt = _flags(gt_no_target, "gt_no_target", n)
        eff_i, eff_u, iou = gres_sample_scores(
            inter[keep], union[keep], pred_nt[keep], gt_nt[keep]
        )
        pred_nt, gt_nt = pred_nt[keep], gt_nt[keep]
        self.sum_i += eff_i.sum(dtype=np.int64)
        self.sum_u += eff_u.sum(dtype=np.int64)
        self.sum_iou += iou.sum(dtype=np.float64)
        for k, (g, p) in enumerate(((True, True), (True, False), (False, True), (False, False))):
            self.cases[k] += np.int64(np.count_nonzero((gt_nt == g) & (pred_nt == p)))
        target_iou = iou[~gt_nt]
        self.hits += np.asarray([(target_iou >= t).sum() for t in self.thresholds], np.int64)

    def merge(self, other: GresAccumulator) -> None:
        """Add another accumulator's sums (e.g. one per host)."""
        if other.thresholds != self.thresholds:
            raise ValueError("cannot merge accumulators with different thresholds")
        self.sum_i += other.sum_i
        self.sum_u += other.sum_u
        self.sum_iou += other.sum_iou
        self.cases += other.cases
        self.hits += other.hits

    def all_processes(self) -> GresAccumulator:
        """A new accumulator holding the sums over every JAX process (call on all of them),
        bit-exact (`metrics.gather_sums`)."""
        ints = np.concatenate([[self.sum_i, self.sum_u], self.cases, self.hits])
        out = GresAccumulator(self.thresholds)
        c = len(CASES)
        for vals, floats in gather_sums(ints, [self.sum_iou]):
            part = GresAccumulator(self.thresholds)
            part.sum_i, part.sum_u = vals[0], vals[1]
            part.cases = vals[2 : 2 + c]
            part.hits = vals[2 + c :]
            part.sum_iou = floats[0]
            out.merge(part)
        return out

    def result(self) -> dict[str, float | int]:
        """{"cIoU", "gIoU", "N-acc", "T-acc", "prec@0.7", ..., "count", "target_count",
        "no_target_count", and the four case counts of CASES}. Fractions; NaN when undefined."""
        tp, fn, fp, tn = (int(v) for v in self.cases)
        n, n_nt, n_t = tp + fn + fp + tn, tp + fn, fp + tn

        def ratio(num, den) -> float:
            return float(num / den) if den > 0 else float("nan")

        out: dict[str, float | int] = {
            "cIoU": ratio(self.sum_i, self.sum_u),
            "gIoU": ratio(self.sum_iou, n),
            "N-acc": ratio(tp, n_nt),
            "T-acc": ratio(tn, n_t),
        }
        for t, h in zip(self.thresholds, self.hits):
            out[f"prec@{t:g}"] = ratio(h, n_t)
        out.update(count=n, target_count=n_t, no_target_count=n_nt)
        out.update(zip(CASES, (tp, fn, fp, tn)))
        return out


def gres_summary(
    inter: Any,
    union: Any,
    pred_no_target: Any,
    gt_no_target: Any,
    weight: Any = None,
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> dict[str, float | int]:
    """`GresAccumulator.result()` of one set of per-sample values."""
    acc = GresAccumulator(thresholds)
    acc.update(inter, union, pred_no_target, gt_no_target, weight)
    return acc.result()
