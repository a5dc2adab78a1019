"""CM-MaskSD through the method interface: the masking, the distillation losses and the
objective's branches; the train, restore, evaluate, export and predict paths on an 8-device
fsdp mesh and on 1 device; its config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cmmasksd as cmmasksd_configs
from configs import magnet as magnet_configs
from magnet_jax import evaluate, methods, restore, sharding
from magnet_jax import export as export_lib
from magnet_jax.data.images import IMAGENET_MEAN, IMAGENET_STD
from magnet_jax.methods.cmmasksd import masking
from magnet_jax.methods.cmmasksd.model import CLIP_MEAN, CLIP_STD, clip_normalise
from magnet_jax.methods.cmmasksd.objectives import distill_loss, make_objective
from magnet_jax.models import abstract_params, build_model
from magnet_jax.training import loop
from tests.methods.runs import micro_run_settings, one_device_losses
from tests.training.test_loop import (FAST, shared_data, train_losses,  # noqa: F401
                                      with_overrides)

STEPS = 3


def micro_cmmasksd_config(data_dir: str = "", **overrides):
    """configs/cmmasksd.py:tiny shrunk to a 32×32 input, 3 ViT layers and 1 decoder layer."""
    config = cmmasksd_configs.get_config("tiny")
    m = config.model
    m.image_size = 32
    m.clip.vision.update(dict(width=32, layers=3, heads=2, patch_size=8, output_dim=32))
    m.clip.text.update(dict(width=32, layers=1, heads=2, output_dim=32))
    m.cmmasksd.update(dict(feature_layers=(1, 2, 3), d_model=32, num_layers=1, num_heads=2,
                           ffn_dim=64))
    micro_run_settings(config, data_dir, STEPS, num_overlays=1)
    return with_overrides(config, overrides)


def one_device_mesh():
    return sharding.make_mesh(1, 1, jax.devices()[:1])


# --------------------------------------------------------------------------------------------
# Masking and losses (no model).

def test_word_positions_exclude_start_end_and_padding():
    ids = jnp.array([[605, 10, 11, 606, 0, 0], [605, 12, 606, 0, 0, 0]])
    att = (ids != 0).astype(jnp.int32).at[:, 0].set(1)
    np.testing.assert_array_equal(masking.word_positions(ids, att),
                                  [[0, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]])


def test_select_masks_the_top_ratio_of_valid_positions_per_example():
    scores = jnp.array([[0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0],
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]])
    valid = jnp.array([[True] * 10, [True] * 4 + [False] * 6])
    key = jax.random.key(0)
    chosen = np.asarray(masking.select(scores, valid, 0.3, key, "topk"))
    np.testing.assert_array_equal(np.flatnonzero(chosen[0]), [0, 3, 6])   # 3 of 10, the best
    np.testing.assert_array_equal(np.flatnonzero(chosen[1]), [3])         # 1 of 4 (>= 1)
    for strategy in ("sample", "random"):
        picked = np.asarray(masking.select(scores, valid, 0.3, key, strategy))
        assert picked.sum(axis=1).tolist() == [3, 1] and not picked[1, 4:].any()
        again = np.asarray(masking.select(scores, valid, 0.3, key, strategy))
        np.testing.assert_array_equal(picked, again)        # a function of the key
    draws = {tuple(np.flatnonzero(np.asarray(masking.select(
        scores, valid, 0.3, jax.random.key(k), "random"))[0])) for k in range(8)}
    assert len(draws) > 1
    assert not np.asarray(masking.select(scores, valid, 0.0, key)).any()
    with pytest.raises(ValueError, match="unknown cmmasksd.masking 'best'"):
        masking.select(scores, valid, 0.3, key, "best")


def test_correlation_guides_patches_to_the_words():
    """Patches that look like a real word score high; a padded word is ignored."""
    words = jnp.eye(4)[None, :3]                        # word 2 is padding below
    patches = jnp.stack([jnp.eye(4)[0], jnp.eye(4)[2], jnp.eye(4)[3]])[None]
    corr = masking.correlation(patches, words)
    valid_words = jnp.array([[True, False, False]])
    np.testing.assert_allclose(masking.patch_scores(corr, valid_words), [[1.0, 0.0, 0.0]],
                               atol=1e-6)
    np.testing.assert_allclose(masking.word_scores(corr), [[1.0, 0.0, 1.0]], atol=1e-6)


def test_distill_losses():
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32) for _ in range(2))
    weight = jnp.array([1.0, 1.0, 0.0])
    p = jax.nn.sigmoid(t)
    bce = -(p * jax.nn.log_sigmoid(s) + (1 - p) * jax.nn.log_sigmoid(-s))
    np.testing.assert_allclose(distill_loss(s, t, weight, "bce"), bce[:2].mean(), rtol=1e-5)
    np.testing.assert_allclose(distill_loss(s, t, weight, "mse"),
                               jnp.square(s - t)[:2].mean(), rtol=1e-5)
    assert abs(float(distill_loss(t, t, weight, "kl"))) < 1e-6       # 0 when the maps agree
    assert float(distill_loss(s, t, weight, "kl")) > 0
    g_bce = jax.grad(lambda x: distill_loss(x, t, weight, "bce"))(s)
    g_kl = jax.grad(lambda x: distill_loss(x, t, weight, "kl"))(s)
    np.testing.assert_allclose(g_bce, g_kl, atol=1e-7)            # same gradient
    assert not np.asarray(g_bce[2]).any()                          # weight 0: no gradient


def test_clip_normalisation_is_exact():
    raw = np.random.default_rng(1).random((1, 4, 4, 3)).astype(np.float32)
    imagenet = (raw - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(clip_normalise(jnp.asarray(imagenet)),
                               (raw - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD), atol=1e-5)


# --------------------------------------------------------------------------------------------
# The model and the objective.

def test_vit_b16_shapes_at_416():
    """eval_shape only: CRIS's stride-4 output and CLIP's joint-space tokens."""
    cfg = cmmasksd_configs.get_config("refcoco").model
    model = build_model(cfg)
    params = abstract_params(model, 416, max_tokens=17)
    assert {"clip_vision", "clip_text", "neck", "decoder", "projector", "patch_mask_token",
            "word_mask_token"} <= set(params)
    inputs = (jax.ShapeDtypeStruct((2, 416, 416, 3), np.float32),
              jax.ShapeDtypeStruct((2, 17), np.int32), jax.ShapeDtypeStruct((2, 17), np.int32))
    out = jax.eval_shape(lambda p, *x: model.apply({"params": p}, *x, return_clip_features=True),
                         params, *inputs)
    assert out["pred_masks"].shape == (2, 1, 104, 104)
    assert out["clip_patches"].shape == (2, 26 * 26, 512)
    assert out["clip_words"].shape == (2, 17, 512)


@pytest.fixture(scope="module")
def micro_model():
    cfg = micro_cmmasksd_config().model
    model = build_model(cfg)
    params = model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)),
                        jnp.zeros((2, 12), jnp.int32), jnp.ones((2, 12), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray([[605, 513, 546, 532, 606] + [0] * 7, [605, 513, 602, 567, 537, 606]
                       + [0] * 6], jnp.int32)
    att = (jnp.arange(12)[None] < jnp.array([[5], [6]])).astype(jnp.int32)
    mask = (rng.random((2, 32, 32)) > 0.5).astype(np.uint8)
    batch = dict(image=image, ids=ids, att=att, mask=jnp.asarray(mask),
                 weight=jnp.ones((2,), jnp.float32))
    return model, params, batch


def test_masks_replace_patches_and_words(micro_model):
    model, params, b = micro_model
    run = lambda **kw: model.apply({"params": params}, b["image"], b["ids"], b["att"],
                                   **kw)["pred_masks"]
    base = run()
    no_mask = run(patch_mask=jnp.zeros((2, 16), bool), word_mask=jnp.zeros((2, 12), bool))
    np.testing.assert_allclose(no_mask, base, atol=1e-6)
    patched = run(patch_mask=jnp.zeros((2, 16), bool).at[:, 5].set(True))
    worded = run(word_mask=jnp.zeros((2, 12), bool).at[:, 2].set(True))
    assert float(jnp.abs(patched - base).max()) > 1e-4
    assert float(jnp.abs(worded - base).max()) > 1e-4


def _objective(model, **section):
    config = micro_cmmasksd_config()
    config.cmmasksd.update(section)
    return make_objective(model, config)


def test_the_branches_distil_into_shared_weights(micro_model):
    """Both branches on: their losses are reported and the mask tokens (used only by the masked
    branches) get gradients; both off: no branch losses and no gradient on the mask tokens."""
    model, params, batch = micro_model
    key = jax.random.key(3)
    on = _objective(model)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(on.loss_fn, has_aux=True))(
        params, batch, key)
    assert {"loss_sd_vision", "loss_sd_language"} <= set(metrics)
    assert np.isfinite(float(loss)) and float(metrics["loss_sd_vision"]) > 0
    assert float(jnp.abs(grads["patch_mask_token"]).max()) > 0
    assert float(jnp.abs(grads["word_mask_token"]).max()) > 0
    np.testing.assert_allclose(loss, metrics["loss_seg"] + metrics["loss_sd_vision"]
                               + metrics["loss_sd_language"], rtol=1e-5)
    off = _objective(model, alpha=0.0, beta=0.0)
    (_, metrics_off), grads_off = jax.jit(jax.value_and_grad(off.loss_fn, has_aux=True))(
        params, batch, key)
    assert not {"loss_sd_vision", "loss_sd_language"} & set(metrics_off)
    assert not np.asarray(grads_off["patch_mask_token"]).any()
    np.testing.assert_allclose(metrics_off["loss_seg"], metrics["loss_seg"], rtol=1e-6)


def test_the_teacher_gets_no_gradient_from_distillation(micro_model):
    """With the segmentation loss weighted to 0, the gradient of the distillation alone equals
    the gradient through the student only (the teacher map is stop-gradient)."""
    model, params, batch = micro_model
    config = micro_cmmasksd_config(**{"loss.bce_weight": 0.0, "loss.dice_weight": 0.0})
    config.cmmasksd.update(dict(beta=0.0, masking="random"))
    objective = make_objective(model, config)
    key = jax.random.key(5)
    # Jitted: eager grads of the model run op by op (~2 min on 2 cores).
    grads = jax.jit(jax.grad(lambda p: objective.loss_fn(p, batch, key)[0]))(params)

    k_main, k_branch, k_patch, _ = jax.random.split(key, 4)

    def student_only(p):
        out = model.apply({"params": params}, batch["image"], batch["ids"], batch["att"],
                          train=True, return_clip_features=True, rngs={"dropout": k_main})
        corr = masking.correlation(out["clip_patches"], out["clip_words"])
        chosen = masking.select(corr[:, :, 0], jnp.ones(corr.shape[:2], bool), 0.3, k_patch,
                                "random")
        s = model.apply({"params": p}, batch["image"], batch["ids"], batch["att"], train=True,
                        patch_mask=chosen, word_mask=jnp.zeros((2, 12), bool),
                        rngs={"dropout": k_branch})["pred_masks"][:, 0]
        return distill_loss(s, out["pred_masks"][:, 0], batch["weight"])

    expected = jax.jit(jax.grad(student_only))(params)
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        # Two programs (one 2B batch vs two passes) sum in another order: float32 rounding of
        # ~1e-6 of the leaf's scale; a gradient through the teacher would be of its order.
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * max(float(np.abs(e).max()), 1.0))


def test_config_errors():
    config = micro_cmmasksd_config()
    config.cmmasksd.distill = "l1"
    with pytest.raises(ValueError, match="unknown cmmasksd.distill 'l1'"):
        make_objective(None, config)
    cfg = micro_cmmasksd_config().model
    cfg.cmmasksd.feature_layers = (1, 2, 9)
    with pytest.raises(ValueError, match=r"feature_layers \(1, 2, 9\) must name 3 layers in 1..3"):
        build_model(cfg)
    ref = cmmasksd_configs.get_config("refcoco")
    with pytest.raises(ValueError, match="model.clip.tokenizer is empty"):
        methods.get_method("cmmasksd").text_tokenizer(ref.model)
    magnet = magnet_configs.get_config("tiny")
    magnet.cmmasksd = ref.cmmasksd
    with pytest.raises(loop.ConfigError, match="'cmmasksd' belongs to method 'cmmasksd'"):
        loop.model_from_config(magnet)


# --------------------------------------------------------------------------------------------
# Through the framework.

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, shared_data):
    """STEPS steps of CM-MaskSD on the 8 devices as a (4, 2) data × fsdp mesh."""
    workdir = tmp_path_factory.mktemp("cmmasksd8")
    result = loop.train(micro_cmmasksd_config(shared_data), workdir, compiler_options=FAST)
    return workdir, result


@pytest.mark.slow
def test_trains_restores_and_evaluates(fsdp_run, tmp_path):
    workdir, result = fsdp_run
    assert result.stopped == "done" and result.step == STEPS
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss_sd_vision" in r for r in rows)
    overlays = list((workdir / "overlays").rglob("*.png"))
    assert overlays, "no overlay written"
    loaded = restore.load_model(workdir / loop.PARAMS_DIR, one_device_mesh())
    assert loaded.config.name == "cmmasksd"
    out = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "val", "--fsdp", "2",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["method"] == "cmmasksd" and report["threshold"] == 0.5
    for name in ("oIoU", "mIoU"):
        np.testing.assert_allclose(report["metrics"][name], result.eval_metrics[f"val/{name}"],
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.slow
# Outside CI (pytest -m extended): the 1-device = 8-device property is the framework's,
# checked in CI for MagNet (tests/training/test_step.py, test_loop.py).
@pytest.mark.extended
def test_one_device_run_gives_the_fsdp_losses(fsdp_run, shared_data, tmp_path):
    workdir8, _ = fsdp_run
    one = one_device_losses("tests.methods.test_cmmasksd:micro_cmmasksd_config", shared_data,
                            str(tmp_path / "one"))
    eight = train_losses(workdir8)
    np.testing.assert_allclose([one[1], one[2]], [eight[1], eight[2]], rtol=1e-5)


@pytest.mark.slow
def test_export_and_predictor_apply_the_threshold(fsdp_run):
    """The exported function and the Predictor give the method's logits, shifted by
    logit(mask_threshold); the Predictor tokenizes with CLIP's BPE."""
    workdir, _ = fsdp_run
    loaded = restore.load_model(workdir / loop.PARAMS_DIR, one_device_mesh())
    cfg = loaded.config
    method = methods.method_of(cfg)
    model = method.build_model(cfg)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    tokenizer = method.text_tokenizer(cfg)
    tokens = tokenizer.batch_encode(["the red circle", "the second star from the left"])
    ids, att = tokens.ids, tokens.attention_mask
    direct = jax.jit(lambda p, *x: method.infer(model, p, *x, (32, 32))[0])(
        loaded.params, image, ids, att)
    exported = export_lib.export_model(cfg, loaded.params)
    np.testing.assert_allclose(np.asarray(exported.call(loaded.params, image, ids, att)),
                               np.asarray(direct), atol=1e-5)
    from magnet_jax.predict import Predictor
    predictor = Predictor(cfg, loaded.params, max_batch=2)
    assert predictor.tokenizer.encode("the red circle").ids.tolist() == ids[0].tolist()
    logits = predictor._run(image, ids, att)[0]
    np.testing.assert_allclose(logits, np.asarray(direct), atol=1e-5)
    # CRIS's 0.35: the same raw logits, moved by logit(0.35) - logit(0.5).
    cfg.mask_threshold = 0.35
    shifted = jax.jit(lambda p, *x: method.infer(method.build_model(cfg), p, *x, (32, 32))[0])(
        loaded.params, image, ids, att)
    np.testing.assert_allclose(np.asarray(shifted) - np.asarray(direct),
                               -np.log(0.35 / 0.65), atol=1e-5)


def test_init_clip_loads_a_hugging_face_clip_into_the_towers(tmp_path):
    """init.clip: a Hugging Face CLIP directory fills clip_vision / clip_text (position
    tables resized / cut to the config), the rest stays fresh; a width mismatch names both."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from tests.models.test_clip import random_hf_clip
    model = random_hf_clip(patch_size=8)          # vision 48 wide, 3 layers, 32 px; text 32, 2
    model.save_pretrained(tmp_path / "clip", safe_serialization=True)
    config = micro_cmmasksd_config(str(tmp_path), **{"init.clip": str(tmp_path / "clip")})
    m = config.model
    m.image_size = 64                              # 8x8 grid: the 4x4 table is resized
    m.clip.vision.update(dict(width=48, layers=3, heads=4, output_dim=24, mlp_ratio=4.0))
    m.clip.text.update(dict(width=32, layers=2, heads=4, vocab_size=100, context_length=12,
                            output_dim=24, mlp_ratio=2.5))
    m.max_tokens = 12
    net = build_model(m)
    params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                          abstract_params(net, 64, max_tokens=12))
    mesh = one_device_mesh()
    shardings = jax.tree.map(lambda _: jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()), params)
    loaded = loop.load_pretrained(config, params, shardings)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(
        loaded["clip_text"]["token_embedding"]["embedding"],
        state["text_model.embeddings.token_embedding.weight"], rtol=1e-6)
    np.testing.assert_allclose(loaded["clip_text"]["position_embedding"]["embedding"],
                               state["text_model.embeddings.position_embedding.weight"][:12],
                               rtol=1e-6)
    assert loaded["clip_vision"]["position_embedding"]["embedding"].shape == (65, 48)
    assert float(np.abs(loaded["clip_vision"]["class_embedding"]).max()) > 0
    assert not np.asarray(loaded["patch_mask_token"]).any()      # not in the file: untouched
    m.clip.vision.width = 64
    m.clip.vision.heads = 4
    with pytest.raises(ValueError, match="vision width 48 does not match model.clip.vision.width 64"):
        loop.load_pretrained(config, params, shardings)
