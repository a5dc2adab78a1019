"""Multi-scale deformable attention and the MagNet pixel decoder (magnet_architecture.md §5).

Pure JAX: sampling is `ops.grid_sample_bilinear_zeros` (torch grid_sample, bilinear, zero
padding, align_corners=False), one level at a time to bound memory.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.models import ops
from magnet_jax.models.layers import dense, layer_norm
from magnet_jax.models.stacks import scan_layers

Dtype = Any
xavier = nn.initializers.xavier_uniform()


def sampling_offset_bias_init(num_heads: int, num_levels: int, num_points: int):
    """Deformable-DETR grid init: head h looks along angle 2πh/H, (point+1) steps, every level."""
    def init(key, shape, dtype=jnp.float32):
        del key
        theta = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
        grid = np.stack([np.cos(theta), np.sin(theta)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
        grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
        return jnp.asarray(grid.reshape(shape), dtype)
    return init


def reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """(S, 2) normalised (x, y) centres of every token of every level, level 0 first."""
    points = []
    for h, w in spatial_shapes:
        ys = np.linspace(0.5, h - 0.5, h, dtype=np.float32) / np.float32(h)
        xs = np.linspace(0.5, w - 0.5, w, dtype=np.float32) / np.float32(w)
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        points.append(np.stack([xx.reshape(-1), yy.reshape(-1)], -1))
    return np.concatenate(points, 0).astype(np.float32)


class MSDeformAttn(nn.Module):
    """query (B, Q, C), refs (Q, 2), value_input (B, S, C) -> (B, Q, C)."""
    dim: int = 256
    num_levels: int = 4
    num_heads: int = 8
    num_points: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, refs, value_input, spatial_shapes: Sequence[tuple[int, int]]):
        b, nq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        hd = self.dim // heads
        value = dense(self.dim, name="value_proj", kernel_init=xavier, dtype=self.dtype)(value_input)
        offsets = dense(heads * levels * points * 2, name="sampling_offsets",
                        kernel_init=nn.initializers.zeros,
                        bias_init=sampling_offset_bias_init(heads, levels, points),
                        dtype=self.dtype)(query)
        offsets = offsets.reshape(b, nq, heads, levels, points, 2)
        weights = dense(heads * levels * points, name="attention_weights",
                        kernel_init=nn.initializers.zeros, dtype=self.dtype)(query)
        weights = jax.nn.softmax(weights.reshape(b, nq, heads, levels * points).astype(jnp.float32), -1)
        weights = weights.reshape(b, nq, heads, levels, points).astype(value.dtype)
        normaliser = np.array([[w, h] for h, w in spatial_shapes], np.float32)   # (x, y) order
        locations = refs[None, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = jnp.zeros((b * heads, nq, hd), value.dtype)
        start = 0
        for level, (h, w) in enumerate(spatial_shapes):
            v = value[:, start:start + h * w].reshape(b, h, w, heads, hd)
            v = v.transpose(0, 3, 1, 2, 4).reshape(b * heads, h, w, hd)
            grid = 2 * locations[:, :, :, level] - 1                           # (B, Q, heads, P, 2)
            grid = grid.transpose(0, 2, 1, 3, 4).reshape(b * heads, nq, points, 2)
            sampled = ops.grid_sample_bilinear_zeros(v, grid)                   # (B·heads, Q, P, hd)
            wl = weights[:, :, :, level].transpose(0, 2, 1, 3).reshape(b * heads, nq, points)
            out = out + jnp.einsum("bqpd,bqp->bqd", sampled, wl)
            start += h * w
        out = out.reshape(b, heads, nq, hd).transpose(0, 2, 1, 3).reshape(b, nq, self.dim)
        return dense(self.dim, name="output_proj", kernel_init=xavier, dtype=self.dtype)(out)


class DeformableEncoderLayer(nn.Module):
    """Post-norm: LN(src + MSDeformAttn(src + pos, src)); LN(src + FFN(src)) with ReLU."""
    dim: int
    ffn_dim: int
    num_levels: int
    num_heads: int
    num_points: int
    spatial_shapes: tuple
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, src, pos, refs):
        attn = MSDeformAttn(self.dim, self.num_levels, self.num_heads, self.num_points,
                            dtype=self.dtype, name="self_attn")(src + pos, refs, src, self.spatial_shapes)
        src = layer_norm(1e-5, name="norm1", dtype=self.dtype)(src + attn)
        h = nn.relu(dense(self.ffn_dim, name="linear1", kernel_init=xavier, dtype=self.dtype)(src))
        h = dense(self.dim, name="linear2", axes=("mlp", "embed"), kernel_init=xavier,
                  dtype=self.dtype)(h)
        return layer_norm(1e-5, name="norm2", dtype=self.dtype)(src + h)


class DeformableEncoder(nn.Module):
    """The `transformer` of the pixel decoder: level embeddings + encoder layers."""
    dim: int
    ffn_dim: int
    num_layers: int
    num_levels: int
    num_heads: int
    num_points: int
    spatial_shapes: tuple
    remat: bool = False
    scan: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, srcs: Sequence[jax.Array]):
        level_embed = self.param("level_embed", nn.initializers.normal(1.0),
                                 (self.num_levels, self.dim), jnp.float32)
        b = srcs[0].shape[0]
        flat, pos = [], []
        for level, x in enumerate(srcs):
            h, w = x.shape[1:3]
            flat.append(x.reshape(b, h * w, self.dim))
            pe = ops.sine_position_embedding_in_graph(h, w, self.dim // 2).reshape(1, h * w, self.dim)
            pos.append(pe + level_embed[level][None, None])   # level embedding enters the query only
        src = jnp.concatenate(flat, 1)
        pos = jnp.concatenate(pos, 1).astype(src.dtype)
        refs = jnp.asarray(reference_points(self.spatial_shapes))
        # Nest the layers under `encoder/layers_n`, as in the official state_dict.
        encoder = _EncoderStack(self.num_layers,
                                dict(dim=self.dim, ffn_dim=self.ffn_dim, num_levels=self.num_levels,
                                     num_heads=self.num_heads, num_points=self.num_points,
                                     spatial_shapes=self.spatial_shapes, dtype=self.dtype),
                                remat=self.remat, scan=self.scan, name="encoder")
        return encoder(src, pos, refs)


# Shallower encoders run unrolled: on the CPU the scanned 2-layer encoder of the CI-sized model
# made its train step 1.3x slower (the sampling's scatter-add inside the loop) for no compile
# gain, while scanning Swin-B's 6 layers takes its train step's compile from 131 s to 96 s
# (docs/benchmarks.md, "Compile time").
SCAN_MIN_LAYERS = 3


class _EncoderStack(nn.Module):
    """The encoder layers; with `scan`, one lax.scan over them (models/stacks.py)."""
    num_layers: int
    layer_kwargs: dict
    remat: bool = False
    scan: bool = True

    def setup(self):
        layer_cls = nn.remat(DeformableEncoderLayer) if self.remat else DeformableEncoderLayer
        self.layers = [layer_cls(**self.layer_kwargs) for _ in range(self.num_layers)]

    def __call__(self, src, pos, refs):
        if not self.scan or self.num_layers < SCAN_MIN_LAYERS or self.is_initializing():
            for layer in self.layers:
                src = layer(src, pos, refs)
            return src
        params = self.variables["params"]
        layer = DeformableEncoderLayer(**self.layer_kwargs, parent=None)   # applied per step

        def step(src, p, _):
            return layer.apply({"params": p}, src, pos, refs), None

        src, _ = scan_layers(step, src, [params[f"layers_{i}"] for i in range(self.num_layers)],
                             remat=self.remat)
        return src


class InputProjection(nn.Module):
    """1×1 conv to the decoder width + GroupNorm(32, eps 1e-5)."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.dim, name="proj", kernel_init=xavier, dtype=self.dtype)(x)
        return nn.GroupNorm(num_groups=32, epsilon=1e-5, use_fast_variance=False, name="norm",
                            dtype=self.dtype, param_dtype=jnp.float32)(x)


class PixelDecoder(nn.Module):
    """Features of the 4 stages (fine to coarse, NHWC) -> (mask_features, [coarse..mid] maps).

    All four scales go through the deformable encoder; with the finest stride equal to the
    common stride there are no FPN convolutions (magnet_architecture.md §5.1).
    """
    conv_dim: int = 256
    ffn_dim: int = 1024
    num_layers: int = 4
    num_heads: int = 8
    num_points: int = 4
    remat: bool = False
    scan: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]):
        levels = list(features[::-1])              # coarse (stride 32) first
        srcs = [InputProjection(self.conv_dim, dtype=self.dtype, name=f"input_proj_{k}")(x)
                for k, x in enumerate(levels)]
        shapes = tuple((x.shape[1], x.shape[2]) for x in srcs)
        memory = DeformableEncoder(self.conv_dim, self.ffn_dim, self.num_layers, len(srcs),
                                   self.num_heads, self.num_points, shapes, remat=self.remat,
                                   scan=self.scan, dtype=self.dtype, name="transformer")(srcs)
        b = memory.shape[0]
        outs, start = [], 0
        for h, w in shapes:
            outs.append(memory[:, start:start + h * w].reshape(b, h, w, self.conv_dim))
            start += h * w
        mask_features = dense(self.conv_dim, name="mask_features",
                              kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                              dtype=self.dtype)(outs[-1])
        return mask_features, outs[:-1]
