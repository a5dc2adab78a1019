"""Cross-modal fusion of MagNet: pixel-word attention on both sides, the pyramid
alignment branch ("CAM") and the mixer that feeds the pixel decoder.

magnet_architecture.md §3 (image side) and §4.2–4.3 (language side, including the
official mask quirk that this module reproduces on purpose).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import ops, stacks
from magnet_jax.models.layers import (BlockAccumulatedDense, dense, gelu, layer_norm,
                                      torch_default_kernel)

Dtype = Any
HIGHEST = jax.lax.Precision.HIGHEST


class ImageLanguageAttention(nn.Module):
    """Pixels attend to words (one head, width D). x (B, L, D), words (B, N, Cw), m01 (B, N, 1)."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, words, m01):
        conv = dict(kernel_init=torch_default_kernel, dtype=self.dtype)
        query = dense(self.dim, name="f_query", dtype=self.dtype)(x)
        query = layer_norm(1e-5, name="f_query_norm", dtype=self.dtype)(query)
        key = dense(self.dim, name="f_key", **conv)(words) * m01
        value = dense(self.dim, name="f_value", **conv)(words) * m01
        scores = jnp.einsum("bld,bnd->bln", query, key) * (self.dim ** -0.5)
        scores = scores + (1e4 * jnp.swapaxes(m01, 1, 2) - 1e4)
        attn = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
        out = jnp.einsum("bln,bnd->bld", attn, value)
        out = dense(self.dim, name="W", dtype=self.dtype)(out)
        return layer_norm(1e-5, name="W_norm", dtype=self.dtype)(out)


class ImagePWAM(nn.Module):
    """Image-side pixel-word attention module: (B, L, D) visual tokens -> (B, L, D)."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, words, m01):
        conv = dict(kernel_init=torch_default_kernel, dtype=self.dtype)
        vis = gelu(dense(self.dim, name="vis_project", **conv)(x))
        lang = ImageLanguageAttention(self.dim, dtype=self.dtype, name="image_lang_att")(x, words, m01)
        return gelu(dense(self.dim, name="project_mm", **conv)(vis * lang))


class LanguageImageAttention(nn.Module):
    """Words attend to pixels, in float32 (its logits reach ±1e8 with the official mask).

    words (B, N, Cw), x (B, L, Cv), e (B, N, 1): e is BERT's additive mask (0 / −10000) in the
    official mode or the 0/1 mask in the "binary" ablation (magnet_architecture.md §4.3).
    """
    dim: int

    @nn.compact
    def __call__(self, words, x, e):
        def proj(name):
            return BlockAccumulatedDense(self.dim, kernel_init=torch_default_kernel, name=name)

        words = words.astype(jnp.float32)
        x = x.astype(jnp.float32)
        query = proj("f_query")(words) * e
        key = ops.instance_norm(proj("f_key")(x), axis=1)
        value = ops.instance_norm(proj("f_value")(x), axis=1)
        # Op order matters for the tie structure of padding tokens: matmul, scale, add.
        scores = jnp.einsum("bnd,bld->bnl", query, key, precision=HIGHEST) * (self.dim ** -0.5)
        scores = scores + (1e4 * e - 1e4)
        attn = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bnl,bld->bnd", attn, value, precision=HIGHEST)
        out = proj("W")(out)
        return ops.instance_norm(out, axis=1)   # over the tokens, padding included


class LanguagePWAM(nn.Module):
    """Language-side pixel-word attention module: words (B, N, Cw) -> (B, N, Cw)."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, words, x, e):
        f32 = dict(kernel_init=torch_default_kernel, dtype=jnp.float32, precision=HIGHEST)
        vis = gelu(dense(self.dim, name="vis_project", **f32)(words.astype(jnp.float32)))
        lang = LanguageImageAttention(self.dim, name="image_lang_att")(words, x, e)
        out = gelu(dense(self.dim, name="project_mm", **f32)(vis * lang))
        return out.astype(self.dtype)


class ChannelLayerNorm(nn.Module):
    """Per-pixel LayerNorm over channels with eps 1e-6: (x − u)/sqrt(s + eps)·w + b."""
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        u = xf.mean(-1, keepdims=True)
        s = jnp.square(xf - u).mean(-1, keepdims=True)
        y = (xf - u) / jnp.sqrt(s + self.epsilon)
        return (y * scale + bias).astype(x.dtype)


class PyramidPool(nn.Module):
    """Adaptive pool to p×p, then 1×1 convs C→4C, channel LN, 4C→C, GELU, C→r (all bias-free)."""
    dim: int
    out_dim: int
    pool: int
    dtype: Dtype = jnp.float32

    def __call__(self, x_map):
        return self.project(ops.adaptive_avg_pool2d(x_map, self.pool))

    @nn.compact
    def project(self, y):
        """The convolutions alone, on pooled cells (..., C): each cell independently."""
        conv = dict(use_bias=False, kernel_init=torch_default_kernel, dtype=self.dtype)
        y = dense(4 * self.dim, name="expand", **conv)(y)
        y = ChannelLayerNorm(name="norm")(y)
        y = gelu(dense(self.dim, name="reduce", axes=("mlp", "embed"), **conv)(y))
        return dense(self.out_dim, name="out", **conv)(y)


class Mixer(nn.Module):
    """Dense 2C→C, LayerNorm, Dense C→C, GELU: the per-stage feature sent to the decoder."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        z = dense(self.dim, name="fc1", dtype=self.dtype)(z)
        z = layer_norm(1e-5, name="norm", dtype=self.dtype)(z)
        return gelu(dense(self.dim, name="fc2", dtype=self.dtype)(z))


def pyramid_branch(pyramid: PyramidPool, fusion: ImagePWAM, x_map, words, m01):
    """One pyramid scale: pool + convs (pyramids_k), PWAM (fusions_k), align-corners upsample.

    x_map (B, H, W, C) -> (B, H, W, r). The two modules are siblings in the official
    parameter tree, so this is a function over both rather than a parent module.
    """
    b, h, w, _ = x_map.shape
    y = pyramid(x_map)
    p, r = y.shape[1], y.shape[-1]
    y = fusion(y.reshape(b, p * p, r), words, m01).reshape(b, p, p, r)
    return ops.resize_bilinear_align_corners(y, (h, w))


def batched_pyramid_branches(pyramid_params: Sequence, fusion_params: Sequence,
                             pools: Sequence[int], dim: int, out_dim: int, x_map, words, m01,
                             dtype=jnp.float32):
    """Every pyramid scale at once, the same values as `pyramid_branch` per scale.

    The pooled cells of all scales are padded to the largest grid and the convolutions and
    the PWAM (both act on each cell independently) run once, vmapped over the scales'
    stacked parameters: one copy of the branch in the graph instead of one per scale.
    pyramid_params / fusion_params: each scale's parameter trees (pyramids_k, fusions_k).
    """
    b, h, w, _ = x_map.shape
    cells = max(p * p for p in pools)
    pooled = []
    for p in pools:
        y = ops.adaptive_avg_pool2d(x_map, p).reshape(b, p * p, -1)
        pooled.append(jnp.pad(y, ((0, 0), (0, cells - p * p), (0, 0))))
    # Unbound copies applied to each scale's parameters; `pool` is unused by `project`.
    pyramid = PyramidPool(dim, out_dim, pools[0], dtype=dtype, parent=None)
    fusion = ImagePWAM(out_dim, dtype=dtype, parent=None)

    def branch(p_pyramid, p_fusion, y):
        y = pyramid.apply({"params": p_pyramid}, y, method=PyramidPool.project)
        return fusion.apply({"params": p_fusion}, y, words, m01)

    stack = stacks.stack_trees
    out = jax.vmap(branch)(stack(pyramid_params), stack(fusion_params), jnp.stack(pooled))
    r = out.shape[-1]
    return [ops.resize_bilinear_align_corners(out[k, :, :p * p].reshape(b, p, p, r), (h, w))
            for k, p in enumerate(pools)]


def fuse_image_stage(x_map, words, m01, *, fusion: ImagePWAM, res_gate, mixer: Mixer,
                     branches: Sequence[jax.Array]):
    """Image-side fusion of one stage (magnet_architecture.md §3.4); `branches` are the
    pyramid scales' outputs (B, H, W, r) (`pyramid_branch` or `batched_pyramid_branches`).

    Returns (feat (B, H, W, C) for the pixel decoder, gated map for the next Swin stage or None).
    """
    b, h, w, c = x_map.shape
    tokens = x_map.reshape(b, h * w, c)
    f = fusion(tokens, words, m01)
    gated = res_gate(tokens, f).reshape(b, h, w, c) if res_gate is not None else None
    z = jnp.concatenate(list(branches) + [f.reshape(b, h, w, c)], axis=-1)
    return mixer(z), gated
