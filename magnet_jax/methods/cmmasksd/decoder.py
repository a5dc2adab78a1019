"""CM-MaskSD's vision–language decoder, built on CRIS's (Wang et al., CVPR 2022;
CRIS.pytorch model/layers.py and model/segmenter.py). Written anew in Flax Linen, NHWC.

What is CRIS's:
- `SentenceFPN` is CRIS's `FPN` neck: the projected sentence gates the projected stride-32
  map; top-down fusion with the stride-16 and stride-8 maps (upsample / 2×2 average pool,
  concat, conv); the three levels aggregated at stride 16; a CoordConv block. Level widths
  (out_dim/2, out_dim, 2·out_dim) (CRIS: fpn_out = [256, 512, 1024] for vis_dim 512); the
  stride-16 level is the output.
- `VisionLanguageDecoder` is CRIS's `TransformerDecoder`: pre-norm layers of self-attention
  over the visual tokens (2D sine positions on queries and keys), cross-attention from the
  visual tokens to the words (1D sine positions on the word keys; padded words masked), a
  ReLU FFN with a LayerNorm inside; every sublayer's output normed again before its residual
  (self_attn_norm, cross_attn_norm); a final LayerNorm. torch.nn.MultiheadAttention math
  (dropout on the attention weights too) and initialisation.
- `DynamicKernelProjector` is CRIS's `Projector`: stride 16 -> 4 by two (×2 bilinear
  upsample, 3×3 conv) blocks and a 1×1 conv; the sentence gives one k×k kernel and bias per
  example (flattened in CRIS's (C, k, k) order), applied as a 'same' convolution.
- The sine encodings follow CRIS's pos1d / pos2d channel layouts.

What is ours:
- GroupNorm (the largest group count <= 32 dividing the channels) wherever CRIS has
  BatchNorm2d, and LayerNorm for the BatchNorm1d of the sentence projection: no batch
  statistics (project rule: they break under small per-device batches and in eval parity).
- Levels whose sizes are not exactly 2× apart are resized to the target level's size
  (`jax.image.resize`, bilinear) instead of CRIS's fixed scale-2 interpolate / pool.
- The projector's first block keeps the input width and the second narrows to `in_dim`; CRIS
  builds it with in_dim = vis_dim // 2 and an input of 2·in_dim channels, the same widths.
- The decoder layers run as one `lax.scan` at apply time (models/stacks.py).
- The dynamic convolution is a batched matmul plus k² shifted adds (see `dynamic_conv`).
- Positional encodings are computed in the graph from iota (no (H·W, D) constant).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.layers import dense, layer_norm, torch_default_kernel
from magnet_jax.models import stacks
from magnet_jax.models.conv_blocks import (NORM_EPS, ConvNormReLU, conv, group_norm,  # noqa: F401
                                          num_norm_groups, resize_to)

Dtype = Any

POSITION_TEMPERATURE = 10000.0


# --------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------

def _interleaved_sin_cos(positions: jax.Array, dim: int) -> jax.Array:
    """(N,) float32 positions -> (N, dim) [sin(p f_0), cos(p f_0), sin(p f_1), ...] with
    f_i = 10000^(-2i/dim), the transformer encoding (CRIS pos1d, and each half of pos2d)."""
    exponents = jax.lax.iota(jnp.float32, dim // 2) * 2.0
    freqs = jnp.exp(exponents * (-math.log(POSITION_TEMPERATURE) / dim))
    angles = positions[:, None] * freqs[None, :]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(positions.shape[0], dim)


def sine_position_1d(length: int, dim: int, dtype: Dtype = jnp.float32) -> jax.Array:
    """(length, dim) sine encoding of the word positions (CRIS TransformerDecoder.pos1d)."""
    if dim % 2:
        raise ValueError(f"sine_position_1d needs an even dim; got {dim}")
    positions = jax.lax.iota(jnp.float32, length)
    return _interleaved_sin_cos(positions, dim).astype(dtype)


def sine_position_2d(h: int, w: int, dim: int, dtype: Dtype = jnp.float32) -> jax.Array:
    """(h, w, dim) sine encoding of a grid (CRIS TransformerDecoder.pos2d): channels
    [0, dim/2) encode the column (x), [dim/2, dim) the row (y), each sin/cos interleaved."""
    if dim % 4:
        raise ValueError(f"sine_position_2d needs dim divisible by 4; got {dim}")
    half = dim // 2
    by_column = _interleaved_sin_cos(jax.lax.iota(jnp.float32, w), half)    # (w, half)
    by_row = _interleaved_sin_cos(jax.lax.iota(jnp.float32, h), half)       # (h, half)
    pos = jnp.concatenate([jnp.broadcast_to(by_column[None], (h, w, half)),
                           jnp.broadcast_to(by_row[:, None], (h, w, half))], axis=-1)
    return pos.astype(dtype)


def add_coordinates(x: jax.Array) -> jax.Array:
    """NHWC x -> x with two channels appended: x then y, each linspace(-1, 1) (CoordConv)."""
    b, h, w, _ = x.shape
    xs = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w, dtype=x.dtype)[None, :], (h, w))
    ys = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h, dtype=x.dtype)[:, None], (h, w))
    coords = jnp.broadcast_to(jnp.stack([xs, ys], axis=-1)[None], (b, h, w, 2))
    return jnp.concatenate([x, coords], axis=-1)


def dynamic_conv(features: jax.Array, kernels: jax.Array, biases: jax.Array) -> jax.Array:
    """Per-example k×k 'same' convolution to one channel (cross-correlation, as torch).

    features (B, H, W, C); kernels (B, C, k, k) in torch's conv-weight order, k odd;
    biases (B,). Returns (B, H, W) float32 — torch's
    F.conv2d(x.reshape(1, B·C, H, W), kernels, bias=biases, padding=k // 2, groups=B).

    Computed as Y = features · kernels (one batched matmul, C -> k² taps, reading the large
    feature map once, float32 accumulation), then out[h, w] = Σ_ij Y_ij[h + i − p, w + j − p]
    over the zero-padded (B, H, W, k²) taps. Zero-padding Y equals zero-padding the input
    because Y is linear in it. Unlike the grouped-conv form (batch moved into channels), the
    batch stays a batch axis: no transposes, and it shards with the data-parallel batch.
    """
    b, h, w, c = features.shape
    k = kernels.shape[-1]
    if kernels.shape != (b, c, k, k):
        raise ValueError(f"dynamic_conv: kernels must be {(b, c, k, k)}; got {kernels.shape}")
    if k % 2 == 0:
        raise ValueError(f"dynamic_conv: 'same' padding needs an odd kernel size; got {k}")
    if biases.shape != (b,):
        raise ValueError(f"dynamic_conv: biases must be ({b},); got {biases.shape}")
    taps = jnp.einsum("bhwc,bcij->bhwij", features, kernels.astype(features.dtype),
                      preferred_element_type=jnp.float32)
    p = k // 2
    taps = jnp.pad(taps, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)))
    out = jnp.broadcast_to(biases.astype(jnp.float32)[:, None, None], (b, h, w))
    for i in range(k):
        for j in range(k):
            out = out + taps[:, i:i + h, j:j + w, i, j]
    return out


def _check_batch(name: str, array: jax.Array, batch: int) -> None:
    if array.shape[0] != batch:
        raise ValueError(f"{name} has batch {array.shape[0]}, expected {batch}")


# --------------------------------------------------------------------------------------------
# Neck.
# --------------------------------------------------------------------------------------------

class SentenceFPN(nn.Module):
    """CRIS's sentence-gated FPN. feats = (v3, v4, v5) at strides 8, 16, 32, shaped
    (B, h, w, in_dims[i]); sentence (B, Ds). Returns (B, H16, W16, out_dim).

    Sub-module ↔ CRIS name: sentence_proj ↔ txt_proj, v5_proj ↔ f1_v_proj, gate_norm ↔
    norm_layer, v4_proj/fuse4 ↔ f2_v_proj/f2_cat, v3_proj/fuse3 ↔ f3_v_proj/f3_cat,
    level{5,4,3}_proj ↔ f4_proj{5,4,3}, aggregate ↔ aggr, coord_conv/out_conv ↔ coordconv.
    """
    in_dims: Sequence[int]
    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], sentence: jax.Array) -> jax.Array:
        if len(self.in_dims) != 3 or len(feats) != 3:
            raise ValueError(f"SentenceFPN takes 3 levels (strides 8, 16, 32); got "
                             f"{len(feats)} features for in_dims {tuple(self.in_dims)}")
        for level, (feat, dim) in zip((3, 4, 5), zip(feats, self.in_dims)):
            if feat.ndim != 4 or feat.shape[-1] != dim:
                raise ValueError(f"v{level} must be (B, H, W, {dim}); got {feat.shape}")
        if self.out_dim < 2:
            raise ValueError(f"SentenceFPN out_dim must be >= 2; got {self.out_dim}")
        v3, v4, v5 = feats
        batch = v5.shape[0]
        for name, array in (("v3", v3), ("v4", v4), ("sentence", sentence)):
            _check_batch(name, array, batch)
        if sentence.ndim != 2:
            raise ValueError(f"sentence must be (B, Ds); got {sentence.shape}")

        # CRIS's widths: stride 8 at half the output width, stride 32 at twice it.
        dim3, dim4, dim5 = self.out_dim // 2, self.out_dim, 2 * self.out_dim
        size4 = v4.shape[1:3]
        block = lambda features, k, name: ConvNormReLU(features, k, dtype=self.dtype, name=name)

        # Stride 32: the sentence gates the projected visual map channel-wise.
        gate = dense(dim5, name="sentence_proj", use_bias=False, kernel_init=torch_default_kernel,
                     dtype=self.dtype)(sentence)
        gate = nn.relu(layer_norm(NORM_EPS, name="sentence_norm", dtype=self.dtype)(gate))
        f5 = block(dim5, 1, "v5_proj")(v5) * gate[:, None, None, :]
        f5 = nn.relu(group_norm(dim5, name="gate_norm", dtype=self.dtype)(f5))
        # Stride 16: the upsampled gated map joins v4.
        f4 = block(dim4, 3, "v4_proj")(v4)
        f4 = block(dim4, 1, "fuse4")(jnp.concatenate([f4, resize_to(f5, size4)], axis=-1))
        # Stride 8, brought down to stride 16, joins the fused stride-16 map.
        f3 = resize_to(block(dim3, 3, "v3_proj")(v3), size4)
        f3 = block(dim4, 1, "fuse3")(jnp.concatenate([f3, f4], axis=-1))
        # Aggregate the three levels at stride 16.
        q5 = resize_to(block(dim4, 3, "level5_proj")(f5), size4)
        q4 = block(dim4, 3, "level4_proj")(f4)
        q3 = block(dim4, 3, "level3_proj")(f3)
        fused = block(dim4, 1, "aggregate")(jnp.concatenate([q3, q4, q5], axis=-1))
        # CoordConv: positions as two extra input channels, then one more 3×3 block.
        fused = block(dim4, 3, "coord_conv")(add_coordinates(fused))
        return block(dim4, 3, "out_conv")(fused)


# --------------------------------------------------------------------------------------------
# Transformer decoder.
# --------------------------------------------------------------------------------------------

def _stacked_in_proj_xavier(key, shape, dtype=jnp.float32):
    """torch MultiheadAttention's in-projection init: xavier_uniform over its stacked
    (3D, D) q/k/v matrix, bound sqrt(6 / 4D), for each of the three (D, D) kernels."""
    bound = math.sqrt(6.0 / (shape[0] + 3 * shape[1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class MultiHeadAttention(nn.Module):
    """torch.nn.MultiheadAttention math: q scaled by 1/sqrt(head_dim) before the matmul,
    heads on contiguous channel blocks, dropout on the attention weights; key_mask (B, K)
    True = may be attended. query (B, Q, D), key (B, K, D), value (B, K, D) -> (B, Q, D)."""
    dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key, value, key_mask=None, train: bool = False):
        head_dim = self.dim // self.num_heads

        def project(inputs, name):
            y = dense(self.dim, name=name, axes=("embed", "heads"),
                      kernel_init=_stacked_in_proj_xavier, dtype=self.dtype)(inputs)
            return y.reshape(*inputs.shape[:2], self.num_heads, head_dim)

        q = project(query, "query") * (head_dim ** -0.5)
        k = project(key, "key")
        v = project(value, "value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if key_mask is not None:
            # The float32 minimum rather than -inf: exp underflows to exactly 0 next to any
            # real key, and a row with no real key averages instead of returning NaN.
            logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1)
        weights = nn.Dropout(self.dropout)(weights, deterministic=not train).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*query.shape[:2], self.dim)
        return dense(self.dim, name="out", axes=("heads", "embed"),
                     kernel_init=torch_default_kernel, dtype=self.dtype)(out)


class VisionLanguageDecoderLayer(nn.Module):
    """One CRIS TransformerDecoderLayer on flattened visual tokens vis (B, N, D)."""
    d_model: int
    num_heads: int
    ffn_dim: int
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, vis, vis_pos, words, words_pos, word_mask, train: bool = False):
        d, rate = self.d_model, self.dropout
        norm = lambda name: layer_norm(NORM_EPS, name=name, dtype=self.dtype)
        drop = lambda x: nn.Dropout(rate)(x, deterministic=not train)
        attention = lambda name: MultiHeadAttention(d, self.num_heads, rate, dtype=self.dtype,
                                                    name=name)
        # Self-attention: positions on queries and keys, not on values.
        x = norm("norm1")(vis)
        x = attention("self_attn")(x + vis_pos, x + vis_pos, x, train=train)
        vis = vis + drop(norm("self_attn_norm")(x))
        # Cross-attention to the words (the words themselves are not normed, as in CRIS).
        x = norm("norm2")(vis)
        x = attention("cross_attn")(x + vis_pos, words + words_pos, words, word_mask,
                                    train=train)
        vis = vis + drop(norm("cross_attn_norm")(x))
        # FFN: Linear, ReLU, Dropout, LayerNorm(ffn_dim), Linear.
        x = norm("norm3")(vis)
        x = nn.relu(dense(self.ffn_dim, name="ffn_in", kernel_init=torch_default_kernel,
                          dtype=self.dtype)(x))
        x = norm("ffn_norm")(drop(x))
        x = dense(d, name="ffn_out", axes=("mlp", "embed"), kernel_init=torch_default_kernel,
                  dtype=self.dtype)(x)
        return vis + drop(x)


class VisionLanguageDecoder(nn.Module):
    """CRIS's TransformerDecoder. vis (B, H, W, d_model), words (B, L, d_model), word_mask
    (B, L) with 1 = real token, 0 = padding. Returns (B, H, W, d_model), after the final
    LayerNorm. Dropout (rng "dropout") only when train=True.

    Parameters: one subtree per layer (layers_0, layers_1, ...) and final_norm. With `scan`
    the layers run as one lax.scan over their stacked parameters, so they compile once.
    """
    num_layers: int = 3
    d_model: int = 512
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    scan_layers: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.d_model % 4:
            raise ValueError(f"d_model must be divisible by 4 (2D sine positions); got "
                             f"{self.d_model}")
        self.layers = [self._layer() for _ in range(self.num_layers)]
        self.final_norm = layer_norm(NORM_EPS, name="final_norm", dtype=self.dtype)

    def _layer(self, **kw) -> VisionLanguageDecoderLayer:
        return VisionLanguageDecoderLayer(self.d_model, self.num_heads, self.ffn_dim,
                                          self.dropout, dtype=self.dtype, **kw)

    def __call__(self, vis: jax.Array, words: jax.Array, word_mask: jax.Array,
                 train: bool = False) -> jax.Array:
        d = self.d_model
        if vis.ndim != 4 or vis.shape[-1] != d:
            raise ValueError(f"vis must be (B, H, W, {d}); got {vis.shape}")
        if words.ndim != 3 or words.shape[-1] != d:
            raise ValueError(f"words must be (B, L, {d}); got {words.shape}")
        b, h, w, _ = vis.shape
        _check_batch("words", words, b)
        if word_mask.shape != words.shape[:2]:
            raise ValueError(f"word_mask must be {words.shape[:2]}; got {word_mask.shape}")

        vis_pos = sine_position_2d(h, w, d, vis.dtype).reshape(1, h * w, d)
        words_pos = sine_position_1d(words.shape[1], d, words.dtype)[None]
        key_mask = word_mask.astype(bool)
        x = vis.reshape(b, h * w, d)

        unrolled = self.num_layers < stacks.MIN_SCAN_STEPS or self.is_initializing()
        if unrolled or not self.scan_layers:
            for layer in self.layers:
                x = layer(x, vis_pos, words, words_pos, key_mask, train)
        else:
            params = self.variables["params"]
            layer = self._layer(parent=None)   # unbound: applied to each layer's parameters
            use_dropout = train and self.dropout > 0
            keys = stacks.layer_keys(self.make_rng("dropout") if use_dropout else None,
                                     self.num_layers)

            def step(carry, layer_params, key):
                rngs = {} if key is None else {"dropout": key}
                return layer.apply({"params": layer_params}, carry, vis_pos, words, words_pos,
                                   key_mask, train, rngs=rngs), None

            x, _ = stacks.scan_layers(
                step, x, [params[f"layers_{i}"] for i in range(self.num_layers)], keys)
        return self.final_norm(x).reshape(b, h, w, d)


# --------------------------------------------------------------------------------------------
# Projector.
# --------------------------------------------------------------------------------------------

class DynamicKernelProjector(nn.Module):
    """CRIS's Projector. x (B, H, W, C) at stride 16, sentence (B, word_dim) -> (B, 4H, 4W)
    float32 mask logits at stride 4.

    Visual path: ×2 upsample, 3×3 block at C; ×2 upsample, 3×3 block to in_dim; 1×1 conv.
    Text path: one Linear to in_dim·k·k kernel weights (CRIS's (C, k, k) order) and 1 bias
    per example, applied by `dynamic_conv`. CRIS uses in_dim = d_model // 2.
    """
    in_dim: int
    word_dim: int
    kernel_size: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, sentence: jax.Array) -> jax.Array:
        k = self.kernel_size
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding; got {k}")
        if x.ndim != 4:
            raise ValueError(f"x must be (B, H, W, C); got {x.shape}")
        if sentence.shape != (x.shape[0], self.word_dim):
            raise ValueError(f"sentence must be ({x.shape[0]}, {self.word_dim}); got "
                             f"{sentence.shape}")
        b, h, w, c = x.shape
        x = ConvNormReLU(c, 3, dtype=self.dtype, name="up1")(resize_to(x, (2 * h, 2 * w)))
        x = ConvNormReLU(self.in_dim, 3, dtype=self.dtype,
                         name="up2")(resize_to(x, (4 * h, 4 * w)))
        features = conv(self.in_dim, 1, name="out_proj", use_bias=True, dtype=self.dtype)(x)

        kernel_and_bias = dense(self.in_dim * k * k + 1, name="kernel_generator",
                                kernel_init=torch_default_kernel, dtype=self.dtype)(sentence)
        kernels = kernel_and_bias[:, :-1].reshape(b, self.in_dim, k, k)
        return dynamic_conv(features, kernels, kernel_and_bias[:, -1])


__all__ = ["ConvNormReLU", "DynamicKernelProjector", "MultiHeadAttention", "SentenceFPN",
           "VisionLanguageDecoder", "VisionLanguageDecoderLayer", "add_coordinates",
           "dynamic_conv", "num_norm_groups", "resize_to", "sine_position_1d",
           "sine_position_2d"]
