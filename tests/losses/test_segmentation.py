"""magnet_jax.losses.segmentation (training_objectives.md §2): values on hand-computed cases,
deep supervision, padding, the class term, LAVT normalisation, and the align_corners path
against torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.losses.segmentation import segmentation_loss


def _outputs(masks, logits=None, aux=()):
    """MagNet-shaped outputs from (B, h, w) final mask logits and a list of aux (B, h, w)."""
    def pred(m, c):
        m = jnp.asarray(m, jnp.float32)[:, None]
        if c is None:
            c = jnp.zeros((m.shape[0], 1, 2), jnp.float32)
        return {"pred_masks": m, "pred_logits": jnp.asarray(c, jnp.float32)}
    out = pred(masks, logits)
    out["aux_outputs"] = [pred(a, None) for a in aux]
    return out


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_bce(x, y):
    p = _np_sigmoid(x)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def _np_dice(x, y):
    p = _np_sigmoid(x)
    return 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)


M = np.array([[2.0, -1.0], [0.5, -3.0]])
Y = np.array([[1.0, 0.0], [1.0, 1.0]])


def test_bce_dice_2x2_by_hand():
    # By hand: σ = (0.8808, 0.2689, 0.6225, 0.0474); BCE = mean(−log σ | −log(1−σ)).
    bce = np.mean(_np_bce(M, Y))
    dice = _np_dice(M, Y)
    loss, metrics = segmentation_loss(_outputs(M[None]), jnp.asarray(Y[None]), jnp.ones(1),
                                      deep_supervision=False)
    np.testing.assert_allclose(metrics["loss_bce"], bce, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_dice"], dice, rtol=1e-6)
    np.testing.assert_allclose(loss, 5 * bce + 5 * dice, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_seg"], loss)
    assert float(metrics["loss_cls"]) == 0.0
    # Values of the hand computation itself (guards the NumPy transcription).
    np.testing.assert_allclose(bce, (0.12693 + 0.31326 + 0.47408 + 3.04859) / 4, atol=1e-4)
    p = _np_sigmoid(M)
    np.testing.assert_allclose(dice, 1 - (2 * (p[0, 0] + p[1, 0] + p[1, 1]) + 1)
                               / (p.sum() + 3 + 1), rtol=1e-12)


def test_deep_supervision_sums_predictions_and_padding_is_ignored():
    rng = np.random.default_rng(0)
    b, h = 3, 4
    preds = [rng.normal(size=(b, h, h)) * 2 for _ in range(10)]
    y = (rng.random((b, h, h)) > 0.5).astype(np.float32)
    y[0, 0, 0] = 1.0
    out = _outputs(preds[-1], aux=preds[:-1])
    weight = np.array([1.0, 1.0, 0.0])
    loss, metrics = segmentation_loss(out, jnp.asarray(y), jnp.asarray(weight))
    expect_bce = sum(np.mean([_np_bce(p[i], y[i]).mean() for i in range(2)]) for p in preds)
    expect_dice = sum(np.mean([_np_dice(p[i], y[i]) for i in range(2)]) for p in preds)
    np.testing.assert_allclose(metrics["loss_bce"], expect_bce, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_dice"], expect_dice, rtol=1e-5)
    np.testing.assert_allclose(loss, 5 * expect_bce + 5 * expect_dice, rtol=1e-5)
    # Changing the padded example changes nothing; final-only is the last prediction.
    preds2 = [p.copy() for p in preds]
    for p in preds2:
        p[2] = 100.0
    y2 = y.copy()
    y2[2] = 0.0
    loss2, _ = segmentation_loss(_outputs(preds2[-1], aux=preds2[:-1]), jnp.asarray(y2),
                                 jnp.asarray(weight))
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    final, _ = segmentation_loss(out, jnp.asarray(y), jnp.asarray(weight),
                                 deep_supervision=False)
    single, _ = segmentation_loss(_outputs(preds[-1]), jnp.asarray(y), jnp.asarray(weight))
    np.testing.assert_allclose(final, single, rtol=1e-6)
    np.testing.assert_allclose(final, 5 * np.mean([_np_bce(preds[-1][i], y[i]).mean()
                                                   + _np_dice(preds[-1][i], y[i])
                                                   for i in range(2)]), rtol=1e-5)


def test_all_padding_batch_is_finite_zero_with_finite_grads():
    m = jnp.asarray(M[None])
    y = jnp.asarray(Y[None])

    def f(m):
        return segmentation_loss(_outputs(m), y, jnp.zeros(1), class_weight=2.0)[0]

    loss, grad = jax.value_and_grad(f)(m)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(grad))


def test_class_term_only_when_weighted():
    logits = np.array([[[0.3, -0.7]], [[1.0, 2.0]]])  # (B=2, Q=1, 2)
    m = np.zeros((2, 2, 2))
    y = np.ones((2, 2, 2))
    out = _outputs(m, logits)
    off, m_off = segmentation_loss(out, jnp.asarray(y), jnp.ones(2), deep_supervision=False)
    on, m_on = segmentation_loss(out, jnp.asarray(y), jnp.ones(2), deep_supervision=False,
                                 class_weight=2.0)
    # CE against index 1 (object): logsumexp(c) − c[1].
    ce = np.mean([np.log(np.exp(c[0]).sum()) - c[0, 1] for c in logits])
    assert float(m_off["loss_cls"]) == 0.0
    np.testing.assert_allclose(m_on["loss_cls"], ce, rtol=1e-6)
    np.testing.assert_allclose(on - off, 2.0 * ce, rtol=1e-5)


def test_lavt_ce_normalised_by_target_weight_sum():
    m = np.stack([M, -M])
    y = np.stack([Y, Y])
    weight = np.array([1.0, 0.0])
    loss, metrics = segmentation_loss(_outputs(m), jnp.asarray(y), jnp.asarray(weight),
                                      kind="lavt_ce", deep_supervision=False)
    w = np.where(Y > 0, 1.1, 0.9)  # only the real example's pixels
    expect = (w * _np_bce(M, Y)).sum() / w.sum()
    np.testing.assert_allclose(loss, expect, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss_ce"], expect, rtol=1e-6)
    # Not the pixel mean: 3 foreground pixels, weight sum 0.9 + 3·1.1 = 4.2, not 4.
    assert abs(expect - (w * _np_bce(M, Y)).sum() / 4) > 1e-3


def test_unknown_kind_names_it():
    with pytest.raises(ValueError, match="focal"):
        segmentation_loss(_outputs(M[None]), jnp.asarray(Y[None]), jnp.ones(1), kind="focal")


def test_jit_and_soft_target_resolution():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(2, 4, 4)).astype(np.float32)
    y = (rng.random((2, 8, 8)) > 0.5).astype(np.float32)
    f = jax.jit(lambda m, y, w: segmentation_loss(_outputs(m), y, w, resolution=4)[0])
    loss = f(m, y, jnp.ones(2))
    # resolution 4: logits used as they are, GT block-averaged to soft targets.
    ys = y.reshape(2, 4, 2, 4, 2).mean(axis=(2, 4))
    expect = np.mean([5 * _np_bce(m[i], ys[i]).mean() + 5 * _np_dice(m[i], ys[i])
                      for i in range(2)])
    np.testing.assert_allclose(loss, expect, rtol=1e-5)


def test_upsampling_matches_torch_interpolate_bce_and_lavt_ce():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(2)
    m = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    y = (rng.random((2, 19, 23)) > 0.4).astype(np.float32)
    _, metrics = segmentation_loss(_outputs(m), jnp.asarray(y), jnp.ones(2),
                                   deep_supervision=False)
    up = F.interpolate(torch.from_numpy(m)[:, None], size=(19, 23), mode="bilinear",
                       align_corners=True)[:, 0]
    yt = torch.from_numpy(y)
    bce = F.binary_cross_entropy_with_logits(up, yt)
    p = up.sigmoid()
    dice = (1 - (2 * (p * yt).sum((1, 2)) + 1) / (p.sum((1, 2)) + yt.sum((1, 2)) + 1)).mean()
    np.testing.assert_allclose(metrics["loss_bce"], bce.item(), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_dice"], dice.item(), rtol=1e-5)
    # LAVT: 2-class logits (0, m) with F.cross_entropy(weight=[0.9, 1.1]) == lavt_ce.
    ce_loss, _ = segmentation_loss(_outputs(m), jnp.asarray(y), jnp.ones(2), kind="lavt_ce",
                                   deep_supervision=False)
    two = torch.stack([torch.zeros_like(up), up], dim=1)
    ref = F.cross_entropy(two, yt.long(), weight=torch.tensor([0.9, 1.1]))
    np.testing.assert_allclose(ce_loss, ref.item(), rtol=1e-5)
