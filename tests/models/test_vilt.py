"""Linen ViLT (models/vilt.py) vs transformers' PyTorch ViltModel, float32, with random weights
imported through magnet_jax.weights.vilt from a `save_pretrained` directory: inputs at the
pretraining size and at another size (position table interpolated), padded text, default and
given token type ids; the layers `collect`ed vs output_hidden_states; scanned vs unrolled
stacks; vilt_normalise.

HF's ViltEmbeddings.visual_embed draws the image tokens with torch.multinomial: with every patch
valid it returns a random permutation of all patches, whatever max_image_length (a negative one
means "all"; a larger one is clipped to the patch count). No config keeps them in order, so the
parity tests replace torch.multinomial by the identity permutation while HF runs
(`patches_in_order`), and one test keeps HF's random order and undoes it with the recorded
permutation (the encoder is permutation-equivariant).

Tolerance: max|Δ| <= 1e-5 · max|ref| (tests/numerics.py).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.data.images import IMAGENET_MEAN, IMAGENET_STD
from magnet_jax.models.vilt import VILT_B32, ViLT, resize_align_corners, vilt_normalise
from tests.numerics import check, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from magnet_jax.weights.vilt import import_vilt, vilt_kwargs_from_hf_config  # noqa: E402

IMAGE, PATCH = 32, 8   # a 4x4 position table
VOCAB, TEXT = 100, 9
LAYERS = 3             # collect=(1,) leaves a 2-layer stretch that runs as a scan
SIZES = [(32, 32), (48, 40)]   # the pretraining grid, and a 6x5 grid (table interpolated)


def hf_vilt_config(**overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              intermediate_size=128, image_size=IMAGE, patch_size=PATCH,
              max_position_embeddings=40, attn_implementation="eager")
    kw.update(overrides)
    return transformers.ViltConfig(**kw)


def randomise(model, seed: int = 0):
    """Every parameter far from zero and from its init: weights ~ N(0, 1/fan_in), LayerNorm
    scales 1 + N(0, 0.2²), biases N(0, 0.2²), cls token and position table N(0, 0.5²)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("cls_token", "embeddings.position_embeddings")):
                p.copy_(0.5 * torch.randn(p.shape))
            elif p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * p[0].numel() ** -0.5)
    return model.eval()


def random_hf_vilt(seed: int = 0, cls=None, **overrides):
    cls = cls or transformers.ViltModel
    return randomise(cls(hf_vilt_config(**overrides)), seed)


@contextlib.contextmanager
def patches_in_order(record: list | None = None):
    """torch.multinomial as HF's visual_embed calls it (ones(v), v, no replacement) returns
    arange(v) instead of a random permutation; with `record`, the real draw is kept and
    appended there instead."""
    real = torch.multinomial

    def fake(weights, num_samples, replacement=False, **kw):
        assert not replacement and num_samples == weights.numel()
        if record is not None:
            out = real(weights, num_samples, replacement, **kw)
            record.append(out.numpy().copy())
            return out
        return torch.arange(num_samples)

    with mock.patch.object(torch, "multinomial", fake):
        yield


def text_batch(seed: int = 0):
    """ids/att (2, 9): a 5-token sentence right-padded with 0, and a full one."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (2, TEXT)).astype(np.int32)
    att = np.ones((2, TEXT), np.int32)
    ids[0, 5:], att[0, 5:] = 0, 0
    return ids, att


def pixel_batch(size, seed: int = 0):
    return np.random.default_rng(seed).standard_normal((2, *size, 3)).astype(np.float32)


def torch_vilt(model, ids, att, pixels, token_type_ids=None, hidden=False, record=None):
    kw = {} if token_type_ids is None else dict(
        token_type_ids=torch.from_numpy(token_type_ids.astype(np.int64)))
    with torch.no_grad(), patches_in_order(record):
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(att.astype(np.int64)),
                    pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                    output_hidden_states=hidden, **kw)
    ref = dict(sequence=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy())
    if hidden:
        ref["hidden"] = [h.numpy() for h in out.hidden_states]
    return ref


@pytest.fixture(scope="module")
def hf_vilt(tmp_path_factory):
    """(HF ViltModel, ViLT kwargs, imported params)."""
    model = random_hf_vilt()
    path = tmp_path_factory.mktemp("hf_vilt")
    model.save_pretrained(path, safe_serialization=True)
    kwargs = vilt_kwargs_from_hf_config(model.config.to_dict())
    return model, kwargs, import_vilt(path, kwargs)


def run_vilt(kwargs, params, ids, att, pixels, token_type_ids=None):
    model = ViLT(**kwargs)
    return jax.jit(lambda p, i, a, x, t: model.apply({"params": p}, i, a, x, t))(
        params, ids, att, pixels, token_type_ids)


def run_parts(kwargs, params, ids, att, pixels, collect):
    """embed_text / embed_image / encode / pool, called one by one as a method would."""
    model = ViLT(**kwargs)

    def f(p, i, a, x):
        def body(m):
            text, image = m.embed_text(i), m.embed_image(x)
            mask = jnp.concatenate([a, jnp.ones(image.shape[:2], a.dtype)], axis=1)
            out = m.encode(jnp.concatenate([text, image], 1), mask, collect=collect)
            return dict(out, pooled=m.pool(out["tokens"]))
        return nn_apply(model, body, p)

    return jax.jit(f)(params, ids, att, pixels)


def nn_apply(model, fn, params):
    """fn(bound model) with `params`: calls any method (or several) of the module."""
    return nn.apply(fn, model)({"params": params})


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_vilt_matches_transformers(hf_vilt, size):
    model, kwargs, params = hf_vilt
    assert model.config._attn_implementation == "eager" and not model.training
    ids, att = text_batch()
    pixels = pixel_batch(size)
    ref = torch_vilt(model, ids, att, pixels)
    got = run_vilt(kwargs, params, ids, att, pixels)
    patches = (size[0] // PATCH) * (size[1] // PATCH)
    assert got["sequence"].shape == (2, TEXT + 1 + patches, 64)
    tag = f"[vilt {size[0]}x{size[1]}]"
    check(f"{tag} last_hidden_state", got["sequence"], ref["sequence"])
    check(f"{tag} pooler_output", got["pooled"], ref["pooled"])


def test_token_type_ids(hf_vilt):
    model, kwargs, params = hf_vilt
    ids, att = text_batch(1)
    types = np.random.default_rng(1).integers(0, 2, ids.shape).astype(np.int32)
    pixels = pixel_batch(SIZES[1], 1)
    ref = torch_vilt(model, ids, att, pixels, types)
    got = run_vilt(kwargs, params, ids, att, pixels, types)
    check("[vilt token types] last_hidden_state", got["sequence"], ref["sequence"])
    check("[vilt token types] pooler_output", got["pooled"], ref["pooled"])
    default = run_vilt(kwargs, params, ids, att, pixels)
    assert rel_err(default["sequence"], ref["sequence"]) > 1e-2   # the ids matter


def test_hf_random_patch_order_is_a_permutation_of_ours(hf_vilt):
    """HF's default behaviour (random patch order) equals ours up to that order."""
    model, kwargs, params = hf_vilt
    ids, att = text_batch(2)
    pixels = pixel_batch(SIZES[1], 2)
    perms = []
    ref = torch_vilt(model, ids, att, pixels, record=perms)
    got = run_vilt(kwargs, params, ids, att, pixels)
    assert len(perms) == 2 and any((p != np.arange(p.size)).any() for p in perms)
    start = TEXT + 1
    reordered = np.array(got["sequence"])
    for b, perm in enumerate(perms):
        reordered[b, start:] = reordered[b, start + perm]
    check("[vilt HF patch order] last_hidden_state", reordered, ref["sequence"])
    check("[vilt HF patch order] pooler_output", got["pooled"], ref["pooled"])


@pytest.mark.parametrize("collect", [(1,), (2, 1), (3,)])
def test_collect_matches_hidden_states_scanned_and_unrolled(hf_vilt, collect):
    model, kwargs, params = hf_vilt
    ids, att = text_batch(3)
    pixels = pixel_batch(SIZES[1], 3)
    ref = torch_vilt(model, ids, att, pixels, hidden=True)
    scanned = run_parts(kwargs, params, ids, att, pixels, collect)
    unrolled = run_parts(dict(kwargs, scan_layers=False), params, ids, att, pixels, collect)
    assert len(scanned["hidden"]) == len(collect)
    for i, layer in enumerate(collect):
        # hidden_states[0] holds the embeddings, [n] the output of layer n
        check(f"[vilt] hidden after layer {layer}", scanned["hidden"][i], ref["hidden"][layer])
        assert rel_err(scanned["hidden"][i], unrolled["hidden"][i]) <= 1e-6
        if layer < LAYERS:   # a wrong index would be caught
            assert rel_err(scanned["hidden"][i], ref["hidden"][layer + 1]) > 1e-2
    check("[vilt parts] last_hidden_state", scanned["tokens"], ref["sequence"])
    check("[vilt parts] pooler_output", scanned["pooled"], ref["pooled"])
    assert rel_err(scanned["tokens"], unrolled["tokens"]) <= 1e-6
    assert rel_err(scanned["pooled"], unrolled["pooled"]) <= 1e-6


def test_collect_out_of_range_is_refused(hf_vilt):
    _, kwargs, params = hf_vilt
    x = jnp.zeros((1, 3, 64))
    with pytest.raises(ValueError, match="collect"):
        nn_apply(ViLT(**kwargs), lambda m: m.encode(x, None, collect=(LAYERS + 1,)), params)


def test_position_grid_matches_torch_interpolate(hf_vilt):
    model, kwargs, params = hf_vilt
    table = model.embeddings.position_embeddings.detach()[0, 1:]   # (16, 64)
    grid = IMAGE // PATCH
    spatial = table.T.reshape(1, 64, grid, grid)
    for gh, gw in [(6, 5), (4, 4), (3, 7), (1, 2)]:
        ref = torch.nn.functional.interpolate(spatial, size=(gh, gw), mode="bilinear",
                                              align_corners=True)
        ref = ref.flatten(2).transpose(1, 2)[0].numpy()
        got = nn_apply(ViLT(**kwargs), lambda m: m.position_grid(gh, gw), params)
        assert got.shape == (gh * gw, 64)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6, err_msg=f"{gh}x{gw}")
    same = resize_align_corners(jnp.asarray(table.numpy().reshape(grid, grid, 64)), grid, grid)
    np.testing.assert_array_equal(same, table.numpy().reshape(grid, grid, 64))


def test_patch_embed_and_modality_embedding(hf_vilt):
    model, kwargs, params = hf_vilt
    pixels = pixel_batch((48, 40), 4)
    got = nn_apply(ViLT(**kwargs), lambda m: m.patch_embed(pixels), params)
    with torch.no_grad():
        ref = model.embeddings.patch_embeddings(
            torch.from_numpy(pixels.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    assert got.shape == (2, 6, 5, 64)
    check("[vilt] patch_embed", got, ref)
    for index in (0, 1):
        row = nn_apply(ViLT(**kwargs), lambda m: m.modality_embedding(index), params)
        np.testing.assert_array_equal(
            row, model.embeddings.token_type_embeddings.weight[index].detach().numpy())


def test_dropout_in_scanned_stack(hf_vilt):
    _, kwargs, params = hf_vilt
    model = ViLT(**dict(kwargs, dropout=0.1))
    ids, att = text_batch(5)
    pixels = pixel_batch(SIZES[0], 5)

    @jax.jit
    def run(p, key):
        return model.apply({"params": p}, ids, att, pixels, train=True,
                           rngs={"dropout": key})["sequence"]

    a, b = run(params, jax.random.key(0)), run(params, jax.random.key(1))
    assert np.isfinite(a).all() and rel_err(a, b) > 1e-3
    ref = run_vilt(kwargs, params, ids, att, pixels)["sequence"]
    assert rel_err(a, ref) > 1e-3


def test_vilt_normalise_is_exact():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    imagenet = ((raw - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)   # data/images.py
    got = np.asarray(vilt_normalise(jnp.asarray(imagenet)))
    want = (raw.astype(np.float64) - 0.5) / 0.5
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)   # float32 rounding only
    assert got.dtype == np.float32


def test_vilt_b32_preset_shapes():
    from magnet_jax.weights.vilt import abstract_params
    shapes = abstract_params(VILT_B32)
    assert shapes["embeddings"]["position_embeddings"].shape == (145, 768)
    assert shapes["embeddings"]["patch_embeddings"]["kernel"].shape == (32, 32, 3, 768)
    assert len(shapes["encoder"]) == 12
    assert vilt_kwargs_from_hf_config(transformers.ViltConfig().to_dict()) == VILT_B32


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_remat_gives_the_same_values_and_gradients(hf_vilt, scan):
    _, kwargs, params = hf_vilt
    ids, att = text_batch(6)
    pixels = pixel_batch(SIZES[0], 6)

    def loss(kw):
        model = ViLT(**dict(kwargs, scan_layers=scan, **kw))
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(
            model.apply({"params": p}, ids, att, pixels)["pooled"] ** 2)))(params)

    (v0, g0), (v1, g1) = loss({}), loss(dict(remat=True))
    assert abs(float(v0) - float(v1)) <= 1e-6 * abs(float(v0))
    # one scale for all leaves: some gradients are zero up to rounding (attention key biases)
    flat0, flat1 = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g0, g1))
    assert rel_err(flat1, flat0) <= 1e-6
