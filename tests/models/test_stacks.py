"""Layer stacks run as lax.scan (models/stacks.py, `model.scan_layers`): the same parameter tree
and the same function as the unrolled layers, for every stack MagNet scans (Swin block pairs,
BERT stage ranges, the deformable encoder, the mask decoder's level cycles, the pyramid
branches)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.models import abstract_params, build_model, init_params
from magnet_jax.models.layers import DropPath
from magnet_jax.models.presets import official_model_config, tiny_model_config
from magnet_jax.models.stacks import scan_layers, stack_trees
from tests.numerics import rel_err

N = 20
SIZE = 64


def test_scan_layers_folds_like_a_loop_and_remat_changes_nothing():
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.standard_normal((4, 4)), jnp.float32) for _ in range(3)]
    shifts = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    x0 = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)

    def step(x, w, b):
        y = jnp.tanh(x @ w + b)
        return y, jnp.sum(y)

    expected, sums = x0, []
    for w, b in zip(weights, shifts):
        expected, s = step(expected, w, b)
        sums.append(s)
    for remat in (False, True):
        got, got_sums = scan_layers(step, x0, weights, shifts, remat=remat)
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        np.testing.assert_allclose(got_sums, jnp.stack(sums), rtol=1e-6)
    stacked = stack_trees([{"a": w} for w in weights])
    assert stacked["a"].shape == (3, 4, 4)


def test_drop_path_traced_rate_draws_like_the_static_rate():
    x = jnp.ones((64, 3, 3, 2))
    key = jax.random.key(3)
    static = DropPath(0.3).apply({}, x, False, rngs={"droppath": key})
    traced = jax.jit(lambda r: DropPath(0.0).apply({}, x, False, r, rngs={"droppath": key}))(
        jnp.float32(0.3))
    np.testing.assert_array_equal(static, traced)
    kept = float(jnp.mean(static[:, 0, 0, 0] > 0))
    assert 0.45 < kept < 0.95, kept   # about 0.7 of the samples kept


def _every_stack_config(scan: bool):
    """The CI-sized model with every scanned stack at least two steps long."""
    cfg = tiny_model_config(SIZE)
    cfg.swin.depths = (2, 2, 4, 2)                     # stage 3: two (plain, shifted) pairs
    cfg.bert.update(dict(num_layers=8, stage_ends=(2, 4, 6, 8)))   # two layers per stage
    cfg.decoder.num_layers = 6                         # two cycles over the 3 memory levels
    cfg.pixel_decoder.num_layers = 3                   # msdeform.SCAN_MIN_LAYERS
    cfg.bert.update(dict(hidden_dropout=0.0, attention_dropout=0.0))
    cfg.swin.drop_path_rate = 0.0
    cfg.scan_layers = scan
    return cfg


def _inputs():
    rng = np.random.default_rng(1)
    image = jnp.asarray(rng.standard_normal((2, SIZE, SIZE, 3)), jnp.float32)
    ids = jnp.asarray(rng.integers(1000, 2000, (2, N)), jnp.int32)
    att = jnp.asarray((np.arange(N)[None] < np.array([[7], [N]])).astype(np.int32))
    return image, ids, att


@pytest.mark.slow
@pytest.mark.parametrize("train", [
    False,
    # Outside CI (pytest -m extended): training mode adds the rng plumbing of the scan; the
    # inference case above already compiles both models.
    pytest.param(True, marks=pytest.mark.extended)])
def test_scanned_stacks_equal_the_unrolled_layers(train):
    """Same init (init always runs unrolled), same outputs in inference and in training mode
    (dropout off, so both draw nothing), every prediction of the decoder included."""
    unrolled, scanned = (build_model(_every_stack_config(s)) for s in (False, True))
    params = init_params(unrolled, SIZE, 0)
    same_tree = jax.tree.structure(abstract_params(scanned, SIZE))   # no second compile
    assert jax.tree.structure(params) == same_tree
    image, ids, att = _inputs()

    def run(model, train):
        fn = jax.jit(lambda p: model.apply({"params": p}, image, ids, att, train=train,
                                           rngs={"dropout": jax.random.key(0),
                                                 "droppath": jax.random.key(1)}),
                     compiler_options={"xla_backend_optimization_level": 0})
        return fn(params)

    a, b = run(unrolled, train), run(scanned, train)
    assert len(a["aux_outputs"]) == len(b["aux_outputs"]) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert rel_err(y, x) <= 1e-5, (train, rel_err(y, x))


def test_scanned_official_model_traces_to_the_same_outputs_abstractly():
    """Swin-B + BERT-base at 480: the scanned apply gives the unrolled output tree (shapes only)."""
    cfg = official_model_config(480)
    shapes = {}
    for scan in (False, True):
        cfg.scan_layers = scan
        model = build_model(cfg)
        params = abstract_params(model, 480)
        image = jax.ShapeDtypeStruct((1, 480, 480, 3), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, N), jnp.int32)
        out = jax.eval_shape(lambda p, i, t, a: model.apply({"params": p}, i, t, a),
                             params, image, ids, ids)
        shapes[scan] = jax.tree.map(lambda x: (x.shape, x.dtype), out)
    assert shapes[True] == shapes[False]
    assert len(shapes[True]["aux_outputs"]) == 9
