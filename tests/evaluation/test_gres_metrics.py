"""GRES metrics (magnet_jax/evaluation/gres_metrics.py) against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magnet_jax.evaluation.gres_metrics import (
    GresAccumulator,
    gres_sample_scores,
    gres_summary,
    no_target_from_area,
)
from magnet_jax.evaluation.metrics import MetricAccumulator

# Six samples, one column each:        a     b     c     d     e     f
INTER = np.asarray([4, 9, 3, 0, 0, 0])
UNION = np.asarray([6, 10, 8, 5, 7, 0])
GT_NT = np.asarray([0, 0, 0, 1, 1, 1], bool)
PRED_NT = np.asarray([0, 0, 1, 1, 0, 1], bool)
# a, b: target found (ReLA's TN); c: target called no-target (FP); d, f: no target recognised
# (TP; d's mask head still drew 5 pixels); e: no target, a mask predicted (FN).


def test_sample_scores_follow_the_four_cases():
    i, u, iou = gres_sample_scores(INTER, UNION, PRED_NT, GT_NT)
    np.testing.assert_array_equal(i, [4, 9, 0, 0, 0, 0])  # c: intersection zeroed
    np.testing.assert_array_equal(u, [6, 10, 8, 0, 7, 0])  # c keeps its union, d adds nothing
    np.testing.assert_allclose(iou, [4 / 6, 0.9, 0.0, 1.0, 0.0, 1.0])


def test_summary_against_hand_computation():
    res = gres_summary(INTER, UNION, PRED_NT, GT_NT)
    assert res["cIoU"] == pytest.approx((4 + 9) / (6 + 10 + 8 + 7))
    assert res["gIoU"] == pytest.approx((4 / 6 + 0.9 + 0 + 1 + 0 + 1) / 6)
    assert res["N-acc"] == pytest.approx(2 / 3)  # d, f of d, e, f
    assert res["T-acc"] == pytest.approx(2 / 3)  # a, b of a, b, c
    # Precision over the three target samples only (IoU 2/3, 0.9, 0).
    assert (res["prec@0.7"], res["prec@0.8"], res["prec@0.9"]) == pytest.approx((1 / 3,) * 3)
    assert (res["count"], res["target_count"], res["no_target_count"]) == (6, 3, 3)
    cases = ("gt_nt_pred_nt", "gt_nt_pred_t", "gt_t_pred_nt", "gt_t_pred_t")
    assert [res[k] for k in cases] == [2, 1, 1, 2]  # ReLA's TP, FN, FP, TN


def test_target_only_set_matches_the_ris_metrics():
    # Without no-target samples or predictions, cIoU / gIoU are oIoU / mIoU (metrics.py).
    inter, union = np.asarray([4, 0, 7, 2]), np.asarray([6, 4, 7, 9])
    res = gres_summary(inter, union, np.zeros(4, bool), np.zeros(4, bool), thresholds=(0.5,))
    ris = MetricAccumulator((0.5,))
    ris.update(inter, union)
    ref = ris.result()
    assert res["cIoU"] == pytest.approx(ref["oIoU"])
    assert res["gIoU"] == pytest.approx(ref["mIoU"])
    assert res["prec@0.5"] == pytest.approx(ref["prec@0.5"])
    assert res["T-acc"] == 1.0
    assert math.isnan(res["N-acc"])  # no no-target sample: undefined, not ReLA's 0


def test_undefined_ratios_are_nan():
    # Only recognised no-target samples: gIoU 1, N-acc 1, cIoU 0/0 and T-acc 0/0 undefined.
    res = gres_summary([0, 0], [0, 3], [True, True], [True, True])
    assert res["gIoU"] == 1.0 and res["N-acc"] == 1.0
    assert math.isnan(res["cIoU"]) and math.isnan(res["T-acc"]) and math.isnan(res["prec@0.7"])
    empty = GresAccumulator().result()
    assert empty["count"] == 0 and math.isnan(empty["gIoU"])


def test_batches_padding_merge_and_processes_give_the_same_result():
    whole = gres_summary(INTER, UNION, PRED_NT, GT_NT)
    acc = GresAccumulator()
    acc.update(INTER[:2], UNION[:2], PRED_NT[:2], GT_NT[:2])
    # Padding (weight 0) repeats sample e; it must not count.
    acc.update(
        np.r_[INTER[2:4], 0], np.r_[UNION[2:4], 7], np.r_[PRED_NT[2:4], False],
        np.r_[GT_NT[2:4], True], weight=[1, 1, 0],
    )
    other = GresAccumulator()
    other.update(INTER[4:], UNION[4:], PRED_NT[4:], GT_NT[4:])
    acc.merge(other)
    assert acc.result() == pytest.approx(whole, nan_ok=True)
    assert acc.all_processes().result() == pytest.approx(whole, nan_ok=True)


def test_no_target_from_area_is_an_empty_mask():
    np.testing.assert_array_equal(no_target_from_area([0, 1, 5]), [True, False, False])
    np.testing.assert_array_equal(no_target_from_area([0, 1, 5], min_area=2), [True, True, False])
    # MagNet-style use: an empty prediction on a no-target sample scores 1, not 0 as in RIS.
    pred_area = np.asarray([0, 0])
    res = gres_summary([0, 0], [0, 4], no_target_from_area(pred_area), [True, False])
    assert res["gIoU"] == 0.5 and res["N-acc"] == 1.0 and res["T-acc"] == 0.0


@pytest.mark.parametrize(
    "args, match",
    [
        (([5], [4], [False], [False]), "0 <= I <= U"),
        (([1], [4], [False], [True]), "no-target sample has a non-zero intersection"),
        (([1, 2], [4], [False, False], [False, False]), "union has 1"),
        (([1], [4], [False, True], [False]), "pred_no_target has 2 entries"),
    ],
)
def test_bad_inputs_are_one_line_errors(args, match):
    with pytest.raises(ValueError, match=match):
        GresAccumulator().update(*args)
