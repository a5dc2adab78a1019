"""Converted-weights directories: round trip, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from magnet_jax import checkpoint_io
from magnet_jax.weights import common


def _tree():
    rng = np.random.default_rng(0)
    return {"image_model": {"patch_embed": {"proj": {"kernel": rng.standard_normal((4, 4, 3, 8)).astype(np.float32),
                                                     "bias": np.arange(8, dtype=np.float32)}}},
            "predictor": {"query_feat": rng.standard_normal((1, 8)).astype(np.float32)}}


def _cfg():
    import ml_collections
    return ml_collections.ConfigDict(dict(name="magnet", image_size=32,
                                          swin=dict(depths=(2, 2), num_heads=(1, 2), mlp_ratio=4.0)))


def _abstract(tree, sharding=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _assert_equal(a, b):
    fa, fb = common.flatten_tree(a), common.flatten_tree(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_round_trip_numpy(tmp_path):
    d = tmp_path / "ckpt"
    out = checkpoint_io.save_params(str(d), _tree(), _cfg(), extra={"kind": "test"})
    assert out == str(d) and sorted(os.listdir(d)) == ["COMPLETE", "config.json", "params"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]
    cfg, params = checkpoint_io.load_params(str(d))
    assert cfg.swin.depths == (2, 2) and cfg.image_size == 32        # tuples come back as tuples
    assert isinstance(params["predictor"]["query_feat"], np.ndarray)
    _assert_equal(params, _tree())
    record = json.loads((d / "config.json").read_text())
    assert record["source"] == {"kind": "test"} and record["model"]["name"] == "magnet"


def test_round_trip_onto_a_mesh(tmp_path):
    from jax.sharding import NamedSharding, PartitionSpec as P
    d = tmp_path / "ckpt"
    tree = {"params": jax.tree.map(jax.numpy.asarray, _tree())}     # jax arrays + wrapper accepted
    checkpoint_io.save_params(str(d), tree, _cfg())
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P())
    _, params = checkpoint_io.load_params(str(d), abstract={"params": _abstract(_tree(), sharding)})
    leaf = params["image_model"]["patch_embed"]["proj"]["kernel"]
    assert isinstance(leaf, jax.Array) and leaf.sharding == sharding
    _assert_equal(params, _tree())


def test_abstract_mismatch_names_the_path(tmp_path):
    d = tmp_path / "ckpt"
    checkpoint_io.save_params(str(d), _tree(), _cfg())
    wrong = _abstract(_tree())
    wrong["predictor"]["query_feat"] = jax.ShapeDtypeStruct((2, 8), np.float32)
    wrong["predictor"]["level_embed"] = jax.ShapeDtypeStruct((3, 8), np.float32)
    with pytest.raises(checkpoint_io.CheckpointError) as e:
        checkpoint_io.load_params(str(d), abstract=wrong)
    msg = str(e.value)
    assert "predictor/query_feat (got (1, 8), model expects (2, 8))" in msg
    assert "missing leaves: predictor/level_embed" in msg


def test_refuses_to_overwrite(tmp_path):
    d = tmp_path / "ckpt"
    checkpoint_io.save_params(str(d), _tree(), _cfg())
    with pytest.raises(checkpoint_io.CheckpointError, match="exists and is not empty.*overwrite"):
        checkpoint_io.save_params(str(d), _tree(), _cfg())
    new = _tree()
    new["predictor"]["query_feat"] = np.zeros((1, 8), np.float32)
    checkpoint_io.save_params(str(d), new, _cfg(), overwrite=True)
    _assert_equal(checkpoint_io.load_params(str(d))[1], new)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    checkpoint_io.save_params(str(empty), _tree(), _cfg())       # an empty dir is fine


def test_missing_empty_and_partial_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no converted checkpoint at .*nowhere"):
        checkpoint_io.load_params(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint_io.CheckpointError, match="empty.* is empty"):
        checkpoint_io.load_params(str(tmp_path / "empty"))
    d = tmp_path / "ckpt"
    checkpoint_io.save_params(str(d), _tree(), _cfg())
    os.remove(d / "COMPLETE")
    with pytest.raises(checkpoint_io.CheckpointError, match="partial checkpoint"):
        checkpoint_io.load_params(str(d))
    # a killed save leaves only DIR.tmp-<pid>, never DIR
    partial = tmp_path / "killed.tmp-123"
    shutil.copytree(d, partial)
    with pytest.raises(FileNotFoundError):
        checkpoint_io.load_params(str(tmp_path / "killed"))


def test_other_model_and_bad_config(tmp_path):
    d = tmp_path / "ckpt"
    cfg = _cfg()
    cfg.name = "mail"
    checkpoint_io.save_params(str(d), _tree(), cfg)
    with pytest.raises(checkpoint_io.CheckpointError, match="weights of model 'mail', expected 'magnet'"):
        checkpoint_io.load_params(str(d))
    assert checkpoint_io.load_params(str(d), expect_model="mail")[0].name == "mail"
    (d / "config.json").write_text("{not json")
    with pytest.raises(checkpoint_io.CheckpointError, match="config.json is not valid JSON"):
        checkpoint_io.load_params(str(d), expect_model=None)


def test_boxed_params_are_saved_unboxed(tmp_path):
    import flax.linen as nn
    import jax.numpy as jnp

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "mlp"))
            return nn.Dense(3, kernel_init=init, name="fc")(x)

    variables = Tiny().init(jax.random.key(0), jnp.zeros((1, 2)))
    assert isinstance(variables["params"]["fc"]["kernel"], nn.LogicallyPartitioned)
    d = tmp_path / "boxed"
    checkpoint_io.save_params(str(d), variables, _cfg())
    _, params = checkpoint_io.load_params(str(d), abstract=jax.eval_shape(
        lambda k: Tiny().init(k, jnp.zeros((1, 2))), jax.random.key(0)))
    np.testing.assert_array_equal(params["fc"]["kernel"], np.asarray(nn.unbox(variables)["params"]["fc"]["kernel"]))
