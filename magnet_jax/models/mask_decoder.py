"""Mask2Former masked-attention decoder with learnable queries (one for MagNet).

magnet_architecture.md §6: post-norm layers (masked cross-attention, self-attention, FFN)
cycling over three memory levels, and a prediction head run before the first layer and
after each layer; every prediction is returned for deep supervision.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import ops
from magnet_jax.models.layers import dense, layer_norm, torch_default_kernel
from magnet_jax.models.stacks import MIN_SCAN_STEPS, scan_layers

Dtype = Any
xavier = nn.initializers.xavier_uniform()


class AttentionLayer(nn.Module):
    """Post-norm residual attention, LN(x + MHA(x + qpos, mem + kpos, mem)), with
    torch.nn.MultiheadAttention math: q scaled before the matmul, heads on contiguous
    channel blocks, boolean `block` (B, Q, K) = may not attend (−inf).
    """
    dim: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, query_pos, memory, memory_pos, block=None):
        hd = self.dim // self.num_heads

        def stacked_xavier(key, shape, dtype=jnp.float32):
            # xavier_uniform over torch's stacked (3C, C) in_proj: bound sqrt(6 / 4C).
            bound = (6.0 / (shape[0] + 3 * shape[1])) ** 0.5
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        def proj(inputs, name):
            y = dense(self.dim, name=name, axes=("embed", "heads"), kernel_init=stacked_xavier,
                      dtype=self.dtype)(inputs)
            return y.reshape(inputs.shape[0], inputs.shape[1], self.num_heads, hd)

        q = proj(x + query_pos, "query") * (hd ** -0.5)
        k = proj(memory + memory_pos, "key")
        v = proj(memory, "value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if block is not None:
            logits = jnp.where(block[:, None], -jnp.inf, logits)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(x.shape[0], x.shape[1], self.dim)
        out = dense(self.dim, name="out", axes=("heads", "embed"), kernel_init=xavier,
                    dtype=self.dtype)(out)
        return layer_norm(1e-5, name="norm", dtype=self.dtype)(x + out)


class FFNLayer(nn.Module):
    dim: int
    ffn_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.relu(dense(self.ffn_dim, name="linear1", kernel_init=xavier, dtype=self.dtype)(x))
        h = dense(self.dim, name="linear2", axes=("mlp", "embed"), kernel_init=xavier,
                  dtype=self.dtype)(h)
        return layer_norm(1e-5, name="norm", dtype=self.dtype)(x + h)


class MaskEmbedMLP(nn.Module):
    dim: int
    num_layers: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = dense(self.dim, name=f"layers_{i}", kernel_init=torch_default_kernel,
                      dtype=self.dtype)(x)
            if i < self.num_layers - 1:
                x = nn.relu(x)
        return x


class MaskedAttentionDecoder(nn.Module):
    """(3 memory maps coarse→fine (B, h, w, C), mask_features (B, H, W, C)) -> predictions.

    Returns a list of num_layers + 1 dicts {pred_logits (B, Q, classes+1),
    pred_masks (B, Q, H, W)}, the last one being the final prediction.
    """
    hidden_dim: int = 256
    num_heads: int = 8
    num_layers: int = 9
    ffn_dim: int = 2048
    num_queries: int = 1
    num_classes: int = 1
    scan: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, memories: Sequence[jax.Array], mask_features: jax.Array):
        c = self.hidden_dim
        b = mask_features.shape[0]
        num_levels = len(memories)
        embed_init = nn.initializers.normal(1.0)
        level_embed = self.param("level_embed", embed_init, (num_levels, c), jnp.float32)
        query_feat = self.param("query_feat", embed_init, (self.num_queries, c), jnp.float32)
        query_embed = self.param("query_embed", embed_init, (self.num_queries, c), jnp.float32)
        srcs, poses, sizes = [], [], []
        for level, x in enumerate(memories):
            h, w = x.shape[1:3]
            sizes.append((h, w))
            pe = ops.sine_position_embedding_in_graph(h, w, c // 2).reshape(1, h * w, c)
            poses.append(pe.astype(x.dtype))
            # Here the level embedding is added to the memory itself, so it reaches the values.
            srcs.append(x.reshape(b, h * w, c) + level_embed[level][None, None].astype(x.dtype))
        query_pos = jnp.broadcast_to(query_embed[None], (b, self.num_queries, c)).astype(self.dtype)
        output = jnp.broadcast_to(query_feat[None], (b, self.num_queries, c)).astype(self.dtype)

        decoder_norm = layer_norm(1e-5, name="decoder_norm", dtype=self.dtype)
        class_embed = dense(self.num_classes + 1, name="class_embed",
                            kernel_init=torch_default_kernel, dtype=self.dtype)
        mask_embed = MaskEmbedMLP(c, dtype=self.dtype, name="mask_embed")

        def predict(output, target_size):
            o = decoder_norm(output)
            logits = class_embed(o)
            masks = jnp.einsum("bqc,bhwc->bqhw", mask_embed(o), mask_features)
            small = ops.resize_bilinear_half_pixel(jnp.moveaxis(masks, 1, -1), target_size)
            block = jax.nn.sigmoid(small.astype(jnp.float32)) < 0.5          # (B, h, w, Q)
            block = jnp.moveaxis(block, -1, 1).reshape(b, self.num_queries, -1)
            return dict(pred_logits=logits, pred_masks=masks), jax.lax.stop_gradient(block)

        predictions = []
        pred, block = predict(output, sizes[0])
        predictions.append(pred)
        groups = self.num_layers // num_levels
        if (self.scan and self.num_layers % num_levels == 0 and groups >= MIN_SCAN_STEPS
                and not self.is_initializing()):
            return predictions + self._scanned_layers(output, block, groups, query_pos, srcs,
                                                      poses, sizes, predict)
        for i in range(self.num_layers):
            level = i % num_levels
            # A query whose predicted mask is empty attends everywhere.
            full = jnp.all(block, axis=-1, keepdims=True)
            block = jnp.where(full, False, block)
            output = AttentionLayer(c, self.num_heads, dtype=self.dtype, name=f"cross_attn_{i}")(
                output, query_pos, srcs[level], poses[level], block)
            output = AttentionLayer(c, self.num_heads, dtype=self.dtype, name=f"self_attn_{i}")(
                output, query_pos, output, query_pos)
            output = FFNLayer(c, self.ffn_dim, dtype=self.dtype, name=f"ffn_{i}")(output)
            pred, block = predict(output, sizes[(i + 1) % num_levels])
            predictions.append(pred)
        return predictions

    def _scanned_layers(self, output, block, groups, query_pos, srcs, poses, sizes, predict):
        """The layers as `groups` scan steps of one cycle over the memory levels each (the
        levels' shapes differ, a cycle's do not). Returns the predictions after every layer."""
        c, num_levels = self.hidden_dim, len(srcs)
        params = self.variables["params"]
        # Unbound copies, applied per step to each layer's parameters.
        attention = AttentionLayer(c, self.num_heads, dtype=self.dtype, parent=None)
        ffn = FFNLayer(c, self.ffn_dim, dtype=self.dtype, parent=None)
        group_params = [[(params[f"cross_attn_{i}"], params[f"self_attn_{i}"], params[f"ffn_{i}"])
                         for i in range(g * num_levels, (g + 1) * num_levels)]
                        for g in range(groups)]

        def step(carry, layer_params, _):
            output, block = carry
            preds = []
            for level, (p_cross, p_self, p_ffn) in enumerate(layer_params):
                full = jnp.all(block, axis=-1, keepdims=True)
                block = jnp.where(full, False, block)
                output = attention.apply({"params": p_cross}, output, query_pos, srcs[level],
                                         poses[level], block)
                output = attention.apply({"params": p_self}, output, query_pos, output, query_pos)
                output = ffn.apply({"params": p_ffn}, output)
                pred, block = predict(output, sizes[(level + 1) % num_levels])
                preds.append(pred)
            return (output, block), preds

        _, stacked = scan_layers(step, (output, block), group_params)
        return [jax.tree.map(lambda a, g=g: a[g], stacked[level])
                for g in range(groups) for level in range(num_levels)]
