"""Cross-modal alignment loss (CAL): pixel-to-text and pixel-to-pixel contrast
(training_objectives.md §5, a reconstruction).

The projections (``lang_proj`` Dense 768 → 256, optional pixel head) are model parameters; the
functions here take already-projected embeddings and L2-normalise them themselves in
``cal_loss``. The inner functions ``p2t_loss`` / ``p2p_loss`` / ``p2p_loss_from_indices`` take
normalised embeddings.

An example is *skipped* by both terms when its weight is 0 (padding) or it has no foreground
pixel at the feature resolution; skipped examples contribute exactly 0 and the averages are over
the remaining ones (0 when none remain). Every division is guarded, so the loss and its gradient
stay finite for any batch. All computation is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magnet_jax.models import ops

P2T_KINDS = ("bce", "infonce")
# Large finite negative for masked logits: exp underflows to 0 without inf − inf = NaN.
_NEG = -1e9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(‖x‖, eps) along ``axis`` (torch F.normalize), in float32."""
    x = x.astype(jnp.float32)
    # Clamp before the sqrt: d sqrt/dx at 0 is inf, which would make 0-vectors' grads NaN.
    sq = jnp.sum(x * x, axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def downsample_labels(gt_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W) {0, 1} mask -> (B, h, w) float32 {0, 1}: area average, then ≥ 0.5
    (a block that is exactly half foreground counts as foreground)."""
    return (ops.area_downsample(gt_mask, size) >= 0.5).astype(jnp.float32)


def _usable(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """(B,) bool: real examples with at least one foreground pixel."""
    return valid.astype(bool) & (jnp.sum(labels, axis=1) > 0)


def _mean_over(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of (B,) values over mask; 0 when the mask is empty. where() keeps NaN/inf of
    skipped rows out of both the value and the gradient."""
    m = mask.astype(jnp.float32)
    values = jnp.where(mask, values, 0.0)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def p2t_loss(pixel_emb: jax.Array, text_emb: jax.Array, labels: jax.Array, valid: jax.Array,
             kind: str = "bce", temperature: float = 0.07) -> jax.Array:
    """Pixel-to-text contrast, averaged over usable examples.

    pixel_emb: (B, N, C) L2-normalised; text_emb: (B, C) L2-normalised; labels: (B, N) {0, 1};
    valid: (B,) bool. With s_i = F_i · t / τ:
      "bce":     mean_i BCE(σ(s_i), y_i) over all N pixels (CRIS-style);
      "infonce": −(1/|P|) Σ_{i∈P} log softmax_j(s)_i, j over all N pixels of the image.
    """
    if kind not in P2T_KINDS:
        raise ValueError(f"cal.p2t: unknown kind {kind!r}; expected one of {P2T_KINDS}")
    f = pixel_emb.astype(jnp.float32)
    t = text_emb.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    s = jnp.einsum("bnc,bc->bn", f, t, precision=jax.lax.Precision.HIGHEST) / temperature
    if kind == "bce":
        per = jnp.mean(jnp.maximum(s, 0.0) - s * y + jnp.log1p(jnp.exp(-jnp.abs(s))), axis=1)
    else:
        log_p = s - jax.nn.logsumexp(s, axis=1, keepdims=True)
        per = -jnp.sum(log_p * y, axis=1) / jnp.maximum(jnp.sum(y, axis=1), 1.0)
    return _mean_over(per, _usable(y, valid))


def p2p_loss_from_indices(pixel_emb: jax.Array, fg_idx: jax.Array, bg_idx: jax.Array,
                          valid: jax.Array, bg_valid: jax.Array,
                          temperature: float = 0.07) -> jax.Array:
    """Supervised pixel contrast on given sampled pixels, averaged over ``valid`` examples.

    pixel_emb: (B, N, C) L2-normalised; fg_idx: (B, K_fg) and bg_idx: (B, K_bg) int pixel
    indices; valid: (B,) bool (examples to average over); bg_valid: (B,) bool, False when the
    image has no background pixel (its bg samples then take no part). Samples are told apart by
    their slot, not their pixel: a pixel drawn twice is two samples (a positive pair).
      L = −(1/|A|) Σ_{i∈A} (1/|P_i|) Σ_{k∈P_i} log( e^{s_ik} / Σ_{j≠i} e^{s_ij} ),
    s = F·F/τ, A = fg slots, P_i = the other fg slots, j over all (usable) sampled slots.
    """
    f = pixel_emb.astype(jnp.float32)
    k_fg, k_bg = fg_idx.shape[1], bg_idx.shape[1]
    idx = jnp.concatenate([fg_idx, bg_idx], axis=1)  # (B, K)
    z = jnp.take_along_axis(f, idx[..., None].astype(jnp.int32), axis=1)  # (B, K, C)
    anchors = z[:, :k_fg]  # (B, K_fg, C)
    s = jnp.einsum("bic,bjc->bij", anchors, z, precision=jax.lax.Precision.HIGHEST) / temperature
    k = k_fg + k_bg
    not_self = ~jnp.eye(k_fg, k, dtype=bool)  # (K_fg, K): column i of row i is the anchor
    col_ok = jnp.concatenate(
        [jnp.ones((f.shape[0], k_fg), bool),
         jnp.broadcast_to(bg_valid.astype(bool)[:, None], (f.shape[0], k_bg))], axis=1)
    denom_mask = not_self[None] & col_ok[:, None, :]  # (B, K_fg, K)
    log_den = jax.nn.logsumexp(jnp.where(denom_mask, s, _NEG), axis=-1, keepdims=True)
    pos_mask = not_self[None, :, :k_fg]  # (1, K_fg, K_fg)
    log_p = jnp.where(pos_mask, s[:, :, :k_fg] - log_den, 0.0)
    per_anchor = -jnp.sum(log_p, axis=-1) / max(k_fg - 1, 1)
    return _mean_over(jnp.mean(per_anchor, axis=-1), valid)


def sample_pixels(rng: jax.Array, labels: jax.Array, num_fg: int = 512,
                  num_bg: int = 512) -> tuple[jax.Array, jax.Array]:
    """Per image, num_fg foreground and num_bg background pixel indices, with replacement.

    labels: (B, N) {0, 1}. Returns fg_idx (B, num_fg), bg_idx (B, num_bg) int32. When an image
    has no pixel of a class the draw is uniform (the caller masks those samples out).
    """
    y = labels.astype(jnp.float32)
    n = y.shape[1]

    def probs(w):
        total = jnp.sum(w)
        return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 1.0 / n)

    def one(key, yb):
        k_fg, k_bg = jax.random.split(key)
        fg = jax.random.choice(k_fg, n, (num_fg,), replace=True, p=probs(yb))
        bg = jax.random.choice(k_bg, n, (num_bg,), replace=True, p=probs(1.0 - yb))
        return fg.astype(jnp.int32), bg.astype(jnp.int32)

    keys = jax.random.split(rng, y.shape[0])
    return jax.vmap(one)(keys, y)


def p2p_loss(pixel_emb: jax.Array, labels: jax.Array, valid: jax.Array, rng: jax.Array,
             num_fg: int = 512, num_bg: int = 512, temperature: float = 0.07) -> jax.Array:
    """Pixel-to-pixel supervised contrast (§5): sample, then ``p2p_loss_from_indices``.

    pixel_emb: (B, N, C) L2-normalised; labels: (B, N) {0, 1}; valid: (B,) bool.
    """
    y = labels.astype(jnp.float32)
    fg_idx, bg_idx = sample_pixels(rng, y, num_fg, num_bg)
    bg_valid = jnp.sum(1.0 - y, axis=1) > 0
    return p2p_loss_from_indices(pixel_emb, fg_idx, bg_idx, _usable(y, valid), bg_valid,
                                 temperature)


def cal_loss(
    mask_features: jax.Array,
    text_embedding: jax.Array,
    gt_mask: jax.Array,
    weight: jax.Array,
    rng: jax.Array,
    *,
    p2t: str = "bce",
    temperature: float = 0.07,
    w_p2t: float = 1.0,
    w_p2p: float = 1.0,
    num_fg: int = 512,
    num_bg: int = 512,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L_CAL = w_p2t · L_P2T + w_p2p · L_P2P (§5).

    mask_features: (B, h, w, C) pixel embeddings g(mask_features) (not yet normalised);
    text_embedding: (B, C) projected sentence feature lang_proj(s) (not yet normalised);
    gt_mask: (B, H, W) {0, 1} at input resolution (area-downsampled to h × w, ≥ 0.5);
    weight: (B,) 1 real / 0 padded; rng: the per-step key (P2P sampling).
    Returns (loss, metrics with loss_p2t, loss_p2p, loss_cal, cal_num_used).
    """
    b, h, w, c = mask_features.shape
    labels = downsample_labels(gt_mask, (h, w)).reshape(b, h * w)
    f = l2_normalize(mask_features.reshape(b, h * w, c))
    t = l2_normalize(text_embedding)
    valid = weight > 0
    l_p2t = p2t_loss(f, t, labels, valid, p2t, temperature)
    l_p2p = p2p_loss(f, labels, valid, rng, num_fg, num_bg, temperature)
    loss = w_p2t * l_p2t + w_p2p * l_p2p
    used = jnp.sum(_usable(labels, valid).astype(jnp.float32))
    metrics = {"loss_p2t": l_p2t, "loss_p2p": l_p2p, "loss_cal": loss, "cal_num_used": used}
    return loss, metrics
