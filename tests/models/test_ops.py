"""magnet_jax.models.ops against PyTorch (magnet_architecture.md §11, parity risks 6, 7, 10, 11,
12, 14, 16 of §12) and against brute-force constructions of the Swin index/mask.

Tolerance: max|Δ| <= 1e-5 · max|ref| in float32.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from magnet_jax.models import ops
from tests.numerics import check


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _nchw(torch, x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------------------------
# bilinear resizes
# --------------------------------------------------------------------------------------------

ALIGN_CASES = [
    # (h_in, w_in, h_out, w_out)
    (15, 15, 120, 120),  # stage-4 pyramid upsample at 480
    (120, 120, 480, 480),  # final mask upsample at 480
    (112, 112, 448, 448),  # ... and at 448
    (2, 2, 7, 7),
    (6, 6, 15, 15),
    (3, 3, 14, 14),
    (1, 1, 120, 120),  # p = 1: constant broadcast
    (1, 1, 15, 15),
    (2, 5, 9, 4),  # non-square, mixed up/down
    (7, 3, 1, 1),  # n_out = 1: src = 0
]


@pytest.mark.parity
@pytest.mark.parametrize("hi,wi,ho,wo", ALIGN_CASES)
def test_resize_bilinear_align_corners_vs_torch(torch, hi, wi, ho, wo):
    import torch.nn.functional as F

    c = 1 if ho * wo > 100_000 else 3
    x = _rand((2, hi, wi, c), seed=hi * 31 + wi)
    ref = _nhwc(F.interpolate(_nchw(torch, x), size=(ho, wo), mode="bilinear", align_corners=True))
    got = jax.jit(ops.resize_bilinear_align_corners, static_argnums=1)(x, (ho, wo))
    check(f"align_corners {hi}x{wi}->{ho}x{wo}", got, ref)


def test_resize_bilinear_align_corners_p1_is_broadcast():
    x = _rand((2, 1, 1, 5))
    got = np.asarray(ops.resize_bilinear_align_corners(x, (15, 15)))
    np.testing.assert_array_equal(got, np.broadcast_to(x, (2, 15, 15, 5)))


def test_resize_bilinear_align_corners_keeps_corners():
    # align_corners=True maps the corner pixels of the input onto the output corners exactly.
    x = _rand((1, 15, 15, 2))
    got = np.asarray(ops.resize_bilinear_align_corners(x, (120, 120)))
    for (i, j), (a, b) in {
        (0, 0): (0, 0),
        (14, 14): (119, 119),
        (0, 14): (0, 119),
        (14, 0): (119, 0),
    }.items():
        np.testing.assert_allclose(got[0, a, b], x[0, i, j], rtol=0, atol=1e-6)


HALF_PIXEL_CASES = [
    (120, 15),
    (120, 30),
    (120, 60),  # decoder attention masks at 480
    (112, 14),
    (112, 28),
    (112, 56),  # ... at 448
]


@pytest.mark.parity
@pytest.mark.parametrize("n_in,n_out", HALF_PIXEL_CASES)
def test_resize_bilinear_half_pixel_vs_torch_and_jax(torch, n_in, n_out):
    import torch.nn.functional as F

    x = _rand((2, n_in, n_in, 2), seed=n_in + n_out)
    ref = _nhwc(
        F.interpolate(_nchw(torch, x), size=(n_out, n_out), mode="bilinear", align_corners=False)
    )
    got = jax.jit(ops.resize_bilinear_half_pixel, static_argnums=1)(x, (n_out, n_out))
    check(f"half_pixel {n_in}->{n_out} vs torch", got, ref)
    ref_jax = jax.image.resize(x, (2, n_out, n_out, 2), "bilinear", antialias=False)
    check(f"half_pixel {n_in}->{n_out} vs jax.image.resize(antialias=False)", got, ref_jax)


@pytest.mark.parity
@pytest.mark.parametrize("hi,wi,ho,wo", [(7, 5, 5, 3), (5, 6, 13, 11), (9, 9, 1, 1)])
def test_resize_bilinear_half_pixel_generic_vs_torch(torch, hi, wi, ho, wo):
    """Non-integer ratios and upsampling (source clamped at 0 like torch)."""
    import torch.nn.functional as F

    x = _rand((1, hi, wi, 3), seed=7)
    ref = _nhwc(F.interpolate(_nchw(torch, x), size=(ho, wo), mode="bilinear", align_corners=False))
    check(f"half_pixel {hi}x{wi}->{ho}x{wo}", ops.resize_bilinear_half_pixel(x, (ho, wo)), ref)


def test_resize_half_pixel_taps_of_spec():
    """§6.3 table: 120->15 averages source pixels 8j+3 and 8j+4, 120->30: 4j+1, 4j+2, 120->60:
    2j, 2j+1 (each with weight 1/2)."""
    for n_out, (a, b0, b1) in {15: (8, 3, 4), 30: (4, 1, 2), 60: (2, 0, 1)}.items():
        i0, i1, lam = ops._half_pixel_taps(120, n_out)
        j = np.arange(n_out)
        np.testing.assert_array_equal(i0, a * j + b0)
        np.testing.assert_array_equal(i1, a * j + b1)
        np.testing.assert_array_equal(lam, np.full(n_out, 0.5, np.float32))


# --------------------------------------------------------------------------------------------
# adaptive average pooling
# --------------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("n", [120, 60, 30, 15, 112, 56, 28, 14])
def test_adaptive_avg_pool2d_vs_torch(torch, n):
    x = _rand((2, n, n, 3), seed=n)
    xt = _nchw(torch, x)
    fn = jax.jit(ops.adaptive_avg_pool2d, static_argnums=1)
    for p in (1, 2, 3, 6):
        ref = _nhwc(torch.nn.AdaptiveAvgPool2d(p)(xt))
        check(f"adaptive_avg_pool2d n={n} p={p}", fn(x, p), ref)


@pytest.mark.parity
def test_adaptive_avg_pool2d_non_square_vs_torch(torch):
    x = _rand((1, 15, 28, 4), seed=3)
    for p in (1, 2, 3, 6):
        ref = _nhwc(torch.nn.AdaptiveAvgPool2d(p)(_nchw(torch, x)))
        check(f"adaptive_avg_pool2d 15x28 p={p}", ops.adaptive_avg_pool2d(x, p), ref)


def test_adaptive_pool_bins_of_spec():
    """The overlapping bins listed in §3.3."""
    table = {
        (15, 2): [(0, 8), (7, 15)],
        (15, 6): [(0, 3), (2, 5), (5, 8), (7, 10), (10, 13), (12, 15)],
        (112, 3): [(0, 38), (37, 75), (74, 112)],
        (112, 6): [(0, 19), (18, 38), (37, 56), (56, 75), (74, 94), (93, 112)],
        (56, 3): [(0, 19), (18, 38), (37, 56)],
        (56, 6): [(0, 10), (9, 19), (18, 28), (28, 38), (37, 47), (46, 56)],
        (28, 3): [(0, 10), (9, 19), (18, 28)],
        (28, 6): [(0, 5), (4, 10), (9, 14), (14, 19), (18, 24), (23, 28)],
        (14, 3): [(0, 5), (4, 10), (9, 14)],
        (14, 6): [(0, 3), (2, 5), (4, 7), (7, 10), (9, 12), (11, 14)],
    }
    for (n, p), bins in table.items():
        mat = ops.adaptive_pool_matrix(n, p)
        for i, (a, b) in enumerate(bins):
            expect = np.zeros(n, np.float32)
            expect[a:b] = 1.0 / (b - a)
            np.testing.assert_array_equal(mat[i], expect, err_msg=f"n={n} p={p} bin {i}")


# --------------------------------------------------------------------------------------------
# grid_sample
# --------------------------------------------------------------------------------------------


def _grid_cases(h, w, seed=0):
    rng = np.random.default_rng(seed)
    inside = rng.uniform(-1, 1, (2, 6, 7, 2))
    outside = rng.uniform(-1.6, 1.6, (2, 6, 7, 2))  # many samples partly outside
    far = rng.uniform(-5, 5, (2, 3, 4, 2))  # entirely outside / far away
    # exactly on [-1, 1], on pixel centres (g = (2i+1)/n - 1) and on pixel edges (g = 2i/n - 1)
    xs = np.array([-1.0, 1.0, 1 / w - 1, 1 - 1 / w, 0.0, 2 / w - 1, -1 - 1 / w, 1 + 1 / w])
    ys = np.array([-1.0, 1.0, 1 / h - 1, 1 - 1 / h, 0.0, 2 / h - 1, -1 - 1 / h, 1 + 1 / h])
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    on = np.broadcast_to(np.stack([gx, gy], -1)[None], (2, 8, 8, 2))
    return {"inside": inside, "outside": outside, "far": far, "on_edges": on}


@pytest.mark.parity
@pytest.mark.parametrize("h,w", [(5, 7), (6, 3), (1, 4), (15, 15)])
def test_grid_sample_bilinear_zeros_vs_torch(torch, h, w):
    import torch.nn.functional as F

    value = _rand((2, h, w, 3), seed=h * 10 + w)
    fn = jax.jit(ops.grid_sample_bilinear_zeros)
    for name, grid in _grid_cases(h, w, seed=h + w).items():
        grid = np.ascontiguousarray(grid, np.float32)
        ref = F.grid_sample(
            _nchw(torch, value),
            torch.from_numpy(grid),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        check(f"grid_sample {h}x{w} {name}", fn(value, grid), _nhwc(ref))


def test_grid_sample_far_outside_is_zero():
    value = _rand((1, 4, 5, 2)) + 10.0
    grid = np.array(
        [[[[-1.0 - 2 / 5 - 1e-3, 0.0], [0.0, 1.0 + 2 / 4 + 1e-3], [3.0, -3.0]]]], np.float32
    )
    np.testing.assert_array_equal(np.asarray(ops.grid_sample_bilinear_zeros(value, grid)), 0.0)


# --------------------------------------------------------------------------------------------
# instance norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_instance_norm_vs_torch(torch):
    x = _rand((2, 37, 24), seed=5) * 3.0 + 1.5  # (B, L, C)
    ref = (
        torch.nn.InstanceNorm1d(24)(torch.from_numpy(x.transpose(0, 2, 1)))
        .numpy()
        .transpose(0, 2, 1)
    )
    check("instance_norm over L (B,L,C)", ops.instance_norm(x, axis=1), ref)
    # over the last axis: (B, C, L) as torch lays it out
    xt = np.ascontiguousarray(x.transpose(0, 2, 1))
    ref2 = torch.nn.InstanceNorm1d(24)(torch.from_numpy(xt)).numpy()
    check("instance_norm over last axis (B,C,L)", ops.instance_norm(xt, axis=2), ref2)
    # variance comparable to eps = 1e-5 (eps inside the sqrt, biased variance, no affine)
    y = _rand((1, 20, 4), seed=9) * np.float32(3e-3)
    ref3 = (
        torch.nn.InstanceNorm1d(4)(torch.from_numpy(y.transpose(0, 2, 1)))
        .numpy()
        .transpose(0, 2, 1)
    )
    check("instance_norm var ~ eps", ops.instance_norm(y, axis=1), ref3)
    y64 = y.astype(np.float64)
    f64 = (y64 - y64.mean(1, keepdims=True)) / np.sqrt(y64.var(1, keepdims=True) + 1e-5)
    check("instance_norm var ~ eps vs float64 formula", ops.instance_norm(y, axis=1), f64)


# --------------------------------------------------------------------------------------------
# sine position embedding
# --------------------------------------------------------------------------------------------


def _detr_position_embedding_sine(torch, h, w, num_pos_feats=128, temperature=10000):
    """Independent float32 transcription of DETR's PositionEmbeddingSine(normalize=True,
    scale=2π) on an all-valid mask: returns (1, 2F, h, w)."""
    valid = torch.ones(1, h, w, dtype=torch.float32)
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    k = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_pos_feats)
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


@pytest.mark.parity
@pytest.mark.parametrize("h,w", [(15, 15), (30, 30), (60, 60), (14, 14), (5, 9)])
def test_sine_position_embedding_vs_detr(torch, h, w):
    ref = _detr_position_embedding_sine(torch, h, w).numpy()[0].transpose(1, 2, 0)
    got = ops.sine_position_embedding(h, w)
    assert got.shape == (h, w, 256) and got.dtype == np.float32
    check(f"sine_position_embedding {h}x{w}", got, ref)


@pytest.mark.parity
def test_sine_position_embedding_small_width_vs_detr(torch):
    ref = _detr_position_embedding_sine(torch, 4, 6, num_pos_feats=16).numpy()[0].transpose(1, 2, 0)
    check("sine_position_embedding F=16", ops.sine_position_embedding(4, 6, 16), ref)


def test_sine_position_embedding_golden_values():
    """A few entries from the §5.5 formula, in float64 (y first, sin/cos interleaved)."""
    h, w = 15, 20
    pe = ops.sine_position_embedding(h, w)
    for i, j, ch in [(0, 0, 0), (0, 0, 1), (3, 7, 10), (14, 19, 127), (2, 5, 128), (9, 1, 201)]:
        half, k = divmod(ch, 128)
        e = ((i + 1) / (h + 1e-6) if half == 0 else (j + 1) / (w + 1e-6)) * 2 * math.pi
        arg = e / 10000 ** (2 * (k // 2) / 128)
        val = math.sin(arg) if k % 2 == 0 else math.cos(arg)
        assert abs(pe[i, j, ch] - val) <= 2e-6, (i, j, ch, pe[i, j, ch], val)


# --------------------------------------------------------------------------------------------
# Swin relative position index and shift mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [2, 4, 7, 12])
def test_relative_position_index_brute_force(window):
    n = window * window
    ref = np.zeros((n, n), np.int64)
    for i in range(n):
        yi, xi = divmod(i, window)
        for j in range(n):
            yj, xj = divmod(j, window)
            ref[i, j] = (yi - yj + window - 1) * (2 * window - 1) + (xi - xj + window - 1)
    got = ops.relative_position_index(window)
    np.testing.assert_array_equal(got, ref)
    assert got.min() == 0 and got.max() == (2 * window - 1) ** 2 - 1


def _brute_force_shift_mask(hp, wp, window, shift):
    """Direct construction from §2.3: per-pixel region label on the padded grid, windows in
    row-major order, tokens row-major inside each window, -100 where labels differ."""

    def region(pos, size):
        return 0 if pos < size - window else (1 if pos < size - shift else 2)

    label = np.array([[3 * region(y, hp) + region(x, wp) for x in range(wp)] for y in range(hp)])
    nwh, nww = hp // window, wp // window
    mask = np.zeros((nwh * nww, window * window, window * window), np.float32)
    ty, tx = np.divmod(np.arange(window * window), window)
    for wh in range(nwh):
        for ww in range(nww):
            tok = label[wh * window + ty, ww * window + tx]  # (w²,) labels of the window's tokens
            mask[wh * nww + ww] = np.where(tok[:, None] == tok[None, :], 0.0, -100.0)
    return mask


@pytest.mark.parametrize(
    "hp,wp,window,shift",
    [
        (24, 24, 12, 6),
        (36, 36, 12, 6),
        (60, 60, 12, 6),
        (120, 120, 12, 6),  # stages at 480/448
        (24, 36, 12, 6),  # non-square
        (7, 7, 7, 3),  # small map (4x4) padded to one 7x7 window
        (8, 12, 4, 2),
    ],
)
def test_swin_shift_mask_brute_force(hp, wp, window, shift):
    got = ops.swin_shift_mask(hp, wp, window, shift)
    ref = _brute_force_shift_mask(hp, wp, window, shift)
    assert got.dtype == np.float32
    assert got.shape == ((hp // window) * (wp // window), window * window, window * window)
    np.testing.assert_array_equal(got, ref)
    assert set(np.unique(got)) <= {0.0, -100.0}


@pytest.mark.parametrize("hp,wp,window,shift", [(120, 120, 12, 6), (36, 36, 12, 6),
                                                 (7, 7, 7, 3), (8, 12, 4, 2)])
def test_swin_shift_mask_in_graph_equals_the_constant(hp, wp, window, shift):
    """The graph-computed mask (what the model uses) is the brute-force-tested constant."""
    got = jax.jit(lambda: ops.swin_shift_mask_in_graph(hp, wp, window, shift))()
    np.testing.assert_array_equal(np.asarray(got), ops.swin_shift_mask(hp, wp, window, shift))


@pytest.mark.parametrize("h,w,f", [(120, 120, 128), (15, 20, 128), (4, 6, 16)])
def test_sine_position_embedding_in_graph_is_bit_identical(h, w, f):
    got = jax.jit(lambda: ops.sine_position_embedding_in_graph(h, w, f))()
    np.testing.assert_array_equal(np.asarray(got), ops.sine_position_embedding(h, w, f))


def test_swin_shift_mask_single_window_regions():
    """4x4 map padded to a 7x7 window, shift 3: regions rows/cols [0,0) empty, [0,4), [4,7) —
    the shift is NOT disabled for maps no larger than the window."""
    m = ops.swin_shift_mask(7, 7, 7, 3)
    assert m.shape == (1, 49, 49)
    assert (m == -100).any()
    # token (0,0) and (3,3) share a region; (0,0) and (4,0) do not
    assert m[0, 0, 3 * 7 + 3] == 0 and m[0, 0, 4 * 7] == -100


def test_window_partition_roundtrip_and_order():
    x = np.arange(2 * 8 * 12 * 1, dtype=np.float32).reshape(2, 8, 12, 1)
    win = np.asarray(ops.window_partition(x, 4))
    assert win.shape == (2 * 2 * 3, 16, 1)
    # window index b·nW + wh·(Wp/w) + ww; token index row·w + col
    b, wh, ww, r, c = 1, 1, 2, 3, 1
    assert win[b * 6 + wh * 3 + ww, r * 4 + c, 0] == x[b, wh * 4 + r, ww * 4 + c, 0]
    np.testing.assert_array_equal(np.asarray(ops.window_reverse(win, 4, 8, 12)), x)
