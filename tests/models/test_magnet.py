"""Whole-model properties of MagNet (no torch): shapes and parameter counts of the official
architecture (abstract, no FLOPs), a jitted forward of the CI-sized model (batch consistency,
the role of padding tokens, the dead class head), the language-PWAM mask quirk against a
float64 NumPy transcription, the final threshold, and source scans for GELU / LayerNorm.

magnet_architecture.md §1, §4.2–4.3, §7, §8, §9.6 and §12 risks 1, 2, 3, 19, 20, 29.
"""

from __future__ import annotations

import ast
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.models import build_model, ops
from magnet_jax.models.fusion import LanguageImageAttention, LanguagePWAM
from magnet_jax.models.magnet import binary_mask
from magnet_jax.models.presets import official_model_config, tiny_model_config
from tests.numerics import rel_err

MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "magnet_jax" / "models"
N = 20


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def fast_jit(fn):
    """jit with XLA's CPU backend optimisations off: the CI-sized MagNet then compiles in ~10 s
    instead of ~30 s on 2 cores. Numerics stay float32 with 'highest' matmul precision."""
    try:
        return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})
    except TypeError:  # a JAX without jit(compiler_options=...)
        return jax.jit(fn)


# --------------------------------------------------------------------------------------------
# (a) official architecture: shapes and parameter counts, abstractly
# --------------------------------------------------------------------------------------------

OFFICIAL_BUILT = 289_564_538  # 296,984,954 official − 7,420,930 dead + 514 class_embed
OFFICIAL_PER_MODULE = {
    "image_model": 150_668_664,
    "language_model": 120_898_560,
    "pixel_decoder": 3_588_864,
    "predictor": 14_408_450,
}


@pytest.mark.parametrize("size", [480, 448])
def test_official_shapes_and_parameter_count(size):
    model = build_model(official_model_config(size))
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, N), jnp.int32)
    out, variables = jax.eval_shape(
        lambda img, i, a: model.init_with_output(jax.random.PRNGKey(0), img, i, a), image, ids, ids
    )
    assert set(variables) == {"params"}
    params = nn.unbox(variables["params"])
    per_module = {k: count(v) for k, v in params.items()}
    print(f"[magnet] official {size}: {count(params):,} parameters {per_module}")
    assert per_module == OFFICIAL_PER_MODULE
    assert count(params) == OFFICIAL_BUILT == 296_984_954 - 7_420_930 + 514
    m = size // 4
    assert out["pred_masks"].shape == (1, 1, m, m)
    assert out["pred_logits"].shape == (1, 1, 2)
    assert len(out["aux_outputs"]) == 9
    for aux in out["aux_outputs"]:
        assert aux["pred_masks"].shape == (1, 1, m, m) and aux["pred_logits"].shape == (1, 1, 2)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    # dead official entries are not built (§9.6)
    im = params["image_model"]
    assert "res_gate" not in im["layers_3"] and "downsample" not in im["layers_3"]
    assert not any(k.startswith("norm") for k in im)
    lm = params["language_model"]
    assert {k for k in lm if k.startswith(("pwams_", "res_gates_"))} == {
        "pwams_0",
        "pwams_1",
        "pwams_2",
        "res_gates_0",
        "res_gates_1",
        "res_gates_2",
    }
    assert not any(k.startswith("norms") for k in lm) and "lang_proj" not in params


# --------------------------------------------------------------------------------------------
# (b) the CI-sized model under jit
# --------------------------------------------------------------------------------------------


def random_params(abstract, seed=0):
    """Random weights with trained-like scales for every leaf (norm scales ≈ 1, kernels
    ~ 1/√fan_in). Language res_gates are zero-initialised in the model (§10), which would switch
    the language-side fusion off; here they are random like everything else."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        z = rng.standard_normal(shape).astype(np.float32)
        if name.endswith("['scale']"):
            return 1.0 + 0.1 * z
        if name.endswith("['bias']"):
            return 0.1 * z
        if name.endswith("['kernel']"):
            fan_in = int(np.prod(shape[:-1]))
            return z / np.float32(math.sqrt(fan_in))
        if name.endswith("['embedding']"):
            return 0.5 * z
        return z * np.float32(0.5)  # level/query embeddings, bias tables

    return jax.tree_util.tree_map_with_path(fill, abstract)


def tiny_inputs():
    cfg = tiny_model_config()
    size = cfg.image_size
    rng = np.random.default_rng(1)
    image = rng.standard_normal((2, size, size, 3)).astype(np.float32)
    ids = np.zeros((2, N), np.int32)
    att = np.zeros((2, N), np.int32)
    ids[0, :6] = [101, 1996, 2417, 3899, 2006, 102]  # 6 real tokens, 14 padding
    att[0, :6] = 1
    ids[1] = rng.integers(1000, 5000, N)  # 20 real tokens (truncated sentence)
    att[1] = 1
    return image, ids, att


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_model_config()
    model = build_model(cfg)
    image, ids, att = tiny_inputs()
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, ids, att)
    params = random_params(nn.unbox(abstract))
    apply = fast_jit(model.apply)
    out = apply(params, image, ids, att)
    return dict(cfg=cfg, model=model, params=params, apply=apply, inputs=(image, ids, att), out=out)


def test_tiny_forward_finite(tiny):
    out = tiny["out"]
    cfg = tiny["cfg"]
    m = cfg.image_size // 4
    assert out["pred_masks"].shape == (2, 1, m, m)
    assert out["pred_logits"].shape == (2, 1, 2)
    assert len(out["aux_outputs"]) == cfg.decoder.num_layers
    for leaf in jax.tree.leaves(out):
        assert np.isfinite(np.asarray(leaf)).all()
    assert np.asarray(out["pred_masks"]).std() > 1e-3


def test_tiny_batch_consistency(tiny):
    """B = 1 vs the first sample of B = 2: nothing couples samples (§0, §12 risk 29)."""
    image, ids, att = tiny["inputs"]
    out1 = tiny["apply"](tiny["params"], image[:1], ids[:1], att[:1])
    out2 = tiny["out"]
    errs = {
        k: rel_err(np.asarray(out1[k]), np.asarray(out2[k])[:1])
        for k in ("pred_masks", "pred_logits")
    }
    errs["aux pred_masks"] = max(
        rel_err(np.asarray(a["pred_masks"]), np.asarray(b["pred_masks"])[:1])
        for a, b in zip(out1["aux_outputs"], out2["aux_outputs"])
    )
    print(f"[magnet] B=1 vs B=2 rel errs: {errs}")
    assert max(errs.values()) <= 1e-5, errs


def _change_padding_ids(ids, att):
    ids = ids.copy()
    ids[att == 0] = 1037  # any non-[PAD] id at padding positions (attention mask unchanged)
    return ids


def test_padding_ids_matter_in_official_mode(tiny):
    """With lang_pwam_mask='official' the language PWAM multiplies its queries by BERT's additive
    mask (0 / −10000, §4.3): padding tokens get huge queries and a near-hard argmax over pixels,
    and the token-axis InstanceNorm passes their result on to every real token. BERT computes the
    padding positions from their ids, so changing a padding id (attention mask unchanged) changes
    the prediction — by design, as in the official model."""
    image, ids, att = tiny["inputs"]
    out = tiny["apply"](tiny["params"], image, _change_padding_ids(ids, att), att)
    diff0 = rel_err(np.asarray(out["pred_masks"])[0], np.asarray(tiny["out"]["pred_masks"])[0])
    diff1 = rel_err(np.asarray(out["pred_masks"])[1], np.asarray(tiny["out"]["pred_masks"])[1])
    print(
        f"[magnet] official mode, padding ids changed: sample with padding rel diff {diff0:.3e}, "
        f"sample without padding {diff1:.3e}"
    )
    assert diff0 > 1e-3
    assert diff1 == 0.0  # the second sample has no padding: its ids did not change


def test_padding_ids_do_not_matter_in_binary_mode(tiny):
    """With the 0/1 mask ('binary' ablation), padding queries are 0, padding keys/values are
    masked everywhere and BERT's real tokens give padding keys weight exactly 0: padding ids have
    no influence at all."""
    cfg = tiny["cfg"].copy_and_resolve_references()
    cfg.fusion.lang_pwam_mask = "binary"
    model = build_model(cfg)
    apply = fast_jit(model.apply)
    image, ids, att = tiny["inputs"]
    ref = apply(tiny["params"], image, ids, att)
    out = apply(tiny["params"], image, _change_padding_ids(ids, att), att)
    diff = rel_err(np.asarray(out["pred_masks"]), np.asarray(ref["pred_masks"]))
    mode_diff = rel_err(np.asarray(ref["pred_masks"])[0], np.asarray(tiny["out"]["pred_masks"])[0])
    print(
        f"[magnet] binary mode, padding ids changed: rel diff {diff:.3e}; "
        f"binary vs official (sample with padding) {mode_diff:.3e}"
    )
    assert diff <= 1e-6
    assert mode_diff > 1e-3  # the two mask modes really differ


# Outside CI (pytest -m extended): ~3 min of one CI worker (an eager init, then a grad).
@pytest.mark.extended
@pytest.mark.parametrize("gate_init", ["zeros", "normal"])
def test_language_gate_init_decides_whether_language_fusion_trains(gate_init):
    """§10: the official language res_gates start at exactly zero. Both of their Dense layers
    are zero, so each one's gradient is multiplied by the other's weights: zero, forever. The
    language-side fusion then never switches on in training. lang_gate_init='normal' starts
    them at N(0, 0.02²) like the image-side gates, and they get gradients."""
    cfg = tiny_model_config(32)
    cfg.fusion.lang_pwam_mask = "binary"
    cfg.fusion.lang_gate_init = gate_init
    model = build_model(cfg)
    rng = np.random.default_rng(3)
    image = rng.standard_normal((1, 32, 32, 3)).astype(np.float32)
    ids = np.zeros((1, N), np.int32)
    ids[0, :6] = [101, 1996, 2417, 3899, 2006, 102]
    att = (ids > 0).astype(np.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), image, ids, att))

    def loss(p):
        return jnp.mean(jnp.square(model.apply(p, image, ids, att)["pred_masks"]))

    grads = fast_jit(jax.grad(loss))(params)
    gates = params["params"]["language_model"]
    gate_grads = grads["params"]["language_model"]
    names = sorted(k for k in gates if k.startswith("res_gates_"))
    assert len(names) == len(cfg.swin.depths) - 1  # inference build: the last fusion is unused
    weight = max(float(np.abs(gates[n][fc]["kernel"]).max()) for n in names for fc in ("fc1", "fc2"))
    grad = max(float(np.abs(gate_grads[n][fc]["kernel"]).max())
               for n in names for fc in ("fc1", "fc2"))
    print(f"[magnet] lang_gate_init={gate_init}: max |gate weight| {weight:.3e}, "
          f"max |gate grad| {grad:.3e}")
    if gate_init == "zeros":
        assert weight == 0.0 and grad == 0.0
    else:
        assert 0.01 < weight < 0.2 and grad > 1e-9


def test_unknown_language_gate_init_is_refused():
    cfg = tiny_model_config(32)
    cfg.fusion.lang_gate_init = "ones"
    image, ids, att = (np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, N), np.int32),
                       np.ones((1, N), np.int32))
    with pytest.raises(ValueError, match="lang_gate_init"):
        jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), image, ids, att)


def test_class_embed_does_not_change_masks(tiny):
    """§7: the class head has no path to the masks (random class_embed weights change only
    pred_logits)."""
    params = jax.tree.map(lambda x: x, tiny["params"])
    rng = np.random.default_rng(7)
    ce = params["params"]["predictor"]["class_embed"]
    params["params"]["predictor"]["class_embed"] = {
        k: (5.0 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in ce.items()
    }
    out = tiny["apply"](params, *tiny["inputs"])
    np.testing.assert_array_equal(
        np.asarray(out["pred_masks"]), np.asarray(tiny["out"]["pred_masks"])
    )
    for a, b in zip(out["aux_outputs"], tiny["out"]["aux_outputs"]):
        np.testing.assert_array_equal(np.asarray(a["pred_masks"]), np.asarray(b["pred_masks"]))
    assert not np.allclose(np.asarray(out["pred_logits"]), np.asarray(tiny["out"]["pred_logits"]))


# --------------------------------------------------------------------------------------------
# (c) the language-side PWAM quirk vs a float64 transcription of §4.2
# --------------------------------------------------------------------------------------------


def _gelu64(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))


def _in64(x, axis):
    mean = x.mean(axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def language_pwam_f64(p, words, x, e):
    """§4.2 in float64: words (B,N,D), x (B,L,Cv), e (B,N,1). Returns (out, top-2 logit gaps of
    the tokens with e != 0)."""

    def dense(name, v):
        return v @ p[name]["kernel"].astype(np.float64) + p[name]["bias"].astype(np.float64)

    att = p["image_lang_att"]
    words, x, e = (a.astype(np.float64) for a in (words, x, e))
    d = words.shape[-1]
    vis = _gelu64(dense("vis_project", words))
    q = (words @ att["f_query"]["kernel"] + att["f_query"]["bias"]) * e
    k = _in64(x @ att["f_key"]["kernel"] + att["f_key"]["bias"], axis=1)
    v = _in64(x @ att["f_value"]["kernel"] + att["f_value"]["bias"], axis=1)
    s = np.einsum("bnd,bld->bnl", q, k) * d**-0.5 + (1e4 * e - 1e4)
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("bnl,bld->bnd", a, v)
    lang = _in64(o @ att["W"]["kernel"] + att["W"]["bias"], axis=1)
    out = _gelu64(dense("project_mm", vis * lang))
    top2 = np.sort(s, -1)[..., -2:]
    gaps = (top2[..., 1] - top2[..., 0])[e[..., 0] != 0]
    return out, gaps


def _pwam_case(seed, d=16, cv=8, l=12):
    rng = np.random.default_rng(seed)
    lengths = [5, 1, 20]
    words = rng.standard_normal((3, N, d)).astype(np.float32)
    x = rng.standard_normal((3, l, cv)).astype(np.float32)
    att = np.zeros((3, N), np.float32)
    for b, n in enumerate(lengths):
        att[b, :n] = 1
    e = ((1.0 - att) * -10000.0)[..., None].astype(np.float32)  # BERT's additive mask
    module = LanguagePWAM(d)
    params = module.init(jax.random.PRNGKey(seed), words, x, e)["params"]
    params = nn.unbox(params)
    params = jax.tree.map(
        lambda v: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(np.float32), params
    )
    return module, params, words, x, e, att


def test_language_pwam_official_mask_vs_float64():
    module, params, words, x, e, att = _pwam_case(seed=0)
    ref, gaps = language_pwam_f64(params, words, x, e)
    # fp32 quantises the padding logits (~1e8) to multiples of 8; with top-2 gaps far above that,
    # both precisions pick the same winning pixel (a hard argmax)
    print(f"[magnet] language PWAM: smallest top-2 logit gap of a padding token {gaps.min():.1f}")
    assert gaps.min() > 100
    got = np.asarray(jax.jit(module.apply)({"params": params}, words, x, e))
    # 20 real tokens: every token has the same W output, so the token-axis variance is ~0 and
    # IN_tok amplifies fp32 rounding of the mean by 1/sqrt(1e-5) ≈ 316 (§4.3: lang ≈ 1e-6 instead
    # of ≈ 1e-15 in float64). Any float32 implementation (PyTorch's included) shows this, so the
    # bound for that sample is 1e-4 (measured ~1.4e-5); 1e-5 elsewhere.
    tols = {"5 real + 15 padding": 1e-5, "1 real + 19 padding": 1e-5, "20 real tokens": 1e-4}
    for b, (name, tol) in enumerate(tols.items()):
        err = rel_err(got[b], ref[b])
        print(f"[magnet] language PWAM official mask, {name}: rel err {err:.3e}")
        assert err <= tol, (name, err)
    # 20 real tokens: lang ≈ 0, so out ≈ GELU(bias of project_mm) for every token (§4.3)
    bias_only = _gelu64(np.asarray(params["project_mm"]["bias"], np.float64))
    assert rel_err(got[2], np.broadcast_to(bias_only, got[2].shape)) <= 1e-4


def test_language_pwam_real_tokens_have_zero_query():
    """Real tokens (e = 0) have Q ≡ 0: their attention over pixels is exactly uniform, so their
    attention output is the spatial mean of the instance-normalised values, whatever f_query is."""
    module, params, words, x, e, att = _pwam_case(seed=1)
    sub = LanguageImageAttention(words.shape[-1])
    sub_params = {"params": params["image_lang_att"]}
    _, state = sub.apply(sub_params, words, x, e, capture_intermediates=True)
    inter = state["intermediates"]
    value = ops.instance_norm(inter["f_value"]["__call__"][0], axis=1)  # (B, L, D)
    w_out = np.asarray(inter["W"]["__call__"][0])  # (B, N, D) before IN_tok
    w = params["image_lang_att"]["W"]
    expect = np.asarray(value.mean(axis=1, keepdims=True)) @ w["kernel"] + w["bias"]
    real = att == 1
    err = rel_err(w_out[real], np.broadcast_to(expect, w_out.shape)[real])
    print(f"[magnet] language PWAM: real-token attention output vs spatial mean, rel err {err:.3e}")
    assert err <= 1e-5
    # and f_query has no influence on a sentence without padding (all queries are 0)
    other = jax.tree.map(lambda v: v, params)
    other["image_lang_att"]["f_query"] = {
        k: np.random.default_rng(5).standard_normal(v.shape).astype(np.float32)
        for k, v in params["image_lang_att"]["f_query"].items()
    }
    full = slice(2, 3)  # the 20-real-token sample
    a = module.apply({"params": params}, words[full], x[full], e[full])
    b = module.apply({"params": other}, words[full], x[full], e[full])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# (d) the final threshold
# --------------------------------------------------------------------------------------------


def test_binary_mask_is_sigmoid_above_half():
    """§7: prediction = sigmoid(x) > 0.5 in float32, not x > 0: tiny positive logits round to
    sigmoid = 0.5 and are background."""
    logits = jnp.asarray([1e-8, -1e-8, 0.0, 1e-3, -1e-3, 5.0, -5.0], jnp.float32)
    got = np.asarray(binary_mask(logits))
    np.testing.assert_array_equal(got, [False, False, False, True, False, True, False])
    assert bool(binary_mask(jnp.float32(1e-8))) is False and bool(jnp.float32(1e-8) > 0) is True
    assert got.dtype == np.bool_


# --------------------------------------------------------------------------------------------
# (e) GELU / LayerNorm hygiene
# --------------------------------------------------------------------------------------------


def _model_sources():
    files = sorted(MODELS_DIR.glob("*.py"))
    assert files, MODELS_DIR
    return {f.name: f.read_text() for f in files}


def _parents(tree):
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    return parents


def _has_kw(call, name, value):
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def test_every_gelu_is_exact():
    """§8 / risk 2: Flax's gelu defaults to the tanh approximation. Every use of nn.gelu /
    jax.nn.gelu in the model sources (an AST scan, so comments and docstrings do not count) must
    be a call or a functools.partial with approximate=False; a bare `gelu` name must come from
    magnet_jax.models.layers."""
    offenders = []
    for name, src in _model_sources().items():
        tree = ast.parse(src)
        parents = _parents(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == "gelu" for a in node.names):
                if node.module != "magnet_jax.models.layers":
                    offenders.append(f"{name}:{node.lineno}: gelu imported from {node.module}")
            if not (isinstance(node, ast.Attribute) and node.attr == "gelu"):
                continue
            parent = parents.get(node)
            ok = (
                isinstance(parent, ast.Call)
                and _has_kw(parent, "approximate", False)
                and (
                    parent.func is node
                    or (
                        isinstance(parent.func, (ast.Attribute, ast.Name))
                        and getattr(parent.func, "attr", getattr(parent.func, "id", None))
                        == "partial"
                    )
                )
            )
            if not ok:
                offenders.append(f"{name}:{node.lineno}: {ast.unparse(parent or node)}")
    assert not offenders, offenders
    from magnet_jax.models import layers

    x = jnp.linspace(-4, 4, 101)
    np.testing.assert_array_equal(
        np.asarray(layers.gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False))
    )
    assert not np.allclose(
        np.asarray(layers.gelu(x)), np.asarray(jax.nn.gelu(x, approximate=True)), rtol=0, atol=1e-5
    )


def test_every_layer_norm_goes_through_layers_layer_norm():
    """§8 / risk 3: nn.LayerNorm defaults (eps 1e-6, fast variance) differ from PyTorch; only
    layers.layer_norm may construct one (AST scan of every call of a `LayerNorm`)."""
    offenders = []
    for name, src in _model_sources().items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == "LayerNorm" and name != "layers.py":
                    offenders.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom) and any(a.name == "LayerNorm" for a in node.names):
                offenders.append(f"{name}:{node.lineno}: imports LayerNorm")
    assert not offenders, offenders
    from magnet_jax.models import layers

    ln = layers.layer_norm(1e-5, name="x")
    assert ln.epsilon == 1e-5 and ln.use_fast_variance is False


def test_norm_epsilons_of_the_built_model():
    """Every norm the model builds, with its epsilon (§8): BERT LayerNorms 1e-12, pyramid channel
    LN 1e-6, GroupNorm 1e-5, every other LayerNorm 1e-5; two-pass variance everywhere."""
    from magnet_jax.models.fusion import ChannelLayerNorm

    cfg = tiny_model_config()
    model = build_model(cfg)
    image, ids, att = tiny_inputs()
    seen = {}

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name == "__call__" and isinstance(
            mod, (nn.LayerNorm, nn.GroupNorm, ChannelLayerNorm)
        ):
            path = "/".join(mod.scope.path)
            seen[path] = (type(mod).__name__, mod.epsilon, getattr(mod, "use_fast_variance", False))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), image, ids, att)
    assert seen
    by_kind = {}
    for path, (kind, eps, fast) in seen.items():
        assert not fast, path
        if path.startswith("language_model/"):
            expect = cfg.bert.layer_norm_eps
        elif kind == "ChannelLayerNorm":
            expect = 1e-6
        else:
            expect = 1e-5
        assert eps == expect, (path, kind, eps)
        by_kind.setdefault((kind, eps), 0)
        by_kind[(kind, eps)] += 1
    print(f"[magnet] norms of the tiny model: {by_kind}")
    assert cfg.bert.layer_norm_eps == 1e-12
    assert ("ChannelLayerNorm", 1e-6) in by_kind and ("GroupNorm", 1e-5) in by_kind
