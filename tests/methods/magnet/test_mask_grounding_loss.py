"""mask_grounding_loss: values against a NumPy hand computation, ignored positions and
padding examples, the zero-selection guard, metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.methods.magnet.mask_grounding_loss import mask_grounding_loss


def numpy_reference(logits, targets, weight):
    """Plain loops: mean CE over selected tokens of examples with weight > 0 ({0,1} weights)."""
    terms, hits = [], []
    for b in range(logits.shape[0]):
        if weight[b] == 0:
            continue
        for n in range(logits.shape[1]):
            t = targets[b, n]
            if t < 0:
                continue
            z = logits[b, n].astype(np.float64)
            lse = np.log(np.exp(z - z.max()).sum()) + z.max()
            terms.append(lse - z[t])
            hits.append(float(np.argmax(z) == t))
    return np.mean(terms), np.mean(hits), len(terms)


def test_matches_numpy_with_ignored_positions_and_padding_examples():
    rs = np.random.RandomState(0)
    logits = rs.randn(3, 5, 7).astype(np.float32) * 3
    targets = np.array([[2, -1, 6, -1, 0],
                        [-1, -1, 3, -1, -1],
                        [1, 4, 5, 6, 2]])          # example 2 is padding (weight 0)
    weight = np.array([1.0, 1.0, 0.0], np.float32)
    logits[0, 1] = 1e4                            # an ignored position with extreme logits
    loss, metrics = jax.jit(mask_grounding_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                                 jnp.asarray(weight))
    want_loss, want_acc, want_n = numpy_reference(logits, targets, weight)
    assert want_n == 4
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss_mg"]), want_loss, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mg_accuracy"]), want_acc, rtol=1e-6)
    assert float(metrics["mg_num_selected"]) == 4.0
    assert all(v.dtype == jnp.float32 for v in [loss, *metrics.values()])


def test_hand_computed_two_token_case():
    # Uniform logits over 4 words: CE = log 4; a one-hot-ish row: CE = log(1 + 3 e^-10) - 0.
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 1, 2] = 10.0
    targets = np.array([[0, 2, -1]])
    loss, metrics = mask_grounding_loss(jnp.asarray(logits), jnp.asarray(targets),
                                        jnp.ones((1,)))
    want = (np.log(4.0) + np.log(1.0 + 3.0 * np.exp(-10.0))) / 2
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    # Position 0: argmax of a tie is index 0 = target; position 1: correct.
    assert float(metrics["mg_accuracy"]) == 1.0


def test_bfloat16_logits_are_computed_in_float32():
    rs = np.random.RandomState(1)
    logits = jnp.asarray(rs.randn(2, 4, 9), jnp.bfloat16)
    targets = jnp.asarray([[1, -1, 3, 8], [0, 0, -1, -1]])
    loss, _ = mask_grounding_loss(logits, targets, jnp.ones((2,)))
    want, _, _ = numpy_reference(np.asarray(logits.astype(jnp.float32)), np.asarray(targets),
                                 np.ones(2))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_nothing_selected_gives_zero_loss_and_zero_finite_grads():
    logits = jnp.asarray(np.random.RandomState(2).randn(2, 4, 6), jnp.float32)
    for targets, weight in [(-jnp.ones((2, 4), jnp.int32), jnp.ones((2,))),
                            (jnp.ones((2, 4), jnp.int32), jnp.zeros((2,)))]:
        (loss, metrics), g = jax.value_and_grad(mask_grounding_loss, has_aux=True)(
            logits, targets, weight)
        assert float(loss) == 0.0 and float(metrics["mg_accuracy"]) == 0.0
        assert float(metrics["mg_num_selected"]) == 0.0
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) == 0.0


def test_gradient_only_on_selected_positions_of_real_examples():
    logits = jnp.asarray(np.random.RandomState(3).randn(2, 3, 5), jnp.float32)
    targets = jnp.asarray([[1, -1, 2], [3, 4, -1]])
    weight = jnp.asarray([1.0, 0.0])
    g = jax.grad(lambda z: mask_grounding_loss(z, targets, weight)[0])(logits)
    touched = np.asarray(jnp.abs(g).sum(-1) > 0)
    np.testing.assert_array_equal(touched, [[True, False, True], [False, False, False]])
    # Softmax CE gradient rows sum to zero and are (p − onehot) / count.
    np.testing.assert_allclose(np.asarray(g.sum(-1)), 0.0, atol=1e-7)
    p = jax.nn.softmax(logits[0, 0])
    np.testing.assert_allclose(np.asarray(g[0, 0]), (p - jax.nn.one_hot(1, 5)) / 2, atol=1e-7)
