"""Swin Transformer trunk pieces as the official MagNet segmentation backbone uses them.

Feature maps are NHWC throughout. Implements magnet_architecture.md §2: patch embedding,
window attention with relative position bias, (shifted) blocks with the official −100 mask
on the padded grid (also for maps smaller than the window) and patch merging.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import ops
from magnet_jax.models.layers import DropPath, dense, gelu, layer_norm, normal_002

Dtype = Any


class PatchEmbed(nn.Module):
    """Conv k=stride=patch, then LayerNorm: (B, H, W, 3) -> (B, H/p, W/p, C)."""
    embed_dim: int
    patch_size: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image: jax.Array) -> jax.Array:
        p = self.patch_size
        _, h, w, _ = image.shape
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:
            image = jnp.pad(image, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj",
                    dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                        (None, None, None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(image)
        return layer_norm(1e-5, name="norm", dtype=self.dtype)(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias.

    Input (B·nW, w², C); `mask` (nW, w², w²) is added for shifted windows.
    """
    dim: int
    num_heads: int
    window_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        w = self.window_size
        n = w * w
        heads = self.num_heads
        head_dim = self.dim // heads
        table = self.param(
            "relative_position_bias_table",
            nn.with_logical_partitioning(normal_002, (None, "heads")),
            ((2 * w - 1) ** 2, heads), jnp.float32)
        qkv = dense(3 * self.dim, name="qkv", dtype=self.dtype)(x)
        qkv = qkv.reshape(x.shape[0], n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                      # (B·nW, heads, n, hd)
        q = q * (head_dim ** -0.5)                            # scale before the matmul
        attn = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        index = ops.relative_position_index(w).reshape(-1)
        bias = table[index].reshape(n, n, heads).transpose(2, 0, 1)
        attn = attn + bias[None].astype(attn.dtype)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.reshape(-1, num_windows, heads, n, n) + jnp.asarray(mask)[None, :, None]
            attn = attn.reshape(-1, heads, n, n)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bqhd", attn, v).reshape(x.shape[0], n, self.dim)
        return dense(self.dim, name="proj", dtype=self.dtype)(out)


class SwinBlock(nn.Module):
    """Pre-norm Swin block on an NHWC map (magnet_architecture.md §2.3).

    Padding to a window multiple happens after norm1 and padded tokens are not masked out
    of attention, as in the official segmentation backbone.
    """
    dim: int
    num_heads: int
    window_size: int
    shift_size: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 drop_path_rate: jax.Array | None = None) -> jax.Array:
        """drop_path_rate: overrides `drop_path` (a traced rate inside a scanned stage)."""
        b, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        y = layer_norm(1e-5, name="norm1", dtype=self.dtype)(x)
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        if hp != h or wp != w:
            y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
        mask = None
        if shift > 0:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
            mask = ops.swin_shift_mask_in_graph(hp, wp, ws, shift)
        windows = ops.window_partition(y, ws)
        windows = WindowAttention(c, self.num_heads, ws, dtype=self.dtype, name="attn")(windows, mask)
        y = ops.window_reverse(windows, ws, hp, wp)
        if shift > 0:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        y = y[:, :h, :w, :]
        drop = DropPath(self.drop_path)
        x = shortcut + drop(y, deterministic, drop_path_rate)
        z = layer_norm(1e-5, name="norm2", dtype=self.dtype)(x)
        z = Mlp(int(c * self.mlp_ratio), c, dtype=self.dtype, name="mlp")(z)
        return x + drop(z, deterministic, drop_path_rate)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""
    hidden: int
    out: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(dense(self.hidden, name="fc1", dtype=self.dtype)(x))
        return dense(self.out, name="fc2", axes=("mlp", "embed"), dtype=self.dtype)(x)


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat (order (0,0), (1,0), (0,1), (1,1)), LayerNorm, Dense 4C→2C."""
    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        x = layer_norm(1e-5, name="norm", dtype=self.dtype)(x)
        return dense(2 * self.dim, name="reduction", use_bias=False, dtype=self.dtype)(x)
