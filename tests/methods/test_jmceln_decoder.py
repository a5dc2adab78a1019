"""JMCELN ContextualEmbeddingDecoder: shapes and parameter names per PAN form, the PAN
relations between stages (filter, gate, none), padded words ignored, mask pooling (the first
stage pools the plain mean), gradients and the unknown-form error."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.methods.jmceln.decoder import (PAN_FORMS, ContextualEmbeddingDecoder,
                                               mask_pooled_context)

B, C, HEADS, FFN, NE, STAGES = 2, 32, 4, 64, 4, 3
N, DT, HW = 5, 24, 16
LEVELS = (2, 4, 8)
ATT = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
GATE_INIT = -2.0


def tiny_decoder(pan: str = "filter", **kw) -> ContextualEmbeddingDecoder:
    return ContextualEmbeddingDecoder(hidden_dim=C, num_heads=HEADS, ffn_dim=FFN,
                                      num_stages=STAGES, num_embeddings=NE, pan=pan, **kw)


def tiny_inputs(seed: int = 0):
    rs = np.random.RandomState(seed)
    memories = [jnp.asarray(rs.randn(B, s, s, C), jnp.float32) for s in LEVELS]
    mask_features = jnp.asarray(rs.randn(B, HW, HW, C), jnp.float32)
    words = jnp.asarray(rs.randn(B, N, DT), jnp.float32)
    return memories, mask_features, words, jnp.asarray(ATT)


_CACHE: dict = {}


def init_params(pan: str):
    """Parameters for one PAN form. Compiles are most of this file's time, so there is one
    jitted init, of "gate" (which has every parameter); the other forms share its parameters
    less pan_gates (test_shapes_and_parameter_names checks each form's own tree)."""
    if "params" not in _CACHE:
        model = tiny_decoder("gate", gate_init=GATE_INIT)
        _CACHE["params"] = nn.meta.unbox(
            jax.jit(model.init)(jax.random.PRNGKey(0), *tiny_inputs()))["params"]
    params = _CACHE["params"]
    return params if pan == "gate" else {k: v for k, v in params.items() if k != "pan_gates"}


def compiled(pan: str):
    """(params, jitted apply) for one PAN form; one compile per form across the tests."""
    if pan not in _CACHE:
        model = tiny_decoder(pan)
        apply = jax.jit(lambda p, *inputs: model.apply({"params": p}, *inputs))
        _CACHE[pan] = init_params(pan), apply
    return _CACHE[pan]


def run(pan: str, params=None, inputs=None):
    default_params, apply = compiled(pan)
    return apply(default_params if params is None else params,
                 *(tiny_inputs() if inputs is None else inputs))


@pytest.mark.parametrize("pan", PAN_FORMS)
def test_shapes_and_parameter_names(pan):
    model = tiny_decoder(pan, gate_init=GATE_INIT)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), *tiny_inputs()))
    params = shapes["params"]
    expected = {"context_embedding", "context_pos", "level_embed", "word_proj", "embed_norm",
                "mask_embed"}
    expected |= {f"{name}_{k}" for name in ("cross_attn", "self_attn", "ffn")
                 for k in range(STAGES)}
    expected |= {"pan_gates"} if pan == "gate" else set()
    assert set(params) == expected
    assert jax.tree.structure(params) == jax.tree.structure(compiled(pan)[0])
    assert params["context_embedding"].shape == (NE, C)
    assert params["context_pos"].shape == (NE, C)
    assert params["level_embed"].shape == (len(LEVELS), C)
    assert params["word_proj"]["kernel"].shape == (DT, C)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    if pan == "gate":
        assert params["pan_gates"].shape == (STAGES,)
        np.testing.assert_array_equal(init_params("gate")["pan_gates"],
                                      np.full(STAGES, GATE_INIT, np.float32))

    outputs = run(pan)
    assert len(outputs) == STAGES
    for out in outputs:
        assert set(out) == {"pred_masks", "raw_masks"}
        for key in ("pred_masks", "raw_masks"):
            assert out[key].shape == (B, 1, HW, HW) and out[key].dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(out[key])))


@pytest.mark.parametrize("pan", PAN_FORMS)
def test_first_stage_is_raw_and_none_leaves_every_stage_raw(pan):
    outputs = run(pan)
    np.testing.assert_array_equal(outputs[0]["pred_masks"], outputs[0]["raw_masks"])
    for out in outputs[1:]:
        if pan == "none":
            np.testing.assert_array_equal(out["pred_masks"], out["raw_masks"])
        else:
            # PAN does change the later stages.
            assert float(jnp.max(jnp.abs(out["pred_masks"] - out["raw_masks"]))) > 1e-3


def test_filter_multiplies_the_stage_probabilities():
    outputs = run("filter")
    for k in range(1, STAGES):
        prob = jax.nn.sigmoid(outputs[k]["pred_masks"])
        expected = (jax.nn.sigmoid(outputs[k]["raw_masks"])
                    * jax.nn.sigmoid(outputs[k - 1]["pred_masks"]))
        np.testing.assert_allclose(prob, expected, atol=1e-5, rtol=0)


def test_gate_interpolates_with_the_learned_gates():
    params, _ = compiled("gate")
    gates = jnp.asarray([0.7, -1.3, 2.1], jnp.float32)
    outputs = run("gate", params={**params, "pan_gates": gates})
    for k in range(1, STAGES):
        raw, prev = outputs[k]["raw_masks"], outputs[k - 1]["pred_masks"]
        expected = raw + jax.nn.sigmoid(gates[k]) * (prev - raw)
        np.testing.assert_allclose(outputs[k]["pred_masks"], expected, atol=1e-5, rtol=1e-5)
    # The gate is used: other gates give other final masks.
    default = run("gate")
    assert float(jnp.max(jnp.abs(default[-1]["pred_masks"] - outputs[-1]["pred_masks"]))) > 1e-3


@pytest.mark.parametrize("pan", PAN_FORMS)
def test_padded_words_are_ignored(pan):
    memories, mask_features, words, att = tiny_inputs()
    base = run(pan, inputs=(memories, mask_features, words, att))
    noise = jnp.asarray(np.random.RandomState(1).randn(B, N, DT) * 5.0, jnp.float32)
    padded = jnp.where(att[..., None] == 0, noise, words)
    assert not np.allclose(padded, words)
    changed = run(pan, inputs=(memories, mask_features, padded, att))
    for a, b in zip(base, changed):
        for key in ("pred_masks", "raw_masks"):
            np.testing.assert_array_equal(a[key], b[key])
    # A real word does matter (in the first example, whose last two words are padding).
    real = words.at[0, 1].set(noise[0, 1])
    moved = run(pan, inputs=(memories, mask_features, real, att))
    assert float(jnp.max(jnp.abs(moved[-1]["pred_masks"][0] - base[-1]["pred_masks"][0]))) > 1e-4
    np.testing.assert_array_equal(moved[-1]["pred_masks"][1], base[-1]["pred_masks"][1])


def test_mask_pooled_context():
    rs = np.random.RandomState(2)
    features = jnp.asarray(rs.randn(B, HW, HW, C), jnp.float32)
    # Zero logits (M_0): the plain mean.
    np.testing.assert_allclose(mask_pooled_context(jnp.zeros((B, HW, HW)), features),
                               jnp.mean(features, axis=(1, 2)), atol=1e-5, rtol=1e-5)
    # A confident mask: the mean over the region.
    region = np.zeros((B, HW, HW), bool)
    region[0, :4, :8] = True
    region[1, 5:, 3:] = True
    logits = jnp.where(jnp.asarray(region), 30.0, -30.0)
    expected = np.stack([np.asarray(features)[i][region[i]].mean(0) for i in range(B)])
    np.testing.assert_allclose(mask_pooled_context(logits, features), expected, atol=1e-5,
                               rtol=1e-5)
    # A confidently empty mask stays finite (the guarded denominator).
    empty = mask_pooled_context(jnp.full((B, HW, HW), -200.0), features)
    assert bool(jnp.all(jnp.isfinite(empty)))


def test_first_stage_pools_the_plain_mean():
    """M_0 is uniform, so the first stage's kernel depends on mask_features only through
    their plain spatial mean: features with the same mean get the same kernel."""
    memories, mask_features, words, att = tiny_inputs()
    raw = np.asarray(run("filter")[0]["raw_masks"][:, 0], np.float64)
    f = np.asarray(mask_features, np.float64).reshape(B, HW * HW, C)
    # raw_0 = F · kernel: recover each example's (C,) kernel by least squares.
    kernels = [np.linalg.lstsq(f[i], raw[i].reshape(-1), rcond=None)[0] for i in range(B)]
    noise = np.random.RandomState(3).randn(B, HW, HW, C)
    same_mean = noise - noise.mean(axis=(1, 2), keepdims=True)
    other = mask_features + jnp.asarray(same_mean, jnp.float32)
    out = np.asarray(run("filter", inputs=(memories, other, words, att))[0]["raw_masks"][:, 0])
    for i in range(B):
        expected = np.asarray(other[i], np.float64).reshape(-1, C) @ kernels[i]
        np.testing.assert_allclose(out[i].reshape(-1), expected, atol=1e-4, rtol=1e-4)
    # The mean itself does matter: shifted features get another kernel.
    shifted = mask_features + 0.5
    out = np.asarray(run("filter", inputs=(memories, shifted, words, att))[0]["raw_masks"][:, 0])
    expected = np.asarray(shifted[0], np.float64).reshape(-1, C) @ kernels[0]
    assert np.max(np.abs(out[0].reshape(-1) - expected)) > 1e-2


def test_gradients_reach_the_embedding_and_the_first_stage():
    """Through the log-space PAN filter (its clip included) and every stage before it; one
    form only, as each gradient compile takes ~9 s here."""
    params, _ = compiled("filter")
    model = tiny_decoder("filter")
    inputs = tiny_inputs()
    g = jax.jit(jax.grad(lambda p: jnp.sum(
        model.apply({"params": p}, *inputs)[-1]["pred_masks"])))(params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
    for name in ("context_embedding", "cross_attn_0", "word_proj"):
        assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g[name])) > 0, name


def test_unknown_pan_form_is_rejected():
    with pytest.raises(ValueError, match="model.jmceln.pan") as info:
        tiny_decoder("soft").init(jax.random.PRNGKey(0), *tiny_inputs())
    message = str(info.value)
    assert "'soft'" in message and all(form in message for form in PAN_FORMS)
    assert "\n" not in message
