"""Metrics against hand computations (data_formats.md §5.1): empty cases, padding, thresholds."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.evaluation.metrics import MetricAccumulator, intersection_union, iou
from tests.multiprocess import run_two_processes


def _masks():
    """Four 4x4 samples with hand-counted I and U."""
    p = np.zeros((4, 4, 4), np.uint8)
    g = np.zeros((4, 4, 4), np.uint8)
    p[0, :2, :2] = 1           # 4 px
    g[0, :2, :3] = 1           # 6 px, I = 4, U = 6
    g[1, 1:3, 1:3] = 1         # empty prediction: I = 0, U = 4
    p[2, 0, :] = 1             # empty target: I = 0, U = 4
    # sample 3: both empty: I = 0, U = 0
    return p, g


def test_intersection_union_counts_binary_masks():
    p, g = _masks()
    i, u = intersection_union(p, g)
    assert i.dtype == jnp.int32
    np.testing.assert_array_equal(i, [4, 0, 0, 0])
    np.testing.assert_array_equal(u, [6, 4, 4, 0])


def test_intersection_union_from_logits_is_sigmoid_gt_half_and_jits():
    p, g = _masks()
    logits = np.where(p == 1, 2.0, -3.0).astype(np.float32)
    logits[0, 3, 3] = 0.0      # sigmoid(0) = 0.5 is not > 0.5: background
    i, u = jax.jit(intersection_union)(jnp.asarray(logits), jnp.asarray(g))
    np.testing.assert_array_equal(i, [4, 0, 0, 0])
    np.testing.assert_array_equal(u, [6, 4, 4, 0])
    # A float 0/1 mask is read as a mask when asked to.
    i2, _ = intersection_union(p.astype(np.float32), g, from_logits=False)
    np.testing.assert_array_equal(i2, [4, 0, 0, 0])


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))


def test_iou_is_zero_for_empty_union():
    np.testing.assert_array_equal(iou([4, 0, 0, 0], [6, 4, 4, 0]), [4 / 6, 0, 0, 0])


def test_accumulator_against_hand_computation_with_padding():
    p, g = _masks()
    i, u = intersection_union(p, g)
    acc = MetricAccumulator()
    # Two batches; the second repeats sample 0 as padding (weight 0) and adds a perfect sample.
    acc.update(i, u, np.ones(4, np.float32))
    acc.update([9, 4, 7], [9, 6, 10], [1.0, 0.0, 1.0])
    r = acc.result()
    # Real samples: IoU = 4/6, 0, 0, 0, 1, 0.7; I = 4+0+0+0+9+7 = 20; U = 6+4+4+0+9+10 = 33.
    ious = [4 / 6, 0, 0, 0, 1.0, 0.7]
    assert r["count"] == 6 and r["num_empty_union"] == 1
    assert r["oIoU"] == pytest.approx(20 / 33)
    assert r["mIoU"] == pytest.approx(sum(ious) / 6)
    assert r["prec@0.5"] == pytest.approx(3 / 6)
    assert r["prec@0.6"] == pytest.approx(3 / 6)
    assert r["prec@0.7"] == pytest.approx(2 / 6)        # IoU 0.7 counts (>=, not >)
    assert r["prec@0.8"] == pytest.approx(1 / 6)
    assert r["prec@0.9"] == pytest.approx(1 / 6)


def test_both_empty_counts_as_zero_and_all_empty_gives_zero_oiou():
    acc = MetricAccumulator()
    acc.update([0, 0], [0, 0])
    r = acc.result()
    assert r["oIoU"] == 0.0 and r["mIoU"] == 0.0 and r["prec@0.5"] == 0.0 and r["count"] == 2


def test_no_samples_gives_nan():
    r = MetricAccumulator().result()
    assert r["count"] == 0 and np.isnan(r["oIoU"]) and np.isnan(r["prec@0.9"])


def test_order_and_split_invariance_and_merge():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 50_000, 100)
    i = (u * rng.random(100)).astype(np.int64)
    one = MetricAccumulator()
    one.update(i, u)
    a, b = MetricAccumulator(), MetricAccumulator()
    perm = rng.permutation(100)
    a.update(i[perm[:37]], u[perm[:37]])
    b.update(i[perm[37:]], u[perm[37:]])
    a.merge(b)
    ra, r1 = a.result(), one.result()
    assert ra["count"] == r1["count"] == 100 and ra["oIoU"] == pytest.approx(r1["oIoU"], rel=1e-12)
    assert ra["mIoU"] == pytest.approx(r1["mIoU"], rel=1e-12)
    # Independent check of oIoU / mIoU.
    assert r1["oIoU"] == pytest.approx(i.sum() / u.sum())
    assert r1["mIoU"] == pytest.approx(np.mean([x / y if y else 0.0 for x, y in zip(i, u)]))


def test_large_sums_do_not_overflow():
    acc = MetricAccumulator()
    n = 20_000
    acc.update(np.full(n, 230_400, np.int32), np.full(n, 230_400, np.int32))  # 480x480 each
    assert acc.result()["oIoU"] == 1.0 and int(acc.sum_u) == n * 230_400   # > 2**31


def test_bad_counts_rejected():
    with pytest.raises(ValueError, match="0 <= I <= U"):
        MetricAccumulator().update([5], [4])
    with pytest.raises(ValueError, match="weight shape"):
        MetricAccumulator().update([1, 2], [3, 4], [1.0])


def test_all_processes_round_trips_the_sums_exactly():
    acc = MetricAccumulator()
    acc.update(np.full(20_000, 230_400), np.full(20_000, 230_401))
    acc.update([1, 0], [3, 0])
    got = acc.all_processes()                   # one process here: the same sums, bit-exact
    assert int(got.sum_i) == int(acc.sum_i) and int(got.sum_u) == int(acc.sum_u) > 2**31
    assert got.sum_iou == acc.sum_iou and got.count == acc.count
    np.testing.assert_array_equal(got.hits, acc.hits)
    assert got.result() == acc.result()


_TWO_PROCESS_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from magnet_jax.evaluation.metrics import MetricAccumulator
acc = MetricAccumulator()
if jax.process_index() == 0:
    acc.update([4, 0], [6, 4])
else:
    acc.update([0, 9, 10**9], [0, 9, 3 * 10**9])
print("RESULT " + json.dumps(acc.all_processes().result()), flush=True)
"""


@pytest.mark.multiprocess
def test_two_process_reduction_equals_single_host(tmp_path):
    results = run_two_processes(_TWO_PROCESS_SCRIPT, "RESULT", timeout=120)
    single = MetricAccumulator()
    single.update([4, 0, 0, 9, 10**9], [6, 4, 0, 9, 3 * 10**9])
    assert results[0] == results[1]
    # Integer sums are exact; the IoU sum differs only by float64 summation order.
    assert results[0] == pytest.approx(single.result(), rel=1e-12)
