"""MaIL through the method interface: the mask-token options, the decoder, the objective;
the train, restore, evaluate, export and predict paths on an 8-device fsdp mesh and on 1
device; its config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import magnet as magnet_configs
from configs import mail as mail_configs
from magnet_jax import evaluate, methods, restore, sharding
from magnet_jax import export as export_lib
from magnet_jax.methods.mail import mask_tokens as mt
from magnet_jax.methods.mail.decoder import level_strides
from magnet_jax.methods.mail.objectives import make_objective
from magnet_jax.models import abstract_params, build_model, init_params
from magnet_jax.training import loop
from tests.methods.runs import micro_run_settings, one_device_losses
from tests.training.test_loop import (FAST, shared_data, train_losses,  # noqa: F401
                                      with_overrides)

STEPS = 3
SIZE = 32


def micro_mail_config(data_dir: str = "", **overrides):
    """configs/mail.py:tiny (32×32, patch 8, 3 layers of width 32, K = 4)."""
    config = mail_configs.get_config("tiny")
    micro_run_settings(config, data_dir, STEPS, num_overlays=1)
    return with_overrides(config, overrides)


def one_device_mesh():
    return sharding.make_mesh(1, 1, jax.devices()[:1])


def random_instances(rng, batch: int, k: int, size: int = SIZE, num_valid: int = 2):
    masks = np.zeros((batch, k, size, size), np.uint8)
    valid = np.zeros((batch, k), np.int32)
    for b in range(batch):
        for i in range(num_valid):
            y, x = rng.integers(0, size - 8, 2)
            masks[b, i, y:y + 8, x:x + 8] = 1
            valid[b, i] = 1
    return masks, valid


# --------------------------------------------------------------------------------------------
# Mask tokens and decoder (no model).

def test_pooling_by_coverage_averages_the_covered_patches():
    masks = np.zeros((1, 2, 8, 8), np.uint8)
    masks[0, 0, :4, :4] = 1           # exactly patch 0 of a 2x2 grid
    masks[0, 1, :4, :] = 1            # patches 0 and 1
    cover = mt.patch_coverage(jnp.asarray(masks), (2, 2))
    np.testing.assert_allclose(cover, [[[1, 0, 0, 0], [1, 1, 0, 0]]])
    features = jnp.arange(4 * 3, dtype=jnp.float32).reshape(1, 4, 3)
    pooled = mt.pool_by_coverage(features, cover)
    np.testing.assert_allclose(pooled[0, 0], features[0, 0])
    np.testing.assert_allclose(pooled[0, 1], (features[0, 0] + features[0, 1]) / 2)
    empty = mt.pool_by_coverage(features, jnp.zeros((1, 1, 4)))
    np.testing.assert_array_equal(empty, 0)


def test_token_counts_and_level_strides():
    assert mt.num_mask_tokens("off", 16, 144) == 0
    assert mt.num_mask_tokens("pooled", 16, 144) == 16
    assert mt.num_mask_tokens("masked_image", 16, 144) == 16
    assert mt.num_mask_tokens("patch", 16, 144, "sum") == 144
    assert mt.num_mask_tokens("patch", 16, 144, "per_instance") == 16 * 144
    assert level_strides(32, 3) == (32, 16, 8)
    assert level_strides(8, 3) == (8, 4, 4)
    with pytest.raises(ValueError, match="power-of-two patch size >= 4, got 12"):
        level_strides(12, 3)


def test_vilt_b32_shapes_at_384():
    """The RefCOCO model: ViLT-B/32 at 384 px, 16 pooled instance tokens -> stride-4 masks."""
    cfg = mail_configs.get_config("refcoco").model
    model = build_model(cfg)
    k = cfg.mail.num_instances
    out = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), jnp.zeros((2, 384, 384, 3)), jnp.zeros((2, 20), jnp.int32),
            jnp.ones((2, 20), jnp.int32), instance_masks=jnp.zeros((2, k, 384, 384), jnp.uint8),
            instance_valid=jnp.ones((2, k), jnp.int32)))
    pred, variables = out
    assert pred["pred_masks"].shape == (2, 1, 96, 96)
    vilt = sum(np.prod(a.shape) for a in jax.tree.leaves(variables["params"]["vilt"]))
    assert 110e6 < vilt < 120e6    # ViLT-B/32's encoder (dandelin/vilt-b32-mlm: ~111 M + pooler)


# --------------------------------------------------------------------------------------------
# The model.

@pytest.fixture(scope="module")
def tiny_inputs():
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    ids = rng.integers(1000, 2000, (2, 20)).astype(np.int32)
    att = (np.arange(20)[None] < np.array([[7], [12]])).astype(np.int32)
    masks, valid = random_instances(rng, 2, 4)
    return image, ids * att, att, masks, valid


@pytest.mark.parametrize("kind,reduce", [("pooled", "sum"), ("masked_image", "sum"),
                                         ("patch", "sum"), ("patch", "per_instance")])
def test_invalid_instances_change_nothing_and_valid_ones_do(tiny_inputs, kind, reduce):
    image, ids, att, masks, valid = tiny_inputs
    cfg = micro_mail_config().model
    cfg.mail.update(dict(mask_tokens=kind, patch_reduce=reduce))
    model = build_model(cfg)
    params = init_params(model, SIZE)

    @jax.jit
    def run(p, m, v):
        return model.apply({"params": p}, image, ids, att, instance_masks=m,
                           instance_valid=v)["pred_masks"]

    with_none = jax.jit(lambda p: model.apply({"params": p}, image, ids, att)["pred_masks"])
    hidden = run(params, masks, np.zeros_like(valid))
    np.testing.assert_allclose(hidden, with_none(params), atol=1e-6)
    shown = run(params, masks, valid)
    assert np.abs(np.asarray(shown) - np.asarray(hidden)).max() > 1e-4


def test_off_has_no_mask_parameters_and_ignores_instances(tiny_inputs):
    image, ids, att, masks, valid = tiny_inputs
    cfg = micro_mail_config().model
    cfg.mail.mask_tokens = "off"
    model = build_model(cfg)
    params = abstract_params(model, SIZE)
    assert "mask_type_embedding" not in params and "mask_patch_embed" not in params
    assert methods.get_method("mail").extra_input_specs(cfg, SIZE) == {}


def test_objective_reads_instances_and_drop_hides_them(tiny_inputs):
    image, ids, att, masks, valid = tiny_inputs
    config = micro_mail_config()
    model = build_model(config.model)
    params = init_params(model, SIZE)
    mask = np.zeros((2, SIZE, SIZE), np.float32)
    mask[:, 8:16, 8:20] = 1
    batch = dict(image=image, ids=ids, att=att, mask=mask, weight=np.ones(2, np.float32),
                 instance_masks=masks, instance_valid=valid)
    objective = make_objective(model, config)
    assert objective.batch_keys[-2:] == ("instance_masks", "instance_valid")
    assert objective.data_kwargs["instances"].num == 4
    key = jax.random.key(1)
    grads, metrics = jax.jit(jax.grad(objective.loss_fn, has_aux=True))(params, batch, key)
    assert float(metrics["valid_instances"]) == 2.0
    assert float(jnp.abs(grads["mask_type_embedding"]).max()) > 0
    config.mail.drop_instances = 1.0
    dropped = make_objective(model, config)
    grads, metrics = jax.jit(jax.grad(dropped.loss_fn, has_aux=True))(params, batch, key)
    assert float(metrics["valid_instances"]) == 0.0
    np.testing.assert_array_equal(grads["mask_type_embedding"], 0)
    hidden = dict(batch, instance_valid=np.zeros_like(valid))
    loss_hidden, _ = jax.jit(objective.loss_fn)(params, hidden, key)
    loss_dropped, _ = jax.jit(dropped.loss_fn)(params, batch, key)
    np.testing.assert_allclose(loss_dropped, loss_hidden, rtol=1e-6)


def test_config_errors():
    cfg = micro_mail_config().model
    cfg.mail.feature_layers = (1, 2, 9)
    with pytest.raises(ValueError, match=r"feature_layers \(1, 2, 9\) must name 3 increasing "
                                         r"layers in 1..3"):
        build_model(cfg)
    cfg = micro_mail_config().model
    cfg.mail.mask_tokens = "boxes"
    with pytest.raises(ValueError, match="unknown model.mail.mask_tokens 'boxes'"):
        build_model(cfg)
    cfg = micro_mail_config().model
    cfg.image_size = 36
    with pytest.raises(ValueError, match="model.image_size 36 is not a multiple of "
                                         "model.vilt.patch_size 8"):
        build_model(cfg)
    config = micro_mail_config(**{"mail.drop_instances": 1.5})
    with pytest.raises(ValueError, match=r"mail.drop_instances must be in \[0, 1\], got 1.5"):
        make_objective(build_model(config.model), config)
    magnet = magnet_configs.get_config("tiny")
    magnet.mail = config.mail
    with pytest.raises(loop.ConfigError, match="'mail' belongs to method 'mail'"):
        loop.model_from_config(magnet)


def test_predictor_inputs_from_masks_at_the_image_size():
    cfg = micro_mail_config().model
    method = methods.get_method("mail")
    big = np.zeros((3, 50, 70), bool)
    big[0, :25, :35] = True
    big[1, 30:, :] = True             # big[2] stays empty: padding, as in the pipeline
    extra = method.host_extra_inputs(cfg, SIZE, list(big))
    assert extra["instance_masks"].shape == (4, SIZE, SIZE)
    np.testing.assert_array_equal(extra["instance_valid"], [1, 1, 0, 0])
    assert extra["instance_masks"][0, :16, :16].all() and not extra["instance_masks"][0, 16:].any()
    none = method.host_extra_inputs(cfg, SIZE, None)
    assert not none["instance_valid"].any()
    with pytest.raises(ValueError, match=r"instance mask 0 must be 2-D \(H, W\)"):
        method.host_extra_inputs(cfg, SIZE, [np.zeros((2, 3, 4))])


# --------------------------------------------------------------------------------------------
# Through the framework.

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, shared_data):
    """STEPS steps of MaIL on the 8 devices as a (4, 2) data × fsdp mesh, with the synthetic
    data's ground-truth instances."""
    workdir = tmp_path_factory.mktemp("mail8")
    result = loop.train(micro_mail_config(shared_data), workdir, compiler_options=FAST)
    return workdir, result


@pytest.mark.slow
def test_trains_restores_and_evaluates(fsdp_run, tmp_path):
    workdir, result = fsdp_run
    assert result.stopped == "done" and result.step == STEPS
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("train/valid_instances", 0) > 0 for r in rows)
    assert list((workdir / "overlays").rglob("*.png")), "no overlay written"
    loaded = restore.load_model(workdir / loop.PARAMS_DIR, one_device_mesh())
    assert loaded.config.name == "mail"
    out = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "val", "--fsdp", "2",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["method"] == "mail"
    for name in ("oIoU", "mIoU"):
        np.testing.assert_allclose(report["metrics"][name], result.eval_metrics[f"val/{name}"],
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.slow
# Outside CI (pytest -m extended): the 1-device = 8-device property is the framework's,
# checked in CI for MagNet (tests/training/test_step.py, test_loop.py).
@pytest.mark.extended
def test_one_device_run_gives_the_fsdp_losses(fsdp_run, shared_data, tmp_path):
    workdir8, _ = fsdp_run
    one = one_device_losses("tests.methods.test_mail:micro_mail_config", shared_data,
                            str(tmp_path / "one"))
    eight = train_losses(workdir8)
    np.testing.assert_allclose([one[1], one[2]], [eight[1], eight[2]], rtol=1e-5)


@pytest.mark.slow
def test_export_and_predictor_take_instance_masks(fsdp_run, tmp_path):
    """The exported function (with the two extra inputs) and the Predictor give the model's
    logits, with and without instance masks."""
    workdir, _ = fsdp_run
    loaded = restore.load_model(workdir / loop.PARAMS_DIR, one_device_mesh())
    cfg = loaded.config
    method = methods.method_of(cfg)
    model = method.build_model(cfg)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, SIZE, SIZE, 3)).astype(np.float32)
    ids = rng.integers(1000, 2000, (2, 20)).astype(np.int32)
    att = np.ones((2, 20), np.int32)
    masks, valid = random_instances(rng, 2, cfg.mail.num_instances)
    infer = jax.jit(lambda p, *x, **e: method.infer(model, p, *x, (SIZE, SIZE), **e)[0])
    direct = infer(loaded.params, image, ids, att, instance_masks=masks, instance_valid=valid)
    exported = export_lib.export_model(cfg, loaded.params)
    np.testing.assert_allclose(
        np.asarray(exported.call(loaded.params, image, ids, att, masks, valid)),
        np.asarray(direct), atol=1e-5)
    export_lib.save_export(tmp_path / "export", exported, loaded.params, cfg)
    from magnet_jax.serving import load_export
    served = load_export(tmp_path / "export")
    assert served.extra_names == ["instance_masks", "instance_valid"]
    np.testing.assert_allclose(served(image, ids, att, instance_masks=masks,
                                      instance_valid=valid), direct, atol=1e-5)
    from magnet_jax.predict import Predictor
    predictor = Predictor(cfg, loaded.params, max_batch=2)
    logits, _, _ = predictor._run(image, ids, att, {"instance_masks": masks,
                                                 "instance_valid": valid})
    np.testing.assert_allclose(logits, np.asarray(direct), atol=1e-5)
    without = infer(loaded.params, image, ids, att)
    logits, _, _ = predictor._run(image, ids, att, {
        k: np.stack([v] * 2) for k, v in predictor.extra_inputs(None).items()})
    np.testing.assert_allclose(logits, np.asarray(without), atol=1e-5)
    from PIL import Image
    pil = Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))
    inst = np.zeros((1, 40, 48), bool)
    inst[0, 5:20, 10:30] = True
    pred = predictor.predict(pil, "the red circle", instances=inst)
    assert pred.mask.shape == (40, 48)
    with pytest.raises(ValueError, match=r"instance mask 0 is \(10, 10\), the image is "
                                         r"\(40, 48\)"):
        predictor.predict(pil, "the red circle", instances=[np.zeros((10, 10), bool)])
