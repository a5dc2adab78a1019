"""MaIL's multi-scale mask decoder (training_objectives.md §7.1, step 4; a reconstruction).

ViLT is single-scale (one token per patch, stride P = the patch size). The patch tokens after
three encoder layers (4, 8 and 12 of ViLT-B) become three maps; the deepest is taken at
stride P, the next at P/2 and the shallowest at P/4 (each never finer than stride 4), like a
simple feature pyramid. They are fused top-down (resize the running map to the next level,
add its lateral projection, 3×3 conv), then doubled with a 3×3 conv until stride 4, where a
3×3 conv block and a 1×1 conv give one mask logit per pixel.

    level i (deepest first): LayerNorm -> bilinear resize to stride max(P / 2^i, 4) -> 1×1 conv
    x = lateral_0; x = conv(resize(x, level i) + lateral_i) for i = 1, 2
    while stride > 4: x = conv(2× bilinear upsample of x)
    logits = 1×1 conv(conv(x))                     (B, S/4, S/4)

GroupNorm + ReLU after every 3×3 conv (no batch statistics).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.conv_blocks import ConvNormReLU, conv, resize_to
from magnet_jax.models.layers import layer_norm, torch_default_kernel

Dtype = Any
MASK_STRIDE = 4


def level_strides(patch_size: int, num_levels: int) -> tuple[int, ...]:
    """The strides of the pyramid levels, deepest first: P, P/2, P/4, ..., at least 4."""
    if patch_size < MASK_STRIDE or patch_size & (patch_size - 1):
        raise ValueError(f"MaIL's decoder needs a power-of-two patch size >= {MASK_STRIDE}, "
                         f"got {patch_size}")
    return tuple(max(patch_size >> i, MASK_STRIDE) for i in range(num_levels))


class MultiScaleDecoder(nn.Module):
    """(B, g, g, D) patch maps of several encoder layers (shallow to deep) -> (B, S/4, S/4)."""
    patch_size: int
    dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array]) -> jax.Array:
        b, g = maps[0].shape[0], maps[0].shape[1]
        size = g * self.patch_size
        deep_first = list(maps)[::-1]
        strides = level_strides(self.patch_size, len(deep_first))
        laterals = []
        for i, (m, stride) in enumerate(zip(deep_first, strides)):
            m = layer_norm(1e-6, name=f"level{i}_norm", dtype=self.dtype)(m)
            m = resize_to(m, (size // stride, size // stride))
            laterals.append(conv(self.dim, 1, name=f"level{i}_lateral", use_bias=True,
                                 dtype=self.dtype)(m))
        x = laterals[0]
        for i, lateral in enumerate(laterals[1:], start=1):
            x = resize_to(x, lateral.shape[1:3]) + lateral
            x = ConvNormReLU(self.dim, 3, dtype=self.dtype, name=f"fuse{i}")(x)
        stride, step = strides[-1], 0
        while stride > MASK_STRIDE:
            stride //= 2
            x = resize_to(x, (size // stride, size // stride))
            x = ConvNormReLU(self.dim, 3, dtype=self.dtype, name=f"up{step}")(x)
            step += 1
        x = ConvNormReLU(self.dim, 3, dtype=self.dtype, name="head")(x)
        # One output channel: replicated (an fsdp-sharded output axis of size 1 cannot split).
        logits = nn.Conv(1, (1, 1), name="mask_logits", dtype=self.dtype,
                         param_dtype=jnp.float32, kernel_init=torch_default_kernel)(x)
        return logits[..., 0].astype(jnp.float32).reshape(b, size // MASK_STRIDE,
                                                           size // MASK_STRIDE)
