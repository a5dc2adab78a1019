"""methods/magnet/alignment_loss.py (training_objectives.md §5): P2T on a hand-computed case and
against NumPy, P2P against a NumPy transcription on fixed samples, label downsampling,
sampling, skipped examples, finite gradients, and a toy problem on which both terms decrease."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.methods.magnet import alignment_loss as al

# jit once per shape: eager op-by-op dispatch of these small graphs is slower than compiling.
_cal = jax.jit(al.cal_loss, static_argnames=("p2t", "temperature", "w_p2t", "w_p2p", "num_fg",
                                             "num_bg"))
_p2t = jax.jit(al.p2t_loss, static_argnames=("kind", "temperature"))
_p2p_idx = jax.jit(al.p2p_loss_from_indices, static_argnames=("temperature",))
_sample = jax.jit(al.sample_pixels, static_argnums=(2, 3))


def _unit(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def test_p2t_infonce_2x2_by_hand():
    # 2 × 2 image, pixels (1,0) (0,1) / (−1,0) (0,−1); text (1,0); top row is the object.
    f = np.array([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])
    t = np.array([[1.0, 0.0]])
    y = np.array([[1.0, 1.0, 0.0, 0.0]])
    # τ = 0.5: s = (2, 0, −2, 0); L = −½[(2 − lse) + (0 − lse)] = lse − 1.
    expect = math.log(math.e ** 2 + 2 + math.e ** -2) - 1
    got = _p2t(jnp.asarray(f), jnp.asarray(t), jnp.asarray(y), jnp.ones(1, bool),
                      kind="infonce", temperature=0.5)
    np.testing.assert_allclose(got, expect, rtol=1e-6)


def _np_p2t(f, t, y, usable, kind, tau):
    per = []
    for b in range(f.shape[0]):
        if not usable[b]:
            continue
        s = f[b] @ t[b] / tau
        if kind == "bce":
            p = 1 / (1 + np.exp(-s))
            per.append(np.mean(-(y[b] * np.log(p) + (1 - y[b]) * np.log(1 - p))))
        else:
            lse = np.log(np.exp(s).sum())
            per.append(-np.sum((s - lse) * y[b]) / y[b].sum())
    return np.mean(per) if per else 0.0


@pytest.mark.parametrize("kind", ["bce", "infonce"])
def test_p2t_matches_numpy_and_skips(kind):
    rng = np.random.default_rng(0)
    b, n, c = 4, 12, 5
    f = _unit(rng.normal(size=(b, n, c)))
    t = _unit(rng.normal(size=(b, c)))
    y = (rng.random((b, n)) > 0.5).astype(np.float64)
    y[0, 0] = 1.0
    y[1] = 0.0  # no foreground: skipped
    valid = np.array([True, True, True, False])  # last: padding, skipped
    usable = valid & (y.sum(1) > 0)
    got = _p2t(jnp.asarray(f, jnp.float32), jnp.asarray(t, jnp.float32),
                      jnp.asarray(y, jnp.float32), jnp.asarray(valid), kind=kind,
                      temperature=0.1)
    np.testing.assert_allclose(got, _np_p2t(f, t, y, usable, kind, 0.1), rtol=1e-5)


def _np_p2p(f, fg_idx, bg_idx, valid, bg_valid, tau):
    per = []
    for b in range(f.shape[0]):
        if not valid[b]:
            continue
        bgi = bg_idx[b] if bg_valid[b] else bg_idx[b][:0]
        z = f[b][np.concatenate([fg_idx[b], bgi])]
        k_fg = len(fg_idx[b])
        anchors = []
        for i in range(k_fg):
            s = z @ z[i] / tau
            others = [j for j in range(len(z)) if j != i]
            lse = np.log(np.sum(np.exp(s[others])))
            pos = [k for k in range(k_fg) if k != i]
            anchors.append(-np.mean([s[k] - lse for k in pos]))
        per.append(np.mean(anchors))
    return np.mean(per) if per else 0.0


def test_p2p_from_indices_matches_numpy():
    rng = np.random.default_rng(1)
    b, n, c, k_fg, k_bg = 3, 20, 6, 5, 4
    f = _unit(rng.normal(size=(b, n, c)))
    fg_idx = rng.integers(0, n, size=(b, k_fg))
    fg_idx[0, 1] = fg_idx[0, 0]  # a pixel drawn twice: two samples, a positive pair
    bg_idx = rng.integers(0, n, size=(b, k_bg))
    valid = np.array([True, True, False])
    bg_valid = np.array([True, False, True])
    got = _p2p_idx(jnp.asarray(f, jnp.float32), jnp.asarray(fg_idx),
                                   jnp.asarray(bg_idx), jnp.asarray(valid),
                                   jnp.asarray(bg_valid), temperature=0.2)
    np.testing.assert_allclose(got, _np_p2p(f, fg_idx, bg_idx, valid, bg_valid, 0.2),
                               rtol=1e-5)
    # An image without background equals the same image sampled with no bg slots at all.
    one = _p2p_idx(jnp.asarray(f[1:2], jnp.float32), jnp.asarray(fg_idx[1:2]),
                                   jnp.zeros((1, 0), jnp.int32), jnp.ones(1, bool),
                                   jnp.ones(1, bool), temperature=0.2)
    only = _p2p_idx(jnp.asarray(f[1:2], jnp.float32), jnp.asarray(fg_idx[1:2]),
                                    jnp.asarray(bg_idx[1:2]), jnp.ones(1, bool),
                                    jnp.zeros(1, bool), temperature=0.2)
    np.testing.assert_allclose(only, one, rtol=1e-6)


def test_sampling_respects_labels():
    y = np.zeros((3, 16), np.float32)
    y[0, [2, 5]] = 1.0
    y[1] = 1.0  # no background
    y[2, 7] = 1.0
    fg, bg = _sample(jax.random.key(0), jnp.asarray(y), 32, 24)
    fg, bg = np.asarray(fg), np.asarray(bg)
    assert fg.shape == (3, 32) and bg.shape == (3, 24)
    assert set(fg[0]) <= {2, 5} and set(fg[2]) == {7}
    assert np.all(y[0][bg[0]] == 0) and np.all(y[2][bg[2]] == 0)
    assert np.all((bg[1] >= 0) & (bg[1] < 16))  # uniform draw, masked out by the loss


def test_downsample_labels():
    gt = np.zeros((1, 4, 4), np.float32)
    gt[0, 0, 0] = 1.0             # block (0,0): 1/4 -> 0
    gt[0, 0:2, 2] = 1.0           # block (0,1): 2/4 -> 1 (ties are foreground)
    gt[0, 2:4, 0:2] = 1.0         # block (1,0): 4/4 -> 1
    got = al.downsample_labels(jnp.asarray(gt), (2, 2))
    np.testing.assert_array_equal(got[0], [[0.0, 1.0], [1.0, 0.0]])
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    gt = (rng.random((2, 11, 13)) > 0.5).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(gt)[:, None], (4, 5))
    ref = (ref[:, 0].numpy() >= 0.5).astype(np.float32)
    np.testing.assert_array_equal(al.downsample_labels(jnp.asarray(gt), (4, 5)), ref)


def _batch(rng, b=3, h=4, c=8):
    feats = rng.normal(size=(b, h, h, c)).astype(np.float32)
    text = rng.normal(size=(b, c)).astype(np.float32)
    gt = np.zeros((b, 2 * h, 2 * h), np.float32)
    gt[:, 2:6, 2:6] = 1.0
    return feats, text, gt


def test_skipped_examples_contribute_nothing():
    rng = np.random.default_rng(3)
    feats, text, gt = _batch(rng)
    gt[1] = 0.0                    # no foreground
    gt[2, 0, 0] = 1.0              # padded (weight 0) below
    weight = jnp.asarray([1.0, 1.0, 0.0])
    key = jax.random.key(1)
    f = al.l2_normalize(jnp.asarray(feats).reshape(3, 16, 8))
    t = al.l2_normalize(jnp.asarray(text))
    labels = al.downsample_labels(jnp.asarray(gt), (4, 4)).reshape(3, 16)
    loss, m = _cal(feats, text, gt, weight, key, p2t="infonce", num_fg=8, num_bg=8)
    assert float(m["cal_num_used"]) == 1.0
    assert np.isfinite(float(loss))
    # Only example 0 counts: the batch value equals example 0 alone.
    alone = _p2t(f[:1], t[:1], labels[:1], jnp.ones(1, bool), kind="infonce")
    np.testing.assert_allclose(m["loss_p2t"], alone, rtol=1e-6)
    # P2P of example 0 with its own sampled indices equals the batch value.
    fg, bg = _sample(key, labels, 8, 8)
    ref = _p2p_idx(f[:1], fg[:1], bg[:1], jnp.ones(1, bool), jnp.ones(1, bool))
    np.testing.assert_allclose(m["loss_p2p"], ref, rtol=1e-6)
    np.testing.assert_allclose(m["loss_cal"], m["loss_p2t"] + m["loss_p2p"], rtol=1e-6)


def test_gradients_finite_including_all_skipped_batch():
    rng = np.random.default_rng(4)
    feats, text, gt = _batch(rng)
    feats[0, 0, 0] = 0.0  # a zero-norm pixel embedding: the L2 guard must hold
    weight = jnp.asarray([1.0, 0.0, 1.0])

    def f(feats, text, gt):
        return al.cal_loss(feats, text, gt, weight, jax.random.key(2), p2t="infonce",
                           num_fg=8, num_bg=8)[0]

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    for all_skipped in (False, True):
        g_mask = np.zeros_like(gt) if all_skipped else gt
        loss, (gf, gt_) = grad(jnp.asarray(feats), jnp.asarray(text), jnp.asarray(g_mask))
        assert np.isfinite(float(loss))
        assert np.all(np.isfinite(gf)) and np.all(np.isfinite(gt_))
        if all_skipped:
            assert float(loss) == 0.0
            assert not np.any(gf) and not np.any(gt_)
        else:
            assert np.any(gf) and np.any(gt_)


@pytest.mark.parametrize("p2t", ["bce", "infonce"])
def test_toy_problem_both_terms_decrease(p2t):
    """Pixel and text embeddings are free parameters; SGD on L_CAL lowers P2T and P2P."""
    rng = np.random.default_rng(5)
    feats, text, gt = _batch(rng, b=2, h=4, c=8)
    key = jax.random.key(3)  # fixed: the same P2P samples every step

    def loss_fn(params):
        return al.cal_loss(params["f"], params["t"], gt, jnp.ones(2), key, p2t=p2t,
                           temperature=0.1, num_fg=8, num_bg=8)

    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    params = {"f": jnp.asarray(feats), "t": jnp.asarray(text)}
    history = []
    for _ in range(30):
        (_, metrics), g = grad(params)
        history.append(metrics)
        params = jax.tree.map(lambda p, d: p - 0.5 * d, params, g)
    for term in ("loss_p2t", "loss_p2p"):
        first, last = float(history[0][term]), float(history[-1][term])
        print(f"{p2t} {term}: {first:.4f} -> {last:.4f}")
        assert last < 0.7 * first, (term, first, last)


def test_unknown_p2t_kind_names_it():
    with pytest.raises(ValueError, match="cosine"):
        al.p2t_loss(jnp.zeros((1, 4, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 4)),
                    jnp.ones(1, bool), kind="cosine")
