"""Segmentation loss of MagNet's one-query Mask2Former head (training_objectives.md §2).

Two kinds, both with optional deep supervision over the 10 decoder predictions (final + 9 aux,
equal weights, §2.3; other weights per prediction for cascades such as JMCELN's stages):

- ``"bce_dice"`` (§2.1 B, the default):
  λ_bce · BCE + λ_dice · Dice [+ λ_cls · CE(class, object)].
- ``"lavt_ce"`` (§2.1 A): LAVT's weighted 2-class cross-entropy in its single-logit form,
  normalised by the sum of the target weights (PyTorch ``reduction="mean"`` with ``weight=``).

All functions are pure, jit-able with static shapes, and compute in float32 whatever the model's
compute dtype. Padded examples (``weight == 0``) contribute nothing; averages are over real
examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from magnet_jax.models import ops
from magnet_jax.models.magnet import upsample_mask_logits

KINDS = ("bce_dice", "lavt_ce")


def sigmoid_bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Elementwise BCE(σ(x), y) in the stable form max(x, 0) − x·y + log(1 + e^{−|x|}).

    Same values as torch ``F.binary_cross_entropy_with_logits(reduction="none")``; targets may
    be soft (in [0, 1]).
    """
    x = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _safe_weighted_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """Σ w_b v_b / Σ w_b over the batch; 0 when no example is real (all-padding batch)."""
    total = jnp.sum(weight)
    # where on the denominator (not max(total, 1)) so fractional weights stay exact.
    return jnp.sum(values * weight) / jnp.where(total > 0, total, 1.0)


def resample_targets(gt_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W) mask -> (B, h, w) float32 area average (soft targets when resolutions differ)."""
    return ops.area_downsample(gt_mask, size)


def bce_per_sample(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(B, H, W) logits and targets -> (B,) mean BCE over pixels."""
    return jnp.mean(sigmoid_bce_with_logits(logits, targets), axis=(1, 2))


def dice_per_sample(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """(B, H, W) -> (B,) Dice loss 1 − (2 Σ σ(m) y + 1) / (Σ σ(m) + Σ y + 1), smoothing 1."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32))
    y = targets.astype(jnp.float32)
    num = 2.0 * jnp.sum(p * y, axis=(1, 2)) + 1.0
    den = jnp.sum(p, axis=(1, 2)) + jnp.sum(y, axis=(1, 2)) + 1.0
    return 1.0 - num / den


def lavt_weighted_ce(logits: jax.Array, targets: jax.Array, weight: jax.Array,
                     class_weights: Sequence[float] = (0.9, 1.1)) -> jax.Array:
    """LAVT's weighted CE: Σ w_{y_i} ℓ_i / Σ w_{y_i} over all pixels of the real examples.

    logits, targets: (B, H, W); weight: (B,) example weights (0 = padding). ℓ_i is the BCE of
    the single logit, equal to the 2-class softmax CE of logits (0, m) (§2.1 A). For soft
    targets w_y interpolates linearly between w0 and w1.
    """
    w0, w1 = float(class_weights[0]), float(class_weights[1])
    y = targets.astype(jnp.float32)
    w_pix = (w0 * (1.0 - y) + w1 * y) * weight.astype(jnp.float32)[:, None, None]
    total = jnp.sum(w_pix)
    return jnp.sum(w_pix * sigmoid_bce_with_logits(logits, y)) / jnp.where(total > 0, total, 1.0)


def class_ce_per_sample(pred_logits: jax.Array, target: int | jax.Array = 1) -> jax.Array:
    """(B, Q, 2) class logits -> (B,) CE of query 0 against ``target`` (1 = object, 0 =
    no-object, §2.2): one int for every example, or a (B,) int array (generalised RIS, where
    a sentence may refer to nothing)."""
    c = pred_logits[:, 0, :].astype(jnp.float32)
    target = jnp.broadcast_to(jnp.asarray(target, jnp.int32), c.shape[:1])
    return jax.nn.logsumexp(c, axis=-1) - jnp.take_along_axis(c, target[:, None], axis=1)[:, 0]


def segmentation_loss(
    outputs: Mapping[str, Any],
    gt_mask: jax.Array,
    weight: jax.Array,
    *,
    kind: str = "bce_dice",
    bce_weight: float = 5.0,
    dice_weight: float = 5.0,
    class_weight: float = 0.0,
    deep_supervision: bool = True,
    resolution: int | None = None,
    lavt_class_weights: Sequence[float] = (0.9, 1.1),
    prediction_weights: Sequence[float] | None = None,
    no_target: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Segmentation loss summed over the supervised predictions (§2.1 A/B, defaults §2.3).

    outputs: MagNet outputs, dict(pred_masks (B, Q, h, w) logits, pred_logits (B, Q, 2),
      aux_outputs [9 × dict(pred_masks, pred_logits)]); the final prediction is the top level.
    gt_mask: (B, H, W) in {0, 1} at input resolution.
    weight: (B,) float, 1 for real and 0 for padded examples.
    resolution: side of the square grid the loss is computed on. None (default) = the GT's
      own (H, W), i.e. 480 at 480 input: logits upsampled with align_corners=True, GT as
      evaluated. Another value r: logits resized to r × r with align_corners=True and the GT
      area-resampled to r × r (soft targets; the §2.3 "120" alternative).
    prediction_weights: one weight per supervised prediction, earliest first and the final one
      last (e.g. a cascade's increasing stage weights); None = all 1.
    no_target: (B,) int, 1 where the sentence refers to nothing (generalised RIS; its GT mask
      is empty): the class term's target is then no-object (0) instead of object (1), which
      trains the class head as a no-target head. None = every example has a target.
    Returns (loss scalar float32, metrics). Metrics hold the raw term values summed over the
    supervised predictions (before the λ weights) and the total "loss_seg"; kind "bce_dice"
    reports loss_bce, loss_dice, loss_cls; kind "lavt_ce" reports loss_ce, loss_cls.
    """
    if kind not in KINDS:
        raise ValueError(f"loss.seg.kind: unknown kind {kind!r}; expected one of {KINDS}")
    size = tuple(gt_mask.shape[1:]) if resolution is None else (int(resolution),) * 2
    targets = resample_targets(gt_mask, size)
    w = weight.astype(jnp.float32)

    predictions = [outputs]
    if deep_supervision:
        predictions = list(outputs.get("aux_outputs", ())) + predictions

    # Every supervised prediction in one batched computation (one copy in the graph, not 10).
    num = len(predictions)
    if prediction_weights is None:
        pw = jnp.ones((num,), jnp.float32)
    elif len(prediction_weights) != num:
        raise ValueError(f"{len(prediction_weights)} prediction weights for {num} supervised "
                         "predictions")
    else:
        pw = jnp.asarray(prediction_weights, jnp.float32)
    masks = jnp.stack([pred["pred_masks"] for pred in predictions])        # (P, B, Q, h, w)
    logits = upsample_mask_logits(masks.reshape(-1, *masks.shape[2:]), size)
    logits = logits.reshape(num, -1, *size)                                  # (P, B, H, W)
    if kind == "bce_dice":
        bce = jax.vmap(lambda x: _safe_weighted_mean(bce_per_sample(x, targets), w))(logits)
        dice = jax.vmap(lambda x: _safe_weighted_mean(dice_per_sample(x, targets), w))(logits)
        terms = {"loss_bce": jnp.sum(pw * bce), "loss_dice": jnp.sum(pw * dice)}
        loss = jnp.sum(pw * (bce_weight * bce + dice_weight * dice))
    else:
        # LAVT has no λ on its CE: the term enters with weight 1.
        ce = jax.vmap(lambda x: lavt_weighted_ce(x, targets, w, lavt_class_weights))(logits)
        terms = {"loss_ce": jnp.sum(pw * ce)}
        loss = jnp.sum(pw * ce)
    # class_weight is a Python float: the class term is not even traced when off.
    if class_weight > 0:
        classes = jnp.stack([pred["pred_logits"] for pred in predictions])
        target = 1 if no_target is None else 1 - no_target.astype(jnp.int32)
        cls = jax.vmap(lambda c: _safe_weighted_mean(class_ce_per_sample(c, target), w))(classes)
        terms["loss_cls"] = jnp.sum(pw * cls)
        loss = loss + class_weight * jnp.sum(pw * cls)
    else:
        terms["loss_cls"] = jnp.zeros((), jnp.float32)
    metrics = {**terms, "loss_seg": loss}
    return loss, metrics
