"""MaskGroundingHead: shapes, mask-encoder switches, key padding, tied vocabulary head,
full-size shapes via eval_shape, and that it can memorise a fixed batch."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magnet_jax.methods.magnet.mask_grounding_loss import mask_grounding_loss
from magnet_jax.methods.magnet.mask_grounding_head import MaskGroundingHead, mask_occupancy

B, N, CT, V, H, W, CV, HW = 2, 6, 32, 50, 3, 3, 24, 12


def tiny_head(mask_encoder: str = "occupancy", depth: int = 1, **kw) -> MaskGroundingHead:
    return MaskGroundingHead(num_heads=4, intermediate=64, depth=depth,
                             mask_encoder=mask_encoder, **kw)


def tiny_inputs(seed: int = 0):
    rs = np.random.RandomState(seed)
    text = jnp.asarray(rs.randn(B, N, CT), jnp.float32)
    att = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    visual = jnp.asarray(rs.randn(B, H, W, CV), jnp.float32)
    gt = jnp.asarray(rs.rand(B, HW, HW) > 0.5, jnp.int32)
    emb = jnp.asarray(rs.randn(V, CT) * 0.5, jnp.float32)
    return text, att, visual, gt, emb


_INIT_CACHE: dict = {}


def init(head, inputs):
    """Parameters for `head` on `inputs`; one jitted init per configuration (eager init is
    several times slower here, while eager apply of the tiny head is fast)."""
    key = (repr(head), tuple(x.shape for x in inputs))
    if key not in _INIT_CACHE:
        _INIT_CACHE[key] = jax.jit(head.init, static_argnames="deterministic")(
            jax.random.PRNGKey(0), *inputs, deterministic=True)
    return _INIT_CACHE[key]


@pytest.mark.parametrize("mode", ["occupancy", "pooled_token", "none"])
def test_output_shape_dtype_and_parameter_names(mode):
    head, inputs = tiny_head(mode), tiny_inputs()
    params = init(head, inputs)
    logits = head.apply(params, *inputs, deterministic=True)
    assert logits.shape == (B, N, V) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    names = set(params["params"])
    expected = {"visual_proj", "visual_norm", "position_embedding", "token_type_embeddings",
                "embeddings_norm", "layer_0", "transform", "output_bias"}
    expected |= {"mask_proj"} if mode == "occupancy" else set()
    assert names == expected
    assert set(params["params"]["transform"]) == {"dense", "LayerNorm"}
    # The vocabulary matrix is tied, never copied into the head's parameters.
    shapes = [x.shape for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))]
    assert (V, CT) not in shapes


def test_none_ignores_the_mask_and_mask_encoders_use_it():
    text, att, visual, gt, emb = tiny_inputs()
    gt2 = 1 - gt
    for mode, depends in [("none", False), ("occupancy", True), ("pooled_token", True)]:
        head = tiny_head(mode)
        params, f = init(head, (text, att, visual, gt, emb)), head.apply
        a = f(params, text, att, visual, gt, emb, deterministic=True)
        b = f(params, text, att, visual, gt2, emb, deterministic=True)
        diff = float(jnp.max(jnp.abs(a - b)))
        if depends:
            assert diff > 1e-4, mode
        else:
            assert diff == 0.0, mode


def test_empty_mask_pooled_token_is_finite():
    text, att, visual, gt, emb = tiny_inputs()
    head = tiny_head("pooled_token")
    params = init(head, (text, att, visual, gt, emb))
    fn = lambda p: head.apply(p, text, att, visual, jnp.zeros_like(gt), emb).sum()
    total, grads = jax.jit(jax.value_and_grad(fn))(params)
    assert bool(jnp.isfinite(total))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_text_padding_does_not_reach_real_tokens():
    text, att, visual, gt, emb = tiny_inputs()
    head = tiny_head(depth=2)  # two layers: leakage would compound
    params, f = init(head, (text, att, visual, gt, emb)), head.apply
    # Example 0 has padding at positions 4, 5: replace their features with large noise.
    noisy = text.at[0, 4:].set(100.0 * jax.random.normal(jax.random.PRNGKey(3), (2, CT)))
    a = f(params, text, att, visual, gt, emb, deterministic=True)
    b = f(params, noisy, att, visual, gt, emb, deterministic=True)
    np.testing.assert_allclose(np.asarray(b[0, :4]), np.asarray(a[0, :4]), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b[1]), np.asarray(a[1]))
    assert float(jnp.max(jnp.abs(b[0, 4:] - a[0, 4:]))) > 1e-3  # the padded rows do change


def test_dropout_is_active_only_when_not_deterministic():
    text, att, visual, gt, emb = tiny_inputs()
    head = tiny_head()
    params, f = init(head, (text, att, visual, gt, emb)), head.apply
    det = f(params, text, att, visual, gt, emb, deterministic=True)
    r1 = f(params, text, att, visual, gt, emb, deterministic=False,
           rngs={"dropout": jax.random.PRNGKey(1)})
    r2 = f(params, text, att, visual, gt, emb, deterministic=False,
           rngs={"dropout": jax.random.PRNGKey(2)})
    assert float(jnp.max(jnp.abs(r1 - det))) > 1e-4
    assert float(jnp.max(jnp.abs(r1 - r2))) > 1e-4


def test_tied_head_gradient_reaches_the_word_embeddings():
    text, att, visual, gt, emb = tiny_inputs()
    head = tiny_head()
    params = init(head, (text, att, visual, gt, emb))
    targets = jnp.asarray([[5, -1, 7, -1, -1, -1], [-1, 3, -1, -1, 9, -1]])

    def loss_fn(e):
        logits = head.apply(params, text, att, visual, gt, e, deterministic=True)
        return mask_grounding_loss(logits, targets, jnp.ones((B,)))[0]

    g = jax.jit(jax.grad(loss_fn))(emb)
    assert g.shape == emb.shape and bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).sum()) > 0.0
    # Every vocabulary row is a decoder output, so every row receives gradient (softmax).
    assert bool(jnp.all(jnp.abs(g).sum(axis=1) > 0))


def test_occupancy_block_mean_and_adaptive_bins():
    rs = np.random.RandomState(0)
    gt = rs.rand(2, 12, 12) > 0.5
    occ = np.asarray(mask_occupancy(jnp.asarray(gt), (3, 3)))
    np.testing.assert_allclose(occ, gt.reshape(2, 3, 4, 3, 4).mean(axis=(2, 4)), atol=1e-7)
    gt = rs.rand(2, 10, 10) > 0.5  # 10 / 3: overlapping torch bins [0,4), [3,7), [6,10)
    occ = np.asarray(mask_occupancy(jnp.asarray(gt), (3, 3)))
    bins = [(0, 4), (3, 7), (6, 10)]
    want = np.array([[[gt[b, i0:i1, j0:j1].mean() for (j0, j1) in bins] for (i0, i1) in bins]
                     for b in range(2)])
    np.testing.assert_allclose(occ, want, atol=1e-6)
    # Non-square grid goes through the per-axis matrices with the same bins.
    occ = np.asarray(mask_occupancy(jnp.asarray(gt), (3, 2)))
    assert occ.shape == (2, 3, 2)
    want = np.array([[[gt[b, i0:i1, j0:j1].mean() for (j0, j1) in [(0, 5), (5, 10)]]
                      for (i0, i1) in bins] for b in range(2)])
    np.testing.assert_allclose(occ, want, atol=1e-6)


def test_hidden_narrower_than_text_width():
    text, att, visual, gt, emb = tiny_inputs()
    head = tiny_head(hidden=16)
    params = init(head, (text, att, visual, gt, emb))
    assert "text_proj" in params["params"]
    assert head.apply(params, text, att, visual, gt, emb).shape == (B, N, V)


def test_unknown_mask_encoder_is_rejected():
    with pytest.raises(ValueError, match="mask_encoder"):
        init(tiny_head("coords"), tiny_inputs())


def test_full_size_shapes_and_parameter_count():
    b = 2
    head = MaskGroundingHead()  # 768 wide, 12 heads, FFN 3072, depth 2, occupancy
    args = (jax.ShapeDtypeStruct((b, 20, 768), jnp.float32),
            jax.ShapeDtypeStruct((b, 20), jnp.int32),
            jax.ShapeDtypeStruct((b, 15, 15, 1024), jnp.float32),
            jax.ShapeDtypeStruct((b, 480, 480), jnp.int32),
            jax.ShapeDtypeStruct((30522, 768), jnp.float32))
    params = jax.eval_shape(lambda *a: head.init(jax.random.PRNGKey(0), *a), *args)
    out = jax.eval_shape(lambda p, *a: head.apply(p, *a), params, *args)
    assert out.shape == (b, 20, 30522) and out.dtype == jnp.float32
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(params)))
    layer = 4 * (768 * 768 + 768) + 2 * 2 * 768 + 768 * 3072 + 3072 + 3072 * 768 + 768
    want = ((1024 * 768 + 768) + 2 * 768 + (768 + 768) + 225 * 768 + 2 * 768 + 2 * 768
            + 2 * layer + (768 * 768 + 768) + 2 * 768 + 30522)
    assert count == want == 15_764_538


def test_head_memorises_a_fixed_batch():
    text, att, visual, gt, emb = tiny_inputs()
    head = tiny_head()
    params = init(head, (text, att, visual, gt, emb))["params"]
    targets = jnp.asarray([[5, -1, 7, 11, -1, -1], [-1, 3, -1, -1, 9, 42]])
    weight = jnp.ones((B,))
    opt = optax.adam(3e-3)
    state = opt.init((params, emb))

    @jax.jit
    def step(p, e, s):
        def loss_fn(pe):
            logits = head.apply({"params": pe[0]}, text, att, visual, gt, pe[1])
            return mask_grounding_loss(logits, targets, weight)

        (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)((p, e))
        upd, s = opt.update(g, s, (p, e))
        p, e = optax.apply_updates((p, e), upd)
        return p, e, s, loss, metrics

    losses = []
    for _ in range(30):
        params, emb, state, loss, metrics = step(params, emb, state)
        losses.append(float(loss))
    assert losses[0] > 3.0  # ≈ log(50) at init
    assert losses[-1] < 0.1 * losses[0]
    assert float(metrics["mg_accuracy"]) == 1.0


def test_positions_predict_only_the_selected_tokens():
    """With positions, the logits are exactly the full logits at those positions, and the
    gathered loss equals the full loss when no selection is dropped."""
    from magnet_jax.methods.magnet.objectives import selected_positions

    head, inputs = tiny_head(), tiny_inputs()
    params = init(head, inputs)
    full = head.apply(params, *inputs, deterministic=True)
    targets = jnp.asarray([[-1, 7, -1, 9, -1, -1], [3, -1, -1, -1, -1, 4]], jnp.int32)
    positions, picked = selected_positions(targets, 3)
    np.testing.assert_array_equal(positions, [[1, 3, 0], [0, 5, 0]])
    np.testing.assert_array_equal(picked, [[7, 9, -1], [3, 4, -1]])
    part = head.apply(params, *inputs, deterministic=True, positions=positions)
    assert part.shape == (B, 3, V)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, positions[..., None], axis=1),
                               rtol=1e-6, atol=1e-6)
    weight = jnp.ones((B,))
    np.testing.assert_allclose(mask_grounding_loss(part, picked, weight)[0],
                               mask_grounding_loss(full, targets, weight)[0], rtol=1e-6)
    # More selections than k: the first k are kept.
    _, kept = selected_positions(targets, 1)
    np.testing.assert_array_equal(kept, [[7], [3]])
