"""Correlation-guided masking of CM-MaskSD (training_objectives.md §7.3, a reconstruction).

C = norm(V) · norm(W)ᵀ between CLIP's patch tokens V (B, N, D) and word tokens W (B, L, D),
both in CLIP's joint embedding space. A patch scores max over the sentence's words of C, a word
max over the patches; the `ratio` highest-scoring patches (words) of each example are masked.
Everything runs on device and is a function of the step's RNG key, so a step is reproducible.

Strategies (`cmmasksd.masking`):
  topk    the highest scores (default);
  sample  without replacement with probability ∝ softmax(score / temperature) (Gumbel top-k);
  random  uniformly at random (the ablation without correlation guidance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("topk", "sample", "random")


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown cmmasksd.masking {name!r}; expected one of "
                         f"{', '.join(STRATEGIES)}")
    return name


def correlation(patches: jax.Array, words: jax.Array) -> jax.Array:
    """(B, N, D), (B, L, D) -> (B, N, L) cosine similarities in float32."""
    p = patches.astype(jnp.float32)
    w = words.astype(jnp.float32)
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-6)
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-6)
    return jnp.einsum("bnd,bld->bnl", p, w)


def word_positions(ids: jax.Array, att: jax.Array) -> jax.Array:
    """(B, L) bool: the real words, i.e. kept tokens other than start- and end-of-text (the
    end-of-text token has the largest id of CLIP's vocabulary)."""
    positions = jnp.arange(ids.shape[1])[None, :]
    end = jnp.argmax(ids, axis=1)[:, None]
    return (att != 0) & (positions > 0) & (positions != end)


def patch_scores(corr: jax.Array, words: jax.Array) -> jax.Array:
    """(B, N): each patch's best match over the sentence's real words."""
    return jnp.max(jnp.where(words[:, None, :], corr, -jnp.inf), axis=2)


def word_scores(corr: jax.Array) -> jax.Array:
    """(B, L): each word's best match over the patches."""
    return jnp.max(corr, axis=1)


def select(scores: jax.Array, valid: jax.Array, ratio: float, key: jax.Array,
           strategy: str = "topk", temperature: float = 0.1) -> jax.Array:
    """(B, M) bool: per example, round(ratio × its valid count) (at least 1 when ratio > 0) of
    the valid positions, chosen from `scores` by `strategy`."""
    check_strategy(strategy)
    if not 0 <= ratio <= 1:
        raise ValueError(f"masking ratio must be in [0, 1], got {ratio}")
    if ratio == 0:
        return jnp.zeros(scores.shape, bool)
    scores = scores.astype(jnp.float32)
    if strategy == "random":
        keys = jax.random.uniform(key, scores.shape)
    elif strategy == "sample":
        keys = scores / temperature + jax.random.gumbel(key, scores.shape)
    else:
        keys = scores
    keys = jnp.where(valid, keys, -jnp.inf)
    count = valid.sum(axis=1, keepdims=True)
    take = jnp.where(count > 0, jnp.maximum(1, jnp.round(ratio * count)), 0)
    # rank 0 = the highest key; ties broken by position (argsort is stable).
    rank = jnp.argsort(jnp.argsort(-keys, axis=1, stable=True), axis=1, stable=True)
    return valid & (rank < take)


__all__ = ["STRATEGIES", "check_strategy", "correlation", "word_positions", "patch_scores",
           "word_scores", "select"]
