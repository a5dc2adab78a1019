"""Protocol helpers against independent references: torch's interpolate, hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from magnet_jax.evaluation import protocols
from magnet_jax.evaluation.metrics import iou


@pytest.mark.parametrize("in_hw,out_hw", [((12, 12), (97, 143)), ((30, 20), (7, 5)),
                                          ((1, 6), (4, 9)), ((5, 5), (1, 1))])
def test_resize_logits_matches_torch_align_corners(in_hw, out_hw):
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(0).standard_normal(in_hw).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.tensor(logits)[None, None], size=out_hw,
                                           mode="bilinear", align_corners=True)[0, 0].numpy()
    got = protocols.resize_logits(logits, out_hw)
    assert got.shape == out_hw and got.dtype == np.float32
    # torch interpolates in float32, this in float64: rounding of order 1e-6 on N(0, 1) values.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-6)


def test_align_corners_keeps_the_corner_values():
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    up = protocols.resize_logits(logits, (7, 10))
    assert up[0, 0] == 0 and up[-1, -1] == 11 and up[0, -1] == 3 and up[-1, 0] == 8


def test_intersection_union_by_hand():
    gt = np.zeros((4, 4), np.uint8)
    gt[1:3, 1:3] = 1                                          # 4 pixels
    logits = np.full((4, 4), -1.0, np.float32)
    logits[1:3, 1:4] = 2.0                                     # 6 pixels, 4 of them on the target
    assert protocols.intersection_union_np(logits, gt) == (4, 6)
    # Empty prediction on an empty target: U = 0, and the official IoU is 0, not 1.
    empty = protocols.intersection_union_np(np.full((4, 4), -1.0), np.zeros((4, 4)))
    assert empty == (0, 0) and iou([0], [0])[0] == 0.0
    # Empty prediction on a target: I = 0, U = |target|.
    assert protocols.intersection_union_np(np.full((4, 4), -1.0), gt) == (0, 4)
    # A logit of exactly 0 is sigmoid 0.5: background (> 0.5 is required).
    assert protocols.intersection_union_np(np.zeros((4, 4)), gt) == (0, 4)


def test_unknown_protocol_and_shape_mismatch():
    with pytest.raises(ValueError, match="unknown protocol 'cris'"):
        protocols.check_protocol("cris")
    with pytest.raises(ValueError, match="differ in shape"):
        protocols.intersection_union_np(np.zeros((3, 3)), np.zeros((4, 4)))
