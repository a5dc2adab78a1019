"""ViLT import (magnet_jax/weights/vilt.py): a ViltForMaskedLM (`vilt.`-prefixed keys, MLM head
ignored) and a bare ViltModel, saved with save_pretrained as safetensors, sharded safetensors
and pytorch_model.bin; every leaf equals its torch tensor and the forward pass matches
transformers; one-line errors for mismatched configs and missing paths."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from magnet_jax.weights import vilt as vilt_weights
from magnet_jax.weights.common import (TRANSFORMS, WeightConversionError,
                                       WeightFileNotFoundError, flatten_tree)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.models import test_vilt as parity  # noqa: E402  (its helpers; not re-collected)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    model = parity.random_hf_vilt(seed=1, cls=transformers.ViltForMaskedLM)
    path = tmp_path_factory.mktemp("hf_vilt_mlm")
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


@pytest.fixture(scope="module")
def kwargs(mlm_dir):
    with open(os.path.join(mlm_dir[1], "config.json")) as f:
        return vilt_weights.vilt_kwargs_from_hf_config(json.load(f))


def expected_leaves(vilt_model) -> dict[str, np.ndarray]:
    """The ViLT params every torch tensor of a ViltModel should become."""
    sd = {k: v.detach().numpy() for k, v in vilt_model.state_dict().items()}
    out = {}
    cfg = vilt_weights.vilt_kwargs_from_hf_config(vilt_model.config.to_dict())
    for rule in vilt_weights.vilt_rules(cfg):
        out[rule.dst[0]] = TRANSFORMS[rule.kind][0](sd[rule.src])
    out["embeddings/cls_token"] = sd["embeddings.cls_token"].reshape(-1)
    out["embeddings/position_embeddings"] = sd["embeddings.position_embeddings"][0]
    return out


def assert_params_equal(params, vilt_model):
    flat, want = flatten_tree(params), expected_leaves(vilt_model)
    assert set(flat) == set(want)
    for k, v in want.items():
        assert flat[k].dtype == np.float32, k
        np.testing.assert_array_equal(flat[k], v, err_msg=k)


def assert_forward_matches(params, kwargs, vilt_model, tag):
    ids, att = parity.text_batch(7)
    pixels = parity.pixel_batch((48, 40), 7)
    ref = parity.torch_vilt(vilt_model, ids, att, pixels)
    got = parity.run_vilt(kwargs, params, ids, att, pixels)
    parity.check(f"[vilt import {tag}] last_hidden_state", got["sequence"], ref["sequence"])
    parity.check(f"[vilt import {tag}] pooler_output", got["pooled"], ref["pooled"])


def test_masked_lm_checkpoint_imports(mlm_dir, kwargs):
    model, path = mlm_dir
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert all(k.startswith(("vilt.", "mlm_score.")) for k in keys)
    assert any(k.startswith("mlm_score.") for k in keys)
    params = vilt_weights.import_vilt(path, kwargs)
    assert sorted(params) == ["embeddings", "encoder", "layernorm", "pooler"]
    assert_params_equal(params, model.vilt)
    assert_forward_matches(params, kwargs, model.vilt, "ViltForMaskedLM")


def save_bin(model, path, shards: int = 1):
    """The pre-safetensors layout: pytorch_model.bin, or `shards` files and their index
    (transformers 5 saves safetensors only)."""
    model.config.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        return
    keys, weight_map = sorted(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin", "bin_sharded"])
def test_bare_vilt_model_imports(tmp_path, kwargs, layout):
    model = parity.random_hf_vilt(seed=2)
    if layout.startswith("bin"):
        save_bin(model, tmp_path, shards=3 if layout == "bin_sharded" else 1)
    else:
        model.save_pretrained(tmp_path, max_shard_size="100KB" if layout == "sharded" else "5GB")
        assert os.path.isfile(tmp_path / "model.safetensors.index.json") == (layout == "sharded")
    params = vilt_weights.import_vilt(tmp_path, kwargs)
    assert_params_equal(params, model)
    if layout == "safetensors":
        assert_forward_matches(params, kwargs, model, "ViltModel")


def test_mismatched_width_is_one_line_error(mlm_dir, kwargs):
    with pytest.raises(WeightConversionError) as e:
        vilt_weights.import_vilt(mlm_dir[1], dict(kwargs, width=32, heads=4))
    msg = str(e.value)
    assert "\n" not in msg
    assert "hidden_size 64" in msg and "model_kwargs.width 32" in msg


@pytest.mark.parametrize("field,value,hf_field", [("layers", 2, "num_hidden_layers"),
                                                  ("patch_size", 16, "patch_size"),
                                                  ("vocab_size", 90, "vocab_size"),
                                                  ("image_size", 64, "image_size")])
def test_other_mismatches_name_both_values(mlm_dir, kwargs, field, value, hf_field):
    with pytest.raises(ValueError, match=f"{hf_field} {kwargs[field]} does not match "
                                         f"model_kwargs.{field} {value}$"):
        vilt_weights.import_vilt(mlm_dir[1], dict(kwargs, **{field: value}))


def test_missing_paths(tmp_path, kwargs):
    missing = tmp_path / "nowhere"
    with pytest.raises(WeightFileNotFoundError, match=f"^no such ViLT checkpoint directory: "
                                                      f"{missing}$"):
        vilt_weights.import_vilt(missing, kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        vilt_weights.import_vilt(empty, kwargs)
    (empty / "config.json").write_text(json.dumps(parity.hf_vilt_config().to_dict()))
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        vilt_weights.import_vilt(empty, kwargs)


def test_missing_and_unexpected_keys_are_named(mlm_dir, kwargs):
    from safetensors.numpy import load_file
    sd = load_file(os.path.join(mlm_dir[1], "model.safetensors"))
    ckpt = vilt_weights.vilt_kwargs_from_hf_config(mlm_dir[0].config.to_dict())
    sd.pop("vilt.pooler.dense.weight")
    sd["vilt.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightConversionError,
                       match="missing keys: pooler.dense.weight; 1 unexpected keys: extra.weight"):
        vilt_weights.vilt_to_params(sd, ckpt, kwargs)


def test_hf_config_conversion_refuses_unsupported():
    cfg = parity.hf_vilt_config().to_dict()
    with pytest.raises(WeightConversionError, match="hidden_act 'relu'"):
        vilt_weights.vilt_kwargs_from_hf_config(dict(cfg, hidden_act="relu"))
    with pytest.raises(WeightConversionError, match="model_type is 'bert'"):
        vilt_weights.vilt_kwargs_from_hf_config(dict(cfg, model_type="bert"))
    assert vilt_weights.vilt_kwargs_from_hf_config(dict(cfg, image_size=[32, 32]))[
        "image_size"] == 32
