"""CM-MaskSD's CRIS-style decoder: shapes at the 416² sizes (traced only), a small real
apply, the sine encodings' layout, padded words ignored, dropout only in training, scanned
and unrolled layers equal, the dynamic convolution against torch's grouped conv2d, and the
shape errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.methods.cmmasksd.decoder import (DynamicKernelProjector, SentenceFPN,
                                                 VisionLanguageDecoder, dynamic_conv,
                                                 num_norm_groups, sine_position_1d,
                                                 sine_position_2d)

B, D, HEADS, FFN, LAYERS, GRID, L = 2, 32, 2, 64, 3, 8, 5
IN_DIMS, SENT_DIM, PROJ_DIM = (16, 24, 40), 24, 16
WORD_MASK = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
KEY = jax.random.PRNGKey(0)


def tiny_decoder(**kw) -> VisionLanguageDecoder:
    return VisionLanguageDecoder(num_layers=LAYERS, d_model=D, num_heads=HEADS, ffn_dim=FFN,
                                 **kw)


def decoder_inputs(seed: int = 0):
    rs = np.random.RandomState(seed)
    vis = jnp.asarray(rs.randn(B, GRID, GRID, D), jnp.float32)
    words = jnp.asarray(rs.randn(B, L, D), jnp.float32)
    return vis, words, jnp.asarray(WORD_MASK)


_CACHE: dict = {}


def decoder_params():
    if "params" not in _CACHE:
        _CACHE["params"] = nn.meta.unbox(
            jax.jit(tiny_decoder().init)(KEY, *decoder_inputs()))["params"]
    return _CACHE["params"]


def run_decoder(vis, words, mask, *, train=False, rng=KEY, scan=True):
    """One jitted apply per (train, scan); the dropout rng is always passed, so that
    train=False is checked to ignore it."""
    if (train, scan) not in _CACHE:
        model = tiny_decoder(scan_layers=scan)
        _CACHE[train, scan] = jax.jit(lambda p, v, w, m, key: model.apply(
            {"params": p}, v, w, m, train, rngs={"dropout": key}))
    return np.asarray(_CACHE[train, scan](decoder_params(), vis, words, mask, rng))


def test_sine_positions_follow_cris_layout():
    h, w, dim = 3, 5, 8
    pos2d = np.asarray(sine_position_2d(h, w, dim))
    half = dim // 2
    expected = np.zeros((h, w, dim))
    for y in range(h):
        for x in range(w):
            for i in range(0, half, 2):
                angle = 10000.0 ** (-i / half)
                expected[y, x, i:i + 2] = np.sin(x * angle), np.cos(x * angle)
                expected[y, x, half + i:half + i + 2] = np.sin(y * angle), np.cos(y * angle)
    np.testing.assert_allclose(pos2d, expected, atol=1e-6)

    length, dim = 4, 6
    pos1d = np.asarray(sine_position_1d(length, dim))
    expected = np.zeros((length, dim))
    for p in range(length):
        for i in range(0, dim, 2):
            expected[p, i:i + 2] = (np.sin(p * 10000.0 ** (-i / dim)),
                                    np.cos(p * 10000.0 ** (-i / dim)))
    np.testing.assert_allclose(pos1d, expected, atol=1e-6)
    assert sine_position_2d(2, 2, 8, jnp.bfloat16).dtype == jnp.bfloat16


def test_num_norm_groups():
    assert [num_norm_groups(c) for c in (1, 2, 24, 32, 48, 64, 770)] == [1, 2, 24, 32, 24, 32, 22]


def test_shapes_at_416_input():
    """CRIS sizes at a 416² input: strides 8/16/32 = 52/26/13, 17 words. Traced, not run."""
    b, words_len, d, sent = 2, 17, 256, 512
    fpn = SentenceFPN(in_dims=(768, 768, 768), out_dim=d)
    feats = tuple(jax.ShapeDtypeStruct((b, s, s, 768), jnp.float32) for s in (52, 26, 13))
    sentence = jax.ShapeDtypeStruct((b, sent), jnp.float32)
    fpn_out = jax.eval_shape(lambda f, s: fpn.apply(fpn.init(KEY, f, s), f, s), feats, sentence)
    assert fpn_out.shape == (b, 26, 26, d)

    decoder = VisionLanguageDecoder(num_layers=3, d_model=d, num_heads=8, ffn_dim=2048)
    vis = jax.ShapeDtypeStruct((b, 26, 26, d), jnp.float32)
    words = jax.ShapeDtypeStruct((b, words_len, d), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, words_len), jnp.int32)
    variables = jax.eval_shape(decoder.init, KEY, vis, words, mask)
    assert set(variables["params"]) == {"layers_0", "layers_1", "layers_2", "final_norm"}
    out = jax.eval_shape(lambda v, *x: decoder.apply(v, *x, train=True, rngs={"dropout": KEY}),
                         variables, vis, words, mask)
    assert out.shape == (b, 26, 26, d)

    projector = DynamicKernelProjector(in_dim=d // 2, word_dim=sent)
    variables = jax.eval_shape(projector.init, KEY, vis, sentence)
    logits = jax.eval_shape(projector.apply, variables, vis, sentence)
    assert logits.shape == (b, 104, 104) and logits.dtype == jnp.float32


def test_fpn_levels_not_exactly_twice_apart():
    """A 400² input: strides 8/16/32 of 50/25/13 (25 is not 2·13). Traced, not run."""
    fpn = SentenceFPN(in_dims=IN_DIMS, out_dim=D)
    feats = tuple(jax.ShapeDtypeStruct((B, s, s, c), jnp.float32)
                  for s, c in zip((50, 25, 13), IN_DIMS))
    sentence = jax.ShapeDtypeStruct((B, SENT_DIM), jnp.float32)
    out = jax.eval_shape(lambda f, s: fpn.apply(fpn.init(KEY, f, s), f, s), feats, sentence)
    assert out.shape == (B, 25, 25, D)


def test_small_pipeline_runs_and_is_finite():
    """FPN -> decoder -> projector at small sizes, for real; the projector's output equals
    torch's grouped conv2d applied to its own features and sentence-made kernels."""
    torch = pytest.importorskip("torch")
    rs = np.random.RandomState(1)
    feats = tuple(jnp.asarray(rs.randn(B, s, s, c), jnp.float32)
                  for s, c in zip((2 * GRID, GRID, GRID // 2), IN_DIMS))
    sentence = jnp.asarray(rs.randn(B, SENT_DIM), jnp.float32)
    _, words, mask = decoder_inputs()
    fpn = SentenceFPN(in_dims=IN_DIMS, out_dim=D)
    projector = DynamicKernelProjector(in_dim=PROJ_DIM, word_dim=SENT_DIM)

    @jax.jit
    def pipeline(decoder_params, feats, sentence, words, mask):
        fpn_params = fpn.init(KEY, feats, sentence)
        fused = fpn.apply(fpn_params, feats, sentence)
        decoded = tiny_decoder().apply({"params": decoder_params}, fused, words, mask)
        proj_params = projector.init(KEY, decoded, sentence)
        logits, captured = projector.apply(
            proj_params, decoded, sentence, capture_intermediates=True,
            mutable=["intermediates"])
        inter = captured["intermediates"]
        return (fused, decoded, logits, inter["out_proj"]["__call__"][0],
                inter["kernel_generator"]["__call__"][0])

    fused, decoded, logits, features, kernel_and_bias = jax.device_get(
        pipeline(decoder_params(), feats, sentence, words, mask))
    assert fused.shape == (B, GRID, GRID, D)
    assert decoded.shape == (B, GRID, GRID, D)
    assert logits.shape == (B, 4 * GRID, 4 * GRID) and logits.dtype == np.float32
    for name, array in (("fused", fused), ("decoded", decoded), ("logits", logits)):
        assert np.isfinite(array).all(), name
    assert np.std(logits) > 0

    # CRIS's Projector step: batch into channels, one group per example.
    k = 3
    x = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))
    x = x.reshape(1, B * PROJ_DIM, 4 * GRID, 4 * GRID)
    weight = torch.from_numpy(np.ascontiguousarray(kernel_and_bias[:, :-1]))
    weight = weight.reshape(B, PROJ_DIM, k, k)
    bias = torch.from_numpy(np.ascontiguousarray(kernel_and_bias[:, -1]))
    expected = torch.nn.functional.conv2d(x, weight, bias, padding=k // 2, groups=B)[0]
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_dynamic_conv_matches_torch_grouped_conv():
    """Non-square, 5×5 kernels, no module: the function alone against torch."""
    torch = pytest.importorskip("torch")
    rs = np.random.RandomState(2)
    b, h, w, c, k = 3, 7, 10, 6, 5
    features = rs.randn(b, h, w, c).astype(np.float32)
    kernels = rs.randn(b, c, k, k).astype(np.float32)
    biases = rs.randn(b).astype(np.float32)
    out = np.asarray(dynamic_conv(jnp.asarray(features), jnp.asarray(kernels),
                                  jnp.asarray(biases)))
    x = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))
    expected = torch.nn.functional.conv2d(x.reshape(1, b * c, h, w), torch.from_numpy(kernels),
                                          torch.from_numpy(biases), padding=k // 2, groups=b)[0]
    assert out.shape == (b, h, w)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_padded_words_have_no_effect():
    vis, words, mask = decoder_inputs()
    base = run_decoder(vis, words, mask)
    assert base.shape == (B, GRID, GRID, D) and np.isfinite(base).all()
    rs = np.random.RandomState(3)
    padded = words.at[0, 3:].set(jnp.asarray(rs.randn(2, D) * 10, jnp.float32))
    np.testing.assert_allclose(run_decoder(vis, padded, mask), base, rtol=0, atol=1e-6)
    real = words.at[0, 1].set(jnp.asarray(rs.randn(D), jnp.float32))
    changed = run_decoder(vis, real, mask)
    assert np.abs(changed[0] - base[0]).max() > 1e-3
    # Example 1 has no padding and was not touched.
    np.testing.assert_allclose(changed[1], base[1], rtol=0, atol=1e-6)


def test_dropout_only_in_training():
    inputs = decoder_inputs()
    key_a, key_b = jax.random.split(jax.random.PRNGKey(7))
    eval_a = run_decoder(*inputs, rng=key_a)
    np.testing.assert_array_equal(run_decoder(*inputs, rng=key_b), eval_a)
    train_a = run_decoder(*inputs, train=True, rng=key_a)
    train_b = run_decoder(*inputs, train=True, rng=key_b)
    assert np.isfinite(train_a).all()
    np.testing.assert_array_equal(run_decoder(*inputs, train=True, rng=key_a), train_a)
    assert np.abs(train_a - train_b).max() > 1e-3
    assert np.abs(train_a - eval_a).max() > 1e-3


def test_scanned_and_unrolled_layers_agree():
    inputs = decoder_inputs()
    scanned = run_decoder(*inputs, scan=True)
    unrolled = run_decoder(*inputs, scan=False)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)
    # The layers are distinct and all used: swapping two of them changes the output.
    params = dict(decoder_params())
    params["layers_0"], params["layers_2"] = params["layers_2"], params["layers_0"]
    swapped = _CACHE[False, True](params, *inputs, KEY)
    assert np.abs(np.asarray(swapped) - scanned).max() > 1e-3


def test_shape_errors():
    vis, words, mask = decoder_inputs()
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        jax.eval_shape(VisionLanguageDecoder(d_model=D, num_heads=3, ffn_dim=FFN).init,
                       KEY, vis, words, mask)
    with pytest.raises(ValueError, match="words has batch 1, expected 2"):
        jax.eval_shape(tiny_decoder().init, KEY, vis, words[:1], mask[:1])
    with pytest.raises(ValueError, match="word_mask must be"):
        jax.eval_shape(tiny_decoder().init, KEY, vis, words, mask[:, :3])
    with pytest.raises(ValueError, match="odd"):
        jax.eval_shape(DynamicKernelProjector(in_dim=8, word_dim=4, kernel_size=4).init, KEY,
                       vis, jnp.zeros((B, 4)))
    with pytest.raises(ValueError, match="sentence must be"):
        jax.eval_shape(DynamicKernelProjector(in_dim=8, word_dim=4).init, KEY, vis,
                       jnp.zeros((B + 1, 4)))
    feats = tuple(jnp.zeros((B, s, s, c)) for s, c in zip((8, 4, 2), IN_DIMS))
    with pytest.raises(ValueError, match=r"v4 must be \(B, H, W, 99\)"):
        jax.eval_shape(SentenceFPN(in_dims=(16, 99, 40), out_dim=D).init, KEY, feats,
                       jnp.zeros((B, SENT_DIM)))
    with pytest.raises(ValueError, match="sentence has batch 3, expected 2"):
        jax.eval_shape(SentenceFPN(in_dims=IN_DIMS, out_dim=D).init, KEY, feats,
                       jnp.zeros((3, SENT_DIM)))
