"""The training-only parts of MagNet: official-layout extra modules and intermediate outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.models import abstract_params, build_model, random_params
from magnet_jax.models.magnet import MagNet
from magnet_jax.models.presets import official_model_config, tiny_model_config


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_training_heads_build_the_official_modules_that_inference_skips():
    cfg = official_model_config(480)
    cfg.training_heads = True
    params = abstract_params(build_model(cfg), 480)
    # Official 296,984,954 minus the never-used stage norms, last image gate and language norms.
    assert _count(params) == 296_984_954 - 3_840 - 2_097_152 - 6_144
    assert _count(params["language_model"]["pwams_3"]) == 3_936_768
    assert _count(params["lang_proj"]) == 196_864


@pytest.fixture(scope="module")
def tiny_training_model():
    cfg = tiny_model_config(64)
    cfg.training_heads = True
    model = build_model(cfg)
    params = random_params(model, 64, seed=5)
    # Non-zero language gates, so the language fusions change the features.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "res_gates" in jax.tree_util.keystr(p) else x, params)
    return model, params


def test_intermediates_and_masked_text_path(tiny_training_model):
    model, params = tiny_training_model
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    ids = jnp.asarray([[101, 2000, 2001, 102] + [0] * 16, [101] + [2002] * 18 + [102]], jnp.int32)
    att = (ids > 0).astype(jnp.int32)

    def run(p, image, ids, att):
        out = model.apply({"params": p}, image, ids, att, return_intermediates=True)
        inter = out["intermediates"]
        again = model.apply({"params": p}, ids, att, inter["visual_stages"],
                            method=MagNet.encode_text)
        masked = model.apply({"params": p}, ids.at[:, 1].set(103), att, inter["visual_stages"],
                             method=MagNet.encode_text)
        projected = model.apply({"params": p}, inter["text_final"], method=MagNet.project_text)
        batched = model.apply({"params": p}, image, ids, att, return_intermediates=True,
                              masked_ids=ids.at[:, 1].set(103))
        return out, again, masked, projected, batched

    out, again, masked, projected, batched = jax.jit(run)(params, image, ids, att)
    inter = out["intermediates"]
    assert [v.shape[1] for v in inter["visual_stages"]] == [16, 8, 4, 2]
    assert inter["mask_features"].shape == (2, 16, 16, 64)
    assert inter["text_final"].shape == (2, 20, 64) and projected.shape == (2, 20, 64)
    np.testing.assert_allclose(projected, inter["text_projected"], rtol=1e-6, atol=1e-6)
    # The text path alone, given the same visual maps, reproduces the final language features,
    # and masking a token changes them.
    np.testing.assert_allclose(again, inter["text_final"], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(masked - inter["text_final"]).max()) > 1e-3
    # The masked sentence batched into the same pass (the train step's way) gives the same
    # features, and leaves the unmasked pass unchanged.
    np.testing.assert_allclose(batched["intermediates"]["masked_text_final"], masked,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched["pred_masks"], out["pred_masks"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched["intermediates"]["text_final"], inter["text_final"],
                               rtol=1e-5, atol=1e-6)


def test_project_text_needs_the_training_heads():
    model = build_model(tiny_model_config(64))
    params = abstract_params(model, 64)
    with pytest.raises(ValueError, match="training_heads"):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 20, 64)),
                                             method=MagNet.project_text), params)
