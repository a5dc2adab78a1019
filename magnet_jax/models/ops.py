"""Array ops with PyTorch semantics that JAX does not provide directly.

All image-like tensors are NHWC. Each function reproduces one PyTorch operation of the
official MagNet forward pass (magnet_architecture.md §11); tests compare them with
torch.nn.functional.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _align_corners_taps(n_in: int, n_out: int):
    """Static 2-tap indices and weights for bilinear align_corners=True along one axis."""
    if n_out == 1:
        src = np.zeros((1,), np.float32)
    else:
        src = np.arange(n_out, dtype=np.float32) * np.float32((n_in - 1) / (n_out - 1))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def _resize_axis(x: jax.Array, axis: int, i0, i1, lam) -> jax.Array:
    shape = [1] * x.ndim
    shape[axis] = -1
    lam = jnp.asarray(lam).reshape(shape).astype(x.dtype)
    a = jnp.take(x, jnp.asarray(i0), axis=axis)
    b = jnp.take(x, jnp.asarray(i1), axis=axis)
    return a * (1 - lam) + b * lam


def resize_bilinear_align_corners(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='bilinear', align_corners=True) on an NHWC array."""
    h_out, w_out = size
    _, h_in, w_in, _ = x.shape
    if (h_in, w_in) == (h_out, w_out):
        return x
    # torch interpolates width first then height inside one kernel; with 2-tap separable
    # weights the order only changes rounding. Height first matches torch's formula
    # (1-lh)*((1-lw)*a + lw*b) + lh*((1-lw)*c + lw*d): width inside, height outside.
    x = _resize_axis(x, 2, *_align_corners_taps(w_in, w_out))
    return _resize_axis(x, 1, *_align_corners_taps(h_in, h_out))


def _half_pixel_taps(n_in: int, n_out: int):
    """Static taps for bilinear align_corners=False without antialias (torch semantics)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0).astype(np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_bilinear_half_pixel(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode='bilinear', align_corners=False), no antialiasing, NHWC."""
    h_out, w_out = size
    _, h_in, w_in, _ = x.shape
    if (h_in, w_in) == (h_out, w_out):
        return x
    x = _resize_axis(x, 2, *_half_pixel_taps(w_in, w_out))
    return _resize_axis(x, 1, *_half_pixel_taps(h_in, h_out))


@functools.lru_cache(maxsize=None)
def adaptive_pool_matrix(n: int, p: int) -> np.ndarray:
    """(p, n) averaging matrix with torch AdaptiveAvgPool bins [floor(i n/p), ceil((i+1) n/p))."""
    mat = np.zeros((p, n), np.float32)
    for i in range(p):
        start = (i * n) // p
        end = -((-(i + 1) * n) // p)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def adaptive_avg_pool2d(x: jax.Array, p: int) -> jax.Array:
    """torch nn.AdaptiveAvgPool2d(p) on NHWC, overlapping bins included."""
    _, h, w, _ = x.shape
    if h % p == 0 and w % p == 0:
        b, _, _, c = x.shape
        return x.reshape(b, p, h // p, p, w // p, c).mean(axis=(2, 4))
    ph = jnp.asarray(adaptive_pool_matrix(h, p), x.dtype)
    pw = jnp.asarray(adaptive_pool_matrix(w, p), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw, precision=jax.lax.Precision.HIGHEST)


def area_downsample(mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W) mask -> (B, h, w) float32 area average with torch AdaptiveAvgPool2d bins
    (exact block means when the sizes divide; overlapping bins otherwise)."""
    y = mask.astype(jnp.float32)
    b, hi, wi = y.shape
    ho, wo = size
    if (hi, wi) == (ho, wo):
        return y
    if hi % ho == 0 and wi % wo == 0:
        return y.reshape(b, ho, hi // ho, wo, wi // wo).mean(axis=(2, 4))
    ph = jnp.asarray(adaptive_pool_matrix(hi, ho))
    pw = jnp.asarray(adaptive_pool_matrix(wi, wo))
    return jnp.einsum("ih,bhw,jw->bij", ph, y, pw, precision=jax.lax.Precision.HIGHEST)


def grid_sample_bilinear_zeros(value: jax.Array, grid: jax.Array) -> jax.Array:
    """torch F.grid_sample(value, grid, 'bilinear', 'zeros', align_corners=False).

    value: (B, H, W, C); grid: (B, ..., 2) with (x, y) in [-1, 1] (outside allowed).
    Returns (B, ..., C). Out-of-range corners contribute zero.
    """
    b, h, w, c = value.shape
    out_shape = grid.shape[1:-1]
    grid = grid.reshape(b, -1, 2)
    gx, gy = grid[..., 0], grid[..., 1]
    # Same op order as torch's unnormalisation: ((g + 1) * size - 1) / 2.
    ix = ((gx + 1) * w - 1) / 2
    iy = ((gy + 1) * h - 1) / 2
    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    x1 = x0 + 1
    y1 = y0 + 1
    flat = value.reshape(b, h * w, c)

    def corner(xc, yc, weight):
        valid = (xc >= 0) & (xc <= w - 1) & (yc >= 0) & (yc <= h - 1)
        xi = jnp.clip(xc, 0, w - 1).astype(jnp.int32)
        yi = jnp.clip(yc, 0, h - 1).astype(jnp.int32)
        idx = yi * w + xi
        vals = jnp.take_along_axis(flat, idx[..., None], axis=1)
        return vals * jnp.where(valid, weight, 0)[..., None].astype(value.dtype)

    out = (corner(x0, y0, (x1 - ix) * (y1 - iy))
           + corner(x1, y0, (ix - x0) * (y1 - iy))
           + corner(x0, y1, (x1 - ix) * (iy - y0))
           + corner(x1, y1, (ix - x0) * (iy - y0)))
    return out.reshape(b, *out_shape, c)


def instance_norm(x: jax.Array, axis: int, eps: float = 1e-5) -> jax.Array:
    """torch InstanceNorm1d without affine: per-instance stats over `axis`, biased variance."""
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps)


@functools.lru_cache(maxsize=None)
def sine_position_embedding(h: int, w: int, num_pos_feats: int = 128,
                            temperature: float = 10000.0) -> np.ndarray:
    """DETR PositionEmbeddingSine(normalize=True, scale=2*pi) as an (h, w, 2*num_pos_feats) constant.

    Channels [0, F) encode y and [F, 2F) encode x; sin on even, cos on odd channels.
    Computed in float32 like the reference.
    """
    scale = np.float32(2 * math.pi)
    eps = np.float32(1e-6)
    y_embed = np.broadcast_to(np.arange(1, h + 1, dtype=np.float32)[:, None], (h, w))
    x_embed = np.broadcast_to(np.arange(1, w + 1, dtype=np.float32)[None, :], (h, w))
    y_embed = y_embed / (np.float32(h) + eps) * scale
    x_embed = x_embed / (np.float32(w) + eps) * scale
    k = np.arange(num_pos_feats, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * np.floor(k / 2) / np.float32(num_pos_feats))
    dim_t = dim_t.astype(np.float32)
    pos_x = x_embed[..., None] / dim_t
    pos_y = y_embed[..., None] / dim_t
    pos_x = np.stack([np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])], axis=-1).reshape(h, w, -1)
    pos_y = np.stack([np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])], axis=-1).reshape(h, w, -1)
    return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)


def sine_position_embedding_in_graph(h: int, w: int, num_pos_feats: int = 128,
                                     temperature: float = 10000.0) -> jax.Array:
    """`sine_position_embedding`, bit for bit, broadcast by the graph from its (h, F) row and
    (w, F) column tables: a few kB of constants instead of an (h, w, 2F) one baked into the
    compiled and exported module (19 MB for the pixel decoder at 480²)."""
    pos_y = sine_position_embedding(h, 1, num_pos_feats, temperature)[:, 0, :num_pos_feats]
    pos_x = sine_position_embedding(1, w, num_pos_feats, temperature)[0, :, num_pos_feats:]
    pos_y = jnp.broadcast_to(jnp.asarray(pos_y)[:, None, :], (h, w, num_pos_feats))
    pos_x = jnp.broadcast_to(jnp.asarray(pos_x)[None, :, :], (h, w, num_pos_feats))
    return jnp.concatenate([pos_y, pos_x], axis=-1)


def swin_shift_mask_in_graph(hp: int, wp: int, window: int, shift: int) -> jax.Array:
    """`swin_shift_mask` computed by the graph from iota (no (nW, w², w²) constant)."""
    def regions(n):                         # 0, 1, 2 for the slices [0, n-w), [n-w, n-s), [n-s, n)
        i = jnp.arange(n)
        return (i >= n - window).astype(jnp.int32) + (i >= n - shift).astype(jnp.int32)

    labels = regions(hp)[:, None] * 3 + regions(wp)[None, :]
    win = window_partition(labels[None, :, :, None], window)[..., 0]          # (nW, w²)
    return jnp.where(win[:, None, :] != win[:, :, None], jnp.float32(-100.0), jnp.float32(0.0))


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
    """(window², window²) index into the (2w-1)² relative-position bias table."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]
    rel = rel.transpose(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).astype(np.int64)


def window_partition(x, window: int):
    """(B, Hp, Wp, C) -> (B * nW, window², C), windows in row-major order."""
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows, window: int, hp: int, wp: int):
    """Inverse of window_partition: (B * nW, window², C) -> (B, Hp, Wp, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, hp // window, wp // window, window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, hp, wp, c)


@functools.lru_cache(maxsize=None)
def swin_shift_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
    """(nW, window², window²) additive mask of shifted-window attention: 0 or -100.

    Regions are labelled on the padded grid exactly as the official code does, including
    maps no larger than the window (no "disable shift" rule).
    """
    labels = np.zeros((1, hp, wp, 1), np.float32)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            labels[:, slice(*hs), slice(*ws), :] = label
            label += 1
    win = np.asarray(window_partition(labels, window))[..., 0]  # (nW, w²)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0)).astype(np.float32)


def renormalise(image: jax.Array, mean, std) -> jax.Array:
    """ImageNet-normalised NHWC pixels (the data pipeline's) -> normalised with another
    (mean, std), exactly: back to [0, 1] first, in float32."""
    from magnet_jax.data.images import IMAGENET_MEAN, IMAGENET_STD
    raw = (image.astype(jnp.float32) * jnp.asarray(IMAGENET_STD, jnp.float32)
           + jnp.asarray(IMAGENET_MEAN, jnp.float32))
    return (raw - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
