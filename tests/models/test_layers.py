"""Layers with numerics of their own: block-accumulated float32 dots."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.models.layers import BlockAccumulatedDense, block_accumulated_dot


def test_block_accumulated_dense_has_dense_parameters_and_outputs():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 96)), jnp.float32)
    blocked = BlockAccumulatedDense(7, block=32)
    params = blocked.init(jax.random.key(0), x)["params"]
    params = nn.unbox(params)
    assert {k: v.shape for k, v in params.items()} == {"kernel": (96, 7), "bias": (7,)}
    plain = nn.Dense(7).apply({"params": params}, x)
    np.testing.assert_allclose(blocked.apply({"params": params}, x), plain, rtol=1e-5, atol=1e-5)


def test_block_accumulation_is_closer_to_float64_on_long_contractions():
    rng = np.random.default_rng(1)
    # Same sign inputs make a long running float32 sum lose the most precision.
    x = rng.uniform(0.5, 1.5, (64, 4096)).astype(np.float32)
    w = rng.uniform(0.5, 1.5, (4096, 8)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    plain = np.asarray(jnp.dot(jnp.asarray(x), jnp.asarray(w), precision="highest"), np.float64)
    blocked = np.asarray(block_accumulated_dot(jnp.asarray(x), jnp.asarray(w), 64), np.float64)
    err_plain, err_blocked = np.abs(plain - exact).max(), np.abs(blocked - exact).max()
    assert err_blocked < err_plain
    assert err_blocked / np.abs(exact).max() < 1e-6


def test_block_size_falls_back_to_a_divisor():
    x = jnp.ones((2, 90)); w = jnp.ones((90, 3))
    np.testing.assert_array_equal(block_accumulated_dot(x, w, 64), jnp.full((2, 3), 90.0))
