"""JMCELN decoder: learnable contextual embedding + progressive alignment (PAN).

A reconstruction of Huang & Satoh, EMNLP 2023, from the abstract only; the design is ours
(training_objectives.md §7.2). A small set of contextual embeddings E is refined over
`num_stages` stages. At each stage it reads the pixels and words, conditioned on the context
pooled under the previous stage's mask, and predicts one mask M̃_k. PAN then uses the
previous stage's mask M_{k-1} as a filter on M̃_k (or gates between the two), which reduces
error propagation from stage to stage. Every stage's prediction is returned for deep
supervision.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import ops
from magnet_jax.models.layers import dense, layer_norm, torch_default_kernel
from magnet_jax.models.mask_decoder import AttentionLayer, FFNLayer, MaskEmbedMLP

Dtype = Any

# model.jmceln.pan: "filter" σ(M_k) = σ(M̃_k)·σ(M_{k-1}); "gate"
# M_k = M̃_k + g_k·(M_{k-1} − M̃_k) with a learned g_k = sigmoid(pan_gates[k]);
# "none" M_k = M̃_k (no alignment, an ablation).
PAN_FORMS = ("filter", "gate", "none")

# Guards the pooling denominator: Σ σ(M) underflows to 0 when a mask is confidently empty.
POOL_EPS = 1e-6
# Largest log-probability the "filter" form returns as a logit: log(−expm1(0)) = −inf.
MAX_LOG_PROB = -1e-6


def mask_pooled_context(mask_logits: jax.Array, features: jax.Array) -> jax.Array:
    """(B, H, W) mask logits, (B, H, W, C) features -> (B, C) float32 mean of the features
    weighted by σ(mask): Σ_hw σ(M) F / Σ_hw σ(M). Zero logits give the plain mean."""
    weights = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
    total = jnp.einsum("bhw,bhwc->bc", weights, features.astype(jnp.float32))
    return total / (jnp.sum(weights, axis=(1, 2))[:, None] + POOL_EPS)


def filter_logits(raw: jax.Array, previous: jax.Array) -> jax.Array:
    """PAN "filter": the logit of σ(raw)·σ(previous), computed in log space (float32)."""
    log_p = jax.nn.log_sigmoid(raw.astype(jnp.float32)) + jax.nn.log_sigmoid(
        previous.astype(jnp.float32))
    # logit(p) = log p − log(1 − p); p = 1 exactly only when both factors round to 1.
    log_p = jnp.minimum(log_p, MAX_LOG_PROB)
    return log_p - jnp.log(-jnp.expm1(log_p))


def check_pan(pan: str) -> None:
    if pan not in PAN_FORMS:
        raise ValueError(f"model.jmceln.pan must be one of {', '.join(PAN_FORMS)}; got {pan!r}")


class ContextualEmbeddingDecoder(nn.Module):
    """(L memory maps coarse→fine (B, h, w, C), mask_features (B, H, W, C),
    words (B, N, D_text), att (B, N) int) -> predictions.

    Returns a list of num_stages dicts {pred_masks (B, 1, H, W): M_k after PAN,
    raw_masks (B, 1, H, W): M̃_k before it}, float32 logits, the last one being the final
    prediction.
    """
    hidden_dim: int = 256
    num_heads: int = 8
    ffn_dim: int = 2048
    num_stages: int = 3
    num_embeddings: int = 8
    pan: str = "filter"
    gate_init: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, memories: Sequence[jax.Array], mask_features: jax.Array,
                 words: jax.Array, att: jax.Array):
        check_pan(self.pan)
        c, ne = self.hidden_dim, self.num_embeddings
        b, height, width = mask_features.shape[:3]
        num_levels = len(memories)
        embed_init = nn.initializers.normal(1.0)
        context_embedding = self.param("context_embedding", embed_init, (ne, c), jnp.float32)
        context_pos = self.param("context_pos", embed_init, (ne, c), jnp.float32)
        level_embed = self.param("level_embed", embed_init, (num_levels, c), jnp.float32)
        gates = (self.param("pan_gates", nn.initializers.constant(self.gate_init),
                            (self.num_stages,), jnp.float32)
                 if self.pan == "gate" else None)

        real = att > 0                                                           # (B, N)
        text = dense(c, name="word_proj", kernel_init=torch_default_kernel,
                     dtype=self.dtype)(words)                                     # (B, N, C)
        n = text.shape[1]
        # The sentence vector that picks among the embeddings; padded words weigh nothing.
        text32 = jnp.where(real[..., None], text.astype(jnp.float32), 0.0)
        sentence = jnp.sum(text32, axis=1) / jnp.maximum(
            jnp.sum(real, axis=1, dtype=jnp.float32), 1.0)[:, None]              # (B, C)
        # Padded words may not be attended; pixels always may, so no row is all blocked.
        word_block = jnp.broadcast_to(~real[:, None, :], (b, ne, n))
        word_pos = jnp.zeros((1, n, c), self.dtype)
        srcs, poses, blocks = [], [], []
        for level, x in enumerate(memories):
            h, w = x.shape[1:3]
            pe = ops.sine_position_embedding_in_graph(h, w, c // 2).reshape(1, h * w, c)
            # As in MaskedAttentionDecoder, the level embedding reaches the values too.
            src = x.reshape(b, h * w, c).astype(self.dtype) + level_embed[level][None, None].astype(
                self.dtype)
            srcs.append(jnp.concatenate([src, text], axis=1))
            poses.append(jnp.broadcast_to(
                jnp.concatenate([pe.astype(self.dtype), word_pos], axis=1), (b, h * w + n, c)))
            blocks.append(jnp.concatenate([jnp.zeros((b, ne, h * w), bool), word_block],
                                          axis=-1))

        query_pos = jnp.broadcast_to(context_pos[None], (b, ne, c)).astype(self.dtype)
        embeddings = jnp.broadcast_to(context_embedding[None], (b, ne, c)).astype(self.dtype)
        embed_norm = layer_norm(1e-5, name="embed_norm", dtype=self.dtype)
        mask_embed = MaskEmbedMLP(c, dtype=self.dtype, name="mask_embed")

        previous = jnp.zeros((b, height, width), jnp.float32)     # M_0: a uniform 0.5 mask
        predictions = []
        for k in range(self.num_stages):
            level = k % num_levels
            context = mask_pooled_context(previous, mask_features)                 # (B, C)
            query = embeddings + context[:, None].astype(self.dtype)
            embeddings = AttentionLayer(c, self.num_heads, dtype=self.dtype,
                                        name=f"cross_attn_{k}")(
                query, query_pos, srcs[level], poses[level], blocks[level])
            embeddings = AttentionLayer(c, self.num_heads, dtype=self.dtype,
                                        name=f"self_attn_{k}")(
                embeddings, query_pos, embeddings, query_pos)
            embeddings = FFNLayer(c, self.ffn_dim, dtype=self.dtype, name=f"ffn_{k}")(embeddings)

            # One mask per stage: the embeddings mixed by their agreement with the sentence.
            scores = jnp.einsum("bec,bc->be", embeddings.astype(jnp.float32), sentence) * (
                c ** -0.5)
            mix = jnp.einsum("be,bec->bc", jax.nn.softmax(scores, axis=-1),
                             embeddings.astype(jnp.float32))
            kernel = mask_embed(embed_norm(mix.astype(self.dtype)))                 # (B, C)
            raw = jnp.einsum("bc,bhwc->bhw", kernel,
                             mask_features.astype(self.dtype)).astype(jnp.float32)
            if k == 0 or self.pan == "none":
                pred = raw
            elif self.pan == "filter":
                pred = filter_logits(raw, previous)
            else:
                pred = raw + jax.nn.sigmoid(gates[k]) * (previous - raw)
            predictions.append(dict(pred_masks=pred[:, None], raw_masks=raw[:, None]))
            previous = pred
        return predictions


__all__ = ["PAN_FORMS", "ContextualEmbeddingDecoder", "mask_pooled_context", "filter_logits",
           "check_pan"]
