"""Convolution blocks shared by the methods' decoders (NHWC, torch-initialised, GroupNorm
instead of BatchNorm: no batch statistics, project rule)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.layers import torch_default_kernel

Dtype = Any

NORM_EPS = 1e-5            # torch BatchNorm / GroupNorm / LayerNorm default
MAX_NORM_GROUPS = 32


def num_norm_groups(channels: int, max_groups: int = MAX_NORM_GROUPS) -> int:
    """The largest divisor of `channels` that is <= max_groups (GroupNorm's group count)."""
    if channels < 1:
        raise ValueError(f"GroupNorm needs at least one channel; got {channels}")
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def resize_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC x -> spatial `size`. Exact halving is CRIS's 2×2 average pool; anything else is
    bilinear (`jax.image.resize`: half-pixel centres, so an exact ×2 upsample equals CRIS's
    F.interpolate(scale_factor=2, mode='bilinear'); downsampling is antialiased)."""
    b, h, w, c = x.shape
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if (h, w) == (2 * th, 2 * tw):
        return x.reshape(b, th, 2, tw, 2, c).mean(axis=(2, 4))
    return jax.image.resize(x, (b, th, tw, c), method="bilinear")


def conv(features: int, kernel_size: int, *, name: str, use_bias: bool, dtype: Dtype) -> nn.Conv:
    """torch-initialised Conv2d with CRIS's padding (k // 2), kernel sharded on its output."""
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                   use_bias=use_bias, name=name, dtype=dtype, param_dtype=jnp.float32,
                   kernel_init=nn.with_logical_partitioning(torch_default_kernel,
                                                            (None, None, None, "embed")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


def group_norm(channels: int, *, name: str, dtype: Dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_norm_groups(channels), epsilon=NORM_EPS,
                        use_fast_variance=False, name=name, dtype=dtype,
                        param_dtype=jnp.float32)


class ConvNormReLU(nn.Module):
    """CRIS's conv_layer: bias-free k×k conv, norm (GroupNorm here, BatchNorm in CRIS), ReLU."""
    features: int
    kernel_size: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv(self.features, self.kernel_size, name="conv", use_bias=False,
                  dtype=self.dtype)(x)
        return nn.relu(group_norm(self.features, name="norm", dtype=self.dtype)(x))
