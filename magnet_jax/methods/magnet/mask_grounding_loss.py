"""Mask Grounding loss: masked-token cross-entropy (training_objectives.md §3.2, §3.3 step 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mask_grounding_loss(logits: jax.Array, targets: jax.Array,
                        weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean cross-entropy over the selected tokens of the real examples of the whole batch.

    logits (B, N, V); targets (B, N) int, original token id where selected, −1 elsewhere;
    weight (B,) per-example weight, 0 for padding examples (1 for real ones).
    Each selected token counts with its example's weight, so with {0,1} weights this is the
    plain mean over selected tokens of real examples. Under jit with a batch-sharded input the
    sums are global, so the mean is over the global batch, not per device.

    Returns (loss, metrics) with float32 scalars loss_mg, mg_accuracy (top-1 over the same
    tokens) and mg_num_selected (weighted count). With nothing selected the loss is 0 and the
    gradients are 0 (never 0/0).
    """
    logits = logits.astype(jnp.float32)
    selected = targets >= 0
    # −1 must not index the vocabulary; the placeholder id 0 is masked out below.
    safe_targets = jnp.where(selected, targets, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]

    token_w = jnp.where(selected, weight.astype(jnp.float32)[:, None], 0.0)
    count = token_w.sum()
    denom = jnp.maximum(count, 1e-6)
    loss = jnp.where(token_w > 0, nll * token_w, 0.0).sum() / denom

    correct = (jnp.argmax(logits, axis=-1) == safe_targets).astype(jnp.float32)
    accuracy = (correct * token_w).sum() / denom
    metrics = {"loss_mg": loss, "mg_accuracy": accuracy, "mg_num_selected": count}
    return loss, metrics
