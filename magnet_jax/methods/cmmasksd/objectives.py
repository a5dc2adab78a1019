"""CM-MaskSD's training objective (training_objectives.md §7.3, a reconstruction):

    S   = Seg(I, T)                       the main branch
    I_m, T_m                              correlation-guided masking of patches / words (masking.py)
    S_v = Seg(I_m, T),  S_l = Seg(I, T_m) the same parameters, in the same jitted step
    L   = L_seg(S, y) + α D(S_v, sg(S)) + β D(S_l, sg(S)) + γ (L_seg(S_v, y) + L_seg(S_l, y))

D compares the stride-4 mask logits per pixel: "bce" = BCE of σ(S_v) against the soft target
σ(sg(S)) (default), "kl" = the binary KL(σ(sg(S)) ‖ σ(S_v)), "mse" = squared error of the logits.
The teacher maps are stop-gradient. The two masked branches run as one batch of 2B (B when one
of α, β is 0; none when both are 0, the ablation without self-distillation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from magnet_jax.losses import segmentation_loss
from magnet_jax.losses.segmentation import sigmoid_bce_with_logits
from magnet_jax.methods.base import BASE_BATCH_KEYS, Objective
from magnet_jax.methods.cmmasksd import masking

DISTILL_KINDS = ("bce", "kl", "mse")


def check_distill(kind: str) -> str:
    if kind not in DISTILL_KINDS:
        raise ValueError(f"unknown cmmasksd.distill {kind!r}; expected one of "
                         f"{', '.join(DISTILL_KINDS)}")
    return kind


def distill_loss(student: jax.Array, teacher: jax.Array, weight: jax.Array,
                 kind: str = "bce") -> jax.Array:
    """Per-pixel consistency of (B, h, w) student logits with (B, h, w) teacher logits (already
    stop-gradient), averaged over pixels and over the real examples (weight > 0)."""
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    p = jax.nn.sigmoid(t)
    if kind == "mse":
        per_pixel = jnp.square(s - t)
    else:
        # BCE with a soft target p = σ(t).
        per_pixel = sigmoid_bce_with_logits(s, p)
        if kind == "kl":
            # KL = BCE(p, σ(s)) - H(p): the same gradient, 0 when the maps agree.
            per_pixel = per_pixel - sigmoid_bce_with_logits(t, p)
    per_example = per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)
    return (per_example * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def settings(config: ml_collections.ConfigDict) -> dict:
    """The `cmmasksd` config section, checked."""
    c = config.cmmasksd
    masking.check_strategy(c.masking)
    check_distill(c.distill)
    for name in ("alpha", "beta", "seg_on_masked"):
        if c[name] < 0:
            raise ValueError(f"cmmasksd.{name} must be >= 0, got {c[name]}")
    for name in ("patch_ratio", "word_ratio"):
        if not 0 <= c[name] <= 1:
            raise ValueError(f"cmmasksd.{name} must be in [0, 1], got {c[name]}")
    return dict(c.to_dict())


def make_objective(model, config: ml_collections.ConfigDict) -> Objective:
    seg = dict(config.loss.to_dict())
    if seg.get("class_weight", 0) > 0:
        raise ValueError("loss.class_weight must be 0 for CM-MaskSD: it predicts one mask")
    seg.pop("deep_supervision", None)   # one prediction: nothing deeper to supervise
    c = settings(config)
    alpha, beta, gamma = float(c["alpha"]), float(c["beta"]), float(c["seg_on_masked"])

    def seg_loss(pred, batch):
        return segmentation_loss({"pred_masks": pred}, batch["mask"], batch["weight"],
                                 deep_supervision=False, **seg)

    def loss_fn(params, batch, key):
        k_main, k_branch, k_patch, k_word = jax.random.split(key, 4)
        image, ids, att = batch["image"], batch["ids"], batch["att"]
        out = model.apply({"params": params}, image, ids, att, train=True,
                          return_clip_features=True, rngs={"dropout": k_main})
        total, metrics = seg_loss(out["pred_masks"], batch)
        metrics = dict(metrics)
        branches = []   # (name, weight, patch mask, word mask)
        if alpha > 0 or beta > 0:
            corr = masking.correlation(jax.lax.stop_gradient(out["clip_patches"]),
                                       jax.lax.stop_gradient(out["clip_words"]))
            words = masking.word_positions(ids, att)
            no_patches = jnp.zeros(corr.shape[:2], bool)
            no_words = jnp.zeros(ids.shape, bool)
            if alpha > 0:
                patch_mask = masking.select(masking.patch_scores(corr, words),
                                            jnp.ones_like(no_patches), c["patch_ratio"],
                                            k_patch, c["masking"], c["temperature"])
                branches.append(("vision", alpha, patch_mask, no_words))
            if beta > 0:
                word_mask = masking.select(masking.word_scores(corr), words, c["word_ratio"],
                                           k_word, c["masking"], c["temperature"])
                branches.append(("language", beta, no_patches, word_mask))
        if branches:
            n = len(branches)
            student = model.apply(
                {"params": params}, jnp.concatenate([image] * n), jnp.concatenate([ids] * n),
                jnp.concatenate([att] * n), train=True,
                patch_mask=jnp.concatenate([b[2] for b in branches]),
                word_mask=jnp.concatenate([b[3] for b in branches]),
                rngs={"dropout": k_branch})["pred_masks"]
            teacher = jax.lax.stop_gradient(out["pred_masks"][:, 0])
            b = image.shape[0]
            for i, (name, w, _, _) in enumerate(branches):
                pred = student[i * b:(i + 1) * b]
                d = distill_loss(pred[:, 0], teacher, batch["weight"], c["distill"])
                metrics[f"loss_sd_{name}"] = d
                total = total + w * d
                if gamma > 0:
                    s, _ = seg_loss(pred, batch)
                    metrics[f"loss_seg_{name}"] = s
                    total = total + gamma * s
        metrics["loss"] = total
        return total, metrics

    return Objective(loss_fn=loss_fn, batch_keys=BASE_BATCH_KEYS,
                     summary=dict(alpha=alpha, beta=beta, seg_on_masked=gamma,
                                  masking=c["masking"], distill=c["distill"],
                                  patch_ratio=c["patch_ratio"], word_ratio=c["word_ratio"]))
