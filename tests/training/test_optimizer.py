"""Optimiser recipe: decay masks, groups, frozen BERT, AdamW numerics, schedule, clip, accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from magnet_jax.training.optimizer import (OptimizerConfig, as_optimizer_config,
                                           clip_by_global_norm, decay_mask, global_norm,
                                           make_optimizer, make_schedule, param_labels)

# Hand-made tree with the contract's paths (/tmp/contract.md); shapes are tiny.
PATHS = [
    "image_model/patch_embed/proj/kernel", "image_model/patch_embed/proj/bias",
    "image_model/patch_embed/norm/scale", "image_model/patch_embed/norm/bias",
    "image_model/layers_0/blocks_0/norm1/scale", "image_model/layers_0/blocks_0/norm1/bias",
    "image_model/layers_0/blocks_0/attn/relative_position_bias_table",
    "image_model/layers_0/blocks_0/attn/qkv/kernel", "image_model/layers_0/blocks_0/attn/qkv/bias",
    "image_model/layers_0/blocks_0/mlp/fc1/kernel",
    "image_model/layers_0/downsample/norm/scale", "image_model/layers_0/downsample/reduction/kernel",
    "image_model/layers_0/fusion/image_lang_att/f_query/kernel",
    "image_model/layers_0/fusion/image_lang_att/f_query_norm/scale",
    "image_model/layers_0/res_gate/fc1/kernel",
    "image_model/layers_0/pyramids_0/norm/scale", "image_model/layers_0/mixer/norm/bias",
    "language_model/embeddings/word_embeddings/embedding",
    "language_model/embeddings/LayerNorm/scale",
    "language_model/encoder/layer_0/attention/self/query/kernel",
    "language_model/encoder/layer_0/attention/output/LayerNorm/scale",
    "language_model/encoder/layer_9/intermediate/dense/kernel",
    "language_model/encoder/layer_10/output/dense/kernel",
    "language_model/encoder/layer_11/output/dense/bias",
    "language_model/pwams_0/project_mm/kernel", "language_model/res_gates_0/fc1/kernel",
    "pixel_decoder/transformer/level_embed", "pixel_decoder/input_proj_0/norm/scale",
    "pixel_decoder/transformer/encoder/layers_0/linear1/kernel",
    "predictor/query_feat", "predictor/query_embed", "predictor/level_embed",
    "predictor/decoder_norm/scale", "predictor/class_embed/kernel", "predictor/class_embed/bias",
]
# "magnet_jax" rule: decayed paths.
DECAYED = {
    "image_model/patch_embed/proj/kernel", "image_model/layers_0/blocks_0/attn/qkv/kernel",
    "image_model/layers_0/blocks_0/mlp/fc1/kernel",
    "image_model/layers_0/downsample/reduction/kernel",
    "image_model/layers_0/fusion/image_lang_att/f_query/kernel",
    "image_model/layers_0/res_gate/fc1/kernel",
    "language_model/encoder/layer_0/attention/self/query/kernel",
    "language_model/encoder/layer_9/intermediate/dense/kernel",
    "language_model/encoder/layer_10/output/dense/kernel",
    "language_model/pwams_0/project_mm/kernel", "language_model/res_gates_0/fc1/kernel",
    "pixel_decoder/transformer/encoder/layers_0/linear1/kernel", "predictor/class_embed/kernel",
}
# "lavt" rule: only the Swin trunk's norms and relative-position tables are exempt.
LAVT_EXEMPT = {
    "image_model/patch_embed/norm/scale", "image_model/patch_embed/norm/bias",
    "image_model/layers_0/blocks_0/norm1/scale", "image_model/layers_0/blocks_0/norm1/bias",
    "image_model/layers_0/blocks_0/attn/relative_position_bias_table",
    "image_model/layers_0/downsample/norm/scale",
}
BACKBONE = {p for p in PATHS if p.startswith(("image_model/patch_embed", "language_model/embeddings",
                                              "language_model/encoder"))
            or "/blocks_" in p or "/downsample/" in p}
FROZEN_LAVT = {p for p in PATHS if p.startswith(("language_model/embeddings",
                                                 "language_model/encoder/layer_10",
                                                 "language_model/encoder/layer_11"))}


def _tree(value=1.0):
    return traverse_util.unflatten_dict(
        {tuple(p.split("/")): jnp.full((2,), value, jnp.float32) for p in PATHS})


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("mode,expected", [
    ("magnet_jax", DECAYED), ("lavt", set(PATHS) - LAVT_EXEMPT)])
def test_decay_mask(mode, expected):
    got = {p for p, d in _flat(decay_mask(_tree(), mode)).items() if d}
    assert got == expected


def test_decay_mask_accepts_a_params_collection_root():
    got = _flat(decay_mask({"params": _tree()}))
    assert got["params/predictor/class_embed/kernel"] and not got["params/predictor/query_feat"]


@pytest.mark.parametrize("mode,frozen", [
    ("lavt", FROZEN_LAVT), ("all", set()),
    ("none", {p for p in PATHS if p.startswith(("language_model/embeddings",
                                                "language_model/encoder"))})])
def test_labels(mode, frozen):
    labels = _flat(param_labels(_tree(), mode, bert_num_layers=12))
    assert {p for p, l in labels.items() if l == "frozen"} == frozen
    assert {p for p, l in labels.items() if l == "backbone"} == BACKBONE - frozen
    assert {p for p, l in labels.items() if l == "new"} == set(PATHS) - BACKBONE


def test_bert_layer_count_inferred_from_the_tree():
    # Layers 0..11 exist only partially in the tree; inferred count is max index + 1 = 12.
    assert _flat(param_labels(_tree()))["language_model/encoder/layer_9/intermediate/dense/kernel"] \
        == "backbone"
    assert _flat(param_labels(_tree()))["language_model/encoder/layer_10/output/dense/kernel"] \
        == "frozen"


def test_frozen_params_unchanged_others_change():
    params = _tree(1.0)
    grads = _tree(0.5)
    tx = make_optimizer(params, dict(lr=1e-2, total_steps=10))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = _flat(optax.apply_updates(params, updates))
    for p, v in new.items():
        if p in FROZEN_LAVT:
            np.testing.assert_array_equal(v, 1.0)
        else:
            assert np.all(np.asarray(v) < 1.0), p


def test_backbone_lr_multiplier():
    params, grads = _tree(1.0), _tree(0.5)
    tx = make_optimizer(params, dict(lr=1e-2, weight_decay=0.0, total_steps=10,
                                     backbone_lr_mult=0.1, text_trainable="all"))
    updates, _ = tx.update(grads, tx.init(params), params)
    u = _flat(updates)
    # First Adam step: update = -lr * sign(g) (up to eps), scaled by the group multiplier.
    np.testing.assert_allclose(u["predictor/class_embed/kernel"], -1e-2, rtol=1e-5)
    np.testing.assert_allclose(u["image_model/layers_0/blocks_0/mlp/fc1/kernel"], -1e-3, rtol=1e-5)


def test_adamw_matches_pytorch_formula_on_a_scalar():
    lr, wd, b1, b2, eps = 1e-3, 0.1, 0.9, 0.999, 1e-8
    p0 = 2.0
    grads = [0.3, -0.7, 0.2]
    params = {"predictor": {"class_embed": {"kernel": jnp.array(p0)}}}
    tx = make_optimizer(params, dict(lr=lr, weight_decay=wd, b1=b1, b2=b2, eps=eps,
                                     total_steps=10**9, power=1.0))
    state = tx.init(params)
    # PyTorch AdamW (torch.optim.AdamW, amsgrad=False): decay first, then the Adam step.
    p, m, v = p0, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        lr_t = lr * (1 - (t - 1) / 10**9)     # schedule value at optax step count t-1
        p = p - lr_t * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr_t * m_hat / (math.sqrt(v_hat) + eps)
        upd, state = tx.update({"predictor": {"class_embed": {"kernel": jnp.array(g)}}},
                               state, params)
        params = optax.apply_updates(params, upd)
        np.testing.assert_allclose(float(params["predictor"]["class_embed"]["kernel"]), p,
                                   rtol=1e-6)


def test_schedule_values():
    s = make_schedule(dict(lr=1e-3, total_steps=100, power=0.9))
    np.testing.assert_allclose(s(0), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(s(50), 1e-3 * 0.5**0.9, rtol=1e-5)
    np.testing.assert_allclose(s(100), 0.0, atol=1e-12)
    w = make_schedule(dict(lr=1e-3, total_steps=100, warmup_steps=10, power=0.9))
    np.testing.assert_allclose(w(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(w(5), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(w(10), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(w(55), 1e-3 * 0.5**0.9, rtol=1e-5)
    np.testing.assert_allclose(w(100), 0.0, atol=1e-12)
    np.testing.assert_allclose(w(150), 0.0, atol=1e-12)


def test_clipping_bounds_the_global_norm_of_trainable_grads():
    params = {"predictor": {"class_embed": {"kernel": jnp.zeros((2,))}},
              "language_model": {"embeddings": {"word_embeddings": {"embedding": jnp.zeros((2,))}}}}
    grads = {"predictor": {"class_embed": {"kernel": jnp.array([3.0, 4.0])}},
             "language_model": {"embeddings": {"word_embeddings": {"embedding":
                                                                   jnp.array([100.0, 0.0])}}}}
    # With b1 = b2 = 0 and a huge eps, Adam's update is -lr * g / (|g| + eps) ~ -g / eps: it
    # shows the clipped gradient directly.
    tx = make_optimizer(params, dict(lr=1.0, weight_decay=0.0, total_steps=10,
                                     clip_global_norm=1.0, b1=0.0, b2=0.0, eps=1e6))
    upd, _ = tx.update(grads, tx.init(params), params)
    # Frozen embedding grad excluded from the norm: clipped = (3, 4) / 5; update = -clipped / eps.
    np.testing.assert_allclose(upd["predictor"]["class_embed"]["kernel"],
                               -np.array([0.6, 0.8]) / 1e6, rtol=1e-4)
    np.testing.assert_array_equal(
        upd["language_model"]["embeddings"]["word_embeddings"]["embedding"], 0.0)
    no_clip = make_optimizer(params, dict(lr=1.0, weight_decay=0.0, total_steps=10,
                                          clip_global_norm=0, b1=0.0, b2=0.0, eps=1e6))
    upd, _ = no_clip.update(grads, no_clip.init(params), params)
    np.testing.assert_allclose(upd["predictor"]["class_embed"]["kernel"],
                               -np.array([3.0, 4.0]) / 1e6, rtol=1e-4)


def _mixed_tree(scale):
    rng = np.random.default_rng(3)
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2, 4), "d": ()}
    return {k: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("scale", [0.01, 10.0])   # below and above the clipping threshold
def test_flat_global_norm_and_clip_equal_optax(scale):
    tree = _mixed_tree(scale)
    np.testing.assert_allclose(global_norm(tree, flat=True), optax.tree.norm(tree), rtol=1e-6)
    flat, reference = clip_by_global_norm(1.0, flat=True), optax.clip_by_global_norm(1.0)
    # Same (empty) state, so checkpoints written with either restore into the other.
    assert jax.tree.structure(flat.init(tree)) == jax.tree.structure(reference.init(tree))
    got, _ = flat.update(tree, flat.init(tree))
    want, _ = reference.update(tree, reference.init(tree))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9), got, want)
    assert float(optax.tree.norm(got)) == pytest.approx(min(float(optax.tree.norm(tree)), 1.0),
                                                        rel=1e-5)


def test_flat_global_norm_optimizer_matches_per_leaf():
    """The training loop's choice for replicated parameters: same updates, same state tree."""
    params, grads = _tree(0.5), jax.tree.map(lambda x: x * 3.0, _tree(1.0))
    cfg = dict(lr=1e-2, total_steps=10, clip_global_norm=1.0)
    per_leaf = make_optimizer(params, cfg)
    flat = make_optimizer(params, dict(cfg, flat_global_norm=True))
    state_a, state_b = per_leaf.init(params), flat.init(params)
    assert jax.tree.structure(state_a) == jax.tree.structure(state_b)
    for _ in range(2):
        upd_a, state_a = per_leaf.update(grads, state_a, params)
        upd_b, state_b = flat.update(grads, state_b, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
                     (upd_a, state_a), (upd_b, state_b))
    assert float(optax.tree.norm(upd_a)) > 0


def test_multisteps_accumulates_k_steps():
    k = 3
    params = {"predictor": {"class_embed": {"kernel": jnp.array([1.0, -1.0])}}}
    cfg = dict(lr=1e-2, total_steps=100, accumulation_steps=k)
    tx = make_optimizer(params, cfg)
    ref = make_optimizer(params, dict(cfg, accumulation_steps=1))
    state = tx.init(params)
    gs = [jnp.array([0.1, 0.4]), jnp.array([0.5, -0.2]), jnp.array([-0.3, 0.1])]
    p = params
    for i, g in enumerate(gs):
        upd, state = tx.update({"predictor": {"class_embed": {"kernel": g}}}, state, p)
        p = optax.apply_updates(p, upd)
        if i < k - 1:   # no change until the k-th micro step
            np.testing.assert_array_equal(p["predictor"]["class_embed"]["kernel"], [1.0, -1.0])
    mean = sum(gs) / k
    upd, _ = ref.update({"predictor": {"class_embed": {"kernel": mean}}}, ref.init(params), params)
    np.testing.assert_allclose(p["predictor"]["class_embed"]["kernel"],
                               optax.apply_updates(params, upd)["predictor"]["class_embed"]["kernel"],
                               rtol=1e-6)


def test_config_sources_and_errors():
    cd = ml_collections.ConfigDict({"lr": 1e-4, "warmup_steps": 5, "total_steps": 50})
    assert as_optimizer_config(cd) == OptimizerConfig(lr=1e-4, warmup_steps=5, total_steps=50)
    with pytest.raises(ValueError, match="did you mean 'weight_decay'"):
        as_optimizer_config({"weight_decy": 0.1})
    with pytest.raises(ValueError, match="wd_mask"):
        OptimizerConfig(wd_mask="torch")
    with pytest.raises(ValueError, match="text_trainable"):
        OptimizerConfig(text_trainable="some")
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(total_steps=10, warmup_steps=10)


def test_step_schedule_and_clip_towers_as_backbone():
    """CRIS's recipe: lr x 0.1 at 70 % of the steps (after warmup); CLIP towers are trunks."""
    from magnet_jax.training.optimizer import make_schedule, param_labels
    sched = make_schedule(dict(lr=1e-4, schedule="step", total_steps=100, warmup_steps=10,
                               step_milestones=(0.7,), step_factor=0.1))
    assert [float(sched(s)) for s in (0, 10, 69)] == pytest.approx([0.0, 1e-4, 1e-4])
    assert [float(sched(s)) for s in (70, 99)] == pytest.approx([1e-5, 1e-5])
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        make_schedule(dict(schedule="cosine"))
    with pytest.raises(ValueError, match="step_milestones must lie in"):
        make_schedule(dict(schedule="step", step_milestones=(1.5,)))
    params = {"clip_vision": {"encoder": {"w": 0}}, "clip_text": {"w": 0}, "neck": {"w": 0}}
    labels = param_labels(params, "all")
    assert labels == {"clip_vision": {"encoder": {"w": "backbone"}},
                      "clip_text": {"w": "backbone"}, "neck": {"w": "new"}}


def test_the_loop_uses_the_flat_norm_only_on_replicated_cpu_meshes():
    from configs import magnet as magnet_configs
    from magnet_jax import sharding
    from magnet_jax.training import loop
    config = magnet_configs.get_config("synthetic")
    assert loop.optimizer_config(config, 10, sharding.make_mesh(num_fsdp=1)).flat_global_norm
    assert not loop.optimizer_config(config, 10, sharding.make_mesh(num_fsdp=2)).flat_global_norm
    assert not loop.optimizer_config(config, 10).flat_global_norm
