"""Layout transforms vs torch modules, key accounting, tree checks, file readers."""

from __future__ import annotations

import argparse
import fractions
import os

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


def test_window_from_bias_table():
    assert common.window_from_bias_table(529) == 12
    assert common.window_from_bias_table(169) == 7
    with pytest.raises(common.WeightConversionError, match="500 rows"):
        common.window_from_bias_table(500)


# --- trees and accounting


def test_assign_and_flatten():
    tree = {}
    common.assign(tree, "a/b/kernel", np.ones(2))
    common.assign(tree, "a/c", np.zeros(1))
    assert set(common.flatten_tree(tree)) == {"a/b/kernel", "a/c"}
    with pytest.raises(common.WeightConversionError, match="a/c assigned twice"):
        common.assign(tree, "a/c", np.zeros(1))
    with pytest.raises(common.WeightConversionError, match="a/c already holds an array"):
        common.assign(tree, "a/c/x", np.zeros(1))


def test_key_accounting_names_every_problem():
    sd = {"a.weight": np.zeros((2, 3)), "b.weight": np.zeros(4), "dead.x": np.zeros(1), "odd.y": np.zeros(1)}
    acc = common.KeyAccounting(sd, what="test ckpt")
    assert acc.take("a.weight", (2, 3)) is not None
    assert acc.take("b.weight", (5,)) is None
    assert acc.take("c.weight", (1,)) is None
    acc.ignore("dead.x")
    with pytest.raises(common.WeightConversionError) as e:
        acc.finish()
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing keys: c.weight" in msg
    assert "unexpected keys: odd.y" in msg
    assert "b.weight (got (4,), expected (5,))" in msg
    assert "dead.x" not in msg and "a.weight" not in msg


def test_key_accounting_truncates_long_lists():
    acc = common.KeyAccounting({f"k{i}": np.zeros(1) for i in range(40)})
    with pytest.raises(common.WeightConversionError, match=r"40 unexpected keys: .*and 28 more"):
        acc.finish()


def test_check_against_abstract_names_paths():
    import jax
    abstract = {"params": {"a": {"kernel": jax.ShapeDtypeStruct((2, 3), np.float32)},
                           "b": jax.ShapeDtypeStruct((4,), np.float32),
                           "c": jax.ShapeDtypeStruct((1,), np.float32)}}
    ok = {"a": {"kernel": np.zeros((2, 3))}, "b": np.zeros(4), "c": np.zeros(1)}
    common.check_against_abstract(ok, abstract)
    bad = {"a": {"kernel": np.zeros((3, 2))}, "b": np.zeros(4), "d": np.zeros(1)}
    with pytest.raises(common.WeightConversionError) as e:
        common.check_against_abstract(bad, abstract)
    msg = str(e.value)
    assert "missing leaves: c" in msg
    assert "does not have: d" in msg
    assert "a/kernel (got (3, 2), model expects (2, 3))" in msg


def test_equal_split_ends():
    assert common.equal_split_ends(12) == (3, 6, 9, 12)
    assert common.equal_split_ends(6) == (2, 3, 5, 6)
    assert common.equal_split_ends(4) == (1, 2, 3, 4)
    assert common.equal_split_ends(24) == (6, 12, 18, 24)
    with pytest.raises(common.WeightConversionError):
        common.equal_split_ends(3)


# --- file readers


def test_load_torch_state_dict_unwraps_and_strips(tmp_path):
    sd = {"module.x.weight": torch.ones(2, 3), "module.y": torch.arange(4)}
    path = tmp_path / "wrapped.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4, swin_type="base"), "epoch": 3}, path)
    out = common.load_torch_state_dict(str(path))          # Namespace is allow-listed
    assert set(out) == {"x.weight", "y"}
    assert isinstance(out["x.weight"], np.ndarray) and out["x.weight"].shape == (2, 3)
    path2 = tmp_path / "sd.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path2)
    assert set(common.load_torch_state_dict(str(path2))) == {"a"}


def test_load_torch_state_dict_untrusted_pickle_needs_flag(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "meta": fractions.Fraction(1, 3)}, path)
    with pytest.raises(common.WeightFileError, match=r"other\.pth pickles objects other than tensors.*trusted"):
        common.load_torch_state_dict(str(path))
    assert set(common.load_torch_state_dict(str(path), trusted=True)) == {"a"}


def test_load_torch_state_dict_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.pth"):
        common.load_torch_state_dict(str(tmp_path / "missing.pth"))
    good = tmp_path / "good.pth"
    torch.save({"a": torch.randn(1000)}, good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(common.WeightFileError) as e:
        common.load_torch_state_dict(str(trunc), trusted=True)
    assert "trunc.pth" in str(e.value) and "corrupt" in str(e.value) and "\n" not in str(e.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(common.WeightFileError, match="garbage.pth is not a PyTorch checkpoint"):
        common.load_torch_state_dict(str(garbage), trusted=True)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(common.WeightFileError, match="empty.pth is empty"):
        common.load_torch_state_dict(str(empty))


def test_load_safetensors(tmp_path):
    from safetensors.numpy import save_file
    path = tmp_path / "w.safetensors"
    save_file({"module.a": np.ones((2, 2), np.float32)}, str(path))
    assert set(common.load_safetensors(str(path))) == {"a"}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:20])
    with pytest.raises(common.WeightFileError, match="bad.safetensors.*corrupt"):
        common.load_safetensors(str(bad))
    assert os.path.exists(path)
