"""BERT (post-norm, exact GELU) in Linen, callable layer range by layer range.

Parameter names follow Hugging Face's BertModel so that checkpoints map one to one
(magnet_architecture.md §4.1, §9.3). The attention mask is the additive (1 − m)·(−10000)
of the original implementation; every position, padding included, is computed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.layers import dense, gelu, layer_norm
from magnet_jax.models.stacks import MIN_SCAN_STEPS, layer_keys, scan_layers

Dtype = Any


def additive_attention_mask(att: jax.Array) -> jax.Array:
    """(B, N) {0,1} -> (B, 1, N) with 0 for tokens and −10000 for padding."""
    return (1.0 - att.astype(jnp.float32))[:, None, :] * -10000.0


class BertEmbeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, deterministic: bool = True) -> jax.Array:
        init = nn.initializers.normal(0.02)
        word = nn.Embed(self.vocab_size, self.hidden_size, name="word_embeddings",
                        embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                        dtype=self.dtype)(ids)
        n = ids.shape[1]
        pos_table = nn.Embed(self.max_position_embeddings, self.hidden_size,
                             name="position_embeddings", dtype=self.dtype,
                             embedding_init=nn.with_logical_partitioning(init, (None, "embed")))
        type_table = nn.Embed(self.type_vocab_size, self.hidden_size,
                              name="token_type_embeddings", dtype=self.dtype,
                              embedding_init=nn.with_logical_partitioning(init, (None, "embed")))
        x = word + pos_table(jnp.arange(n))[None] + type_table(jnp.zeros_like(ids))
        x = layer_norm(self.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    hidden_size: int
    num_heads: int
    attention_dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        b, n, _ = x.shape
        hd = self.hidden_size // self.num_heads

        def heads(name):
            y = dense(self.hidden_size, name=name, axes=("embed", "heads"), dtype=self.dtype)(x)
            return y.reshape(b, n, self.num_heads, hd)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (hd ** 0.5)
        scores = scores.astype(jnp.float32) + mask[:, None, :, :]
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(self.attention_dropout)(probs, deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, n, self.hidden_size)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual); used twice per layer under two names."""
    hidden_size: int
    layer_norm_eps: float
    dropout: float
    axes: tuple = ("heads", "embed")
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, residual, deterministic):
        x = dense(self.hidden_size, name="dense", axes=self.axes, dtype=self.dtype)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return layer_norm(self.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x + residual)


class BertAttention(nn.Module):
    hidden_size: int
    num_heads: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        ctx = BertSelfAttention(self.hidden_size, self.num_heads, self.attention_dropout,
                                dtype=self.dtype, name="self")(x, mask, deterministic)
        return BertResidualOutput(self.hidden_size, self.layer_norm_eps, self.hidden_dropout,
                                  dtype=self.dtype, name="output")(ctx, x, deterministic)


class BertLayer(nn.Module):
    hidden_size: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        a = BertAttention(self.hidden_size, self.num_heads, self.layer_norm_eps,
                          self.hidden_dropout, self.attention_dropout, dtype=self.dtype,
                          name="attention")(x, mask, deterministic)
        inter = BertIntermediate(self.intermediate_size, dtype=self.dtype, name="intermediate")(a)
        return BertResidualOutput(self.hidden_size, self.layer_norm_eps, self.hidden_dropout,
                                  axes=("mlp", "embed"), dtype=self.dtype,
                                  name="output")(inter, a, deterministic)


class BertIntermediate(nn.Module):
    intermediate_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return gelu(dense(self.intermediate_size, name="dense", dtype=self.dtype)(x))


class BertEncoder(nn.Module):
    """The stack of layers (`encoder/layer_n`), run over a half-open range [start, end);
    with `scan`, a range of several layers runs as one lax.scan (models/stacks.py)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    remat: bool = False
    scan: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
        self.layer = [layer_cls(self.hidden_size, self.num_heads, self.intermediate_size,
                                self.layer_norm_eps, self.hidden_dropout, self.attention_dropout,
                                dtype=self.dtype) for _ in range(self.num_layers)]

    def __call__(self, x, mask, start: int = 0, end: int | None = None, deterministic: bool = True):
        end = self.num_layers if end is None else end
        if not self.scan or end - start < MIN_SCAN_STEPS or self.is_initializing():
            for i in range(start, end):
                x = self.layer[i](x, mask, deterministic)
            return x
        params = self.variables["params"]
        layer = BertLayer(self.hidden_size, self.num_heads, self.intermediate_size,
                          self.layer_norm_eps, self.hidden_dropout, self.attention_dropout,
                          dtype=self.dtype, parent=None)   # unbound: applied per step
        keys = layer_keys(None if deterministic else self.make_rng("dropout"), end - start)

        def step(x, p, key):
            rngs = {} if key is None else {"dropout": key}
            return layer.apply({"params": p}, x, mask, deterministic, rngs=rngs), None

        x, _ = scan_layers(step, x, [params[f"layer_{i}"] for i in range(start, end)], keys,
                           remat=self.remat)
        return x
