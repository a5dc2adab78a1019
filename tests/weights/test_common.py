"""Layout transforms vs torch modules, key accounting, tree checks, file readers."""

from __future__ import annotations


import numpy as np
import pytest

from magnet_jax.weights import common

torch = pytest.importorskip("torch")


def _np(t):
    return t.detach().numpy()


# --- (a) layout transforms: outputs of the torch layer == outputs of the Linen-layout kernel


def test_linear_to_dense_matches_nn_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 7)
    x = torch.randn(3, 5)
    k = common.linear_to_dense(_np(layer.weight))
    assert k.shape == (5, 7)
    np.testing.assert_allclose(_np(x) @ k + _np(layer.bias), _np(layer(x)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(common.dense_to_linear(k), _np(layer.weight))


def test_conv1d_to_dense_matches_nn_conv1d():
    torch.manual_seed(0)
    layer = torch.nn.Conv1d(6, 4, kernel_size=1)
    x = torch.randn(2, 6, 9)                                   # (B, C, L)
    k = common.conv1d_to_dense(_np(layer.weight))
    assert k.shape == (6, 4)
    ref = _np(layer(x)).transpose(0, 2, 1)                     # (B, L, C_out)
    np.testing.assert_allclose(_np(x).transpose(0, 2, 1) @ k + _np(layer.bias), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(common.dense_to_conv1d(k), _np(layer.weight))


def test_conv1x1_to_dense_matches_nn_conv2d():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 5, kernel_size=1)
    x = torch.randn(2, 6, 4, 3)
    k = common.conv1x1_to_dense(_np(layer.weight))
    ref = _np(layer(x)).transpose(0, 2, 3, 1)                  # NHWC
    np.testing.assert_allclose(_np(x).transpose(0, 2, 3, 1) @ k + _np(layer.bias), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(common.dense_to_conv1x1(k), _np(layer.weight))


def test_conv_kxk_to_hwio_matches_patch_embed_conv():
    import jax
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    x = torch.randn(2, 3, 12, 8)
    k = common.conv_kxk_to_hwio(_np(layer.weight))
    assert k.shape == (4, 4, 3, 8)
    out = jax.lax.conv_general_dilated(
        _np(x).transpose(0, 2, 3, 1), k, window_strides=(4, 4), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    ref = _np(layer(x)).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out) + _np(layer.bias), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(common.hwio_to_conv_kxk(k), _np(layer.weight))


def test_transform_rejects_wrong_rank():
    with pytest.raises(common.WeightConversionError, match="Conv1d"):
        common.conv1d_to_dense(np.zeros((3, 3)))
    with pytest.raises(common.WeightConversionError, match="1x1"):
        common.conv1x1_to_dense(np.zeros((3, 3, 3, 3)))


# --- (c) relative position index


def _direct_relative_position_index(w):
    idx = np.zeros((w * w, w * w), np.int64)
    for i in range(w * w):
        for j in range(w * w):
            yi, xi = i // w, i % w
            yj, xj = j // w, j % w
            idx[i, j] = (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)
    return idx


@pytest.mark.parametrize("window", [2, 3, 7, 12])
def test_relative_position_index_formula(window):
    got = common.relative_position_index(window)
    assert got.dtype == np.int64 and got.shape == (window**2, window**2)
    np.testing.assert_array_equal(got, _direct_relative_position_index(window))
    assert got.max() == (2 * window - 1) ** 2 - 1 and got.min() == 0
