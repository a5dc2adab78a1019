"""Generalised RIS on MagNet: the class head as a no-target head (loss target per example,
inference threshold, Predictor report) and the config errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import jmceln as jmceln_configs
from magnet_jax import methods
from magnet_jax.losses.segmentation import class_ce_per_sample, segmentation_loss
from magnet_jax.methods.base import (EMPTY_MASK_LOGIT, infer_from_pred_masks,
                                     infer_with_no_target, no_target_probability)
from magnet_jax.models import build_magnet, random_params
from tests.training.models import micro_model_config


def test_class_ce_takes_a_target_per_example():
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(0).standard_normal((5, 1, 2)).astype(np.float32)
    target = np.array([1, 0, 1, 0, 0])
    ours = class_ce_per_sample(jnp.asarray(logits), jnp.asarray(target))
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits[:, 0]),
                                            torch.from_numpy(target), reduction="none")
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
    # The int form is the old constant target.
    np.testing.assert_allclose(np.asarray(class_ce_per_sample(jnp.asarray(logits), 1)),
                               np.asarray(class_ce_per_sample(jnp.asarray(logits),
                                                              jnp.ones(5, jnp.int32))))


def test_segmentation_loss_trains_no_object_on_no_target_examples():
    rng = np.random.default_rng(1)
    b = 4
    outputs = dict(pred_masks=jnp.asarray(rng.standard_normal((b, 1, 4, 4)), jnp.float32),
                   pred_logits=jnp.asarray(rng.standard_normal((b, 1, 2)), jnp.float32),
                   aux_outputs=[])
    gt = jnp.asarray(rng.random((b, 8, 8)) < 0.3, jnp.uint8)
    weight = jnp.ones((b,), jnp.float32)
    no_target = jnp.asarray([0, 1, 0, 1], jnp.int32)
    _, with_nt = segmentation_loss(outputs, gt, weight, class_weight=2.0, no_target=no_target)
    _, without = segmentation_loss(outputs, gt, weight, class_weight=2.0)
    c = np.asarray(outputs["pred_logits"])[:, 0].astype(np.float64)
    lse = np.log(np.exp(c).sum(axis=1))
    expected = np.mean(lse - c[np.arange(b), 1 - np.asarray(no_target)])
    np.testing.assert_allclose(float(with_nt["loss_cls"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(without["loss_cls"]), np.mean(lse - c[:, 1]), rtol=1e-5)
    # All-zero flags are the ordinary objective.
    _, zeros = segmentation_loss(outputs, gt, weight, class_weight=2.0,
                                 no_target=jnp.zeros((b,), jnp.int32))
    np.testing.assert_allclose(float(zeros["loss_seg"]), float(without["loss_seg"]), rtol=1e-6)


class _FixedOutputs(nn.Module):
    """A stand-in model: fixed mask and class logits (what infer reads), a threshold."""
    masks: np.ndarray
    classes: np.ndarray
    no_target_threshold: float = 0.0

    @nn.compact
    def __call__(self, image, ids, att, train=False):
        scale = self.param("scale", nn.initializers.ones, ())
        return dict(pred_masks=scale * jnp.asarray(self.masks),
                    pred_logits=scale * jnp.asarray(self.classes))


def _fixed(threshold: float):
    rng = np.random.default_rng(2)
    masks = rng.standard_normal((3, 1, 4, 4)).astype(np.float32) + 2.0
    # p(no-object) = sigmoid(c0 - c1): 0.98, 0.5 (tie), 0.02.
    classes = np.array([[[2.0, -2.0]], [[0.0, 0.0]], [[-2.0, 2.0]]], np.float32)
    model = _FixedOutputs(masks, classes, threshold)
    params = {"scale": jnp.ones(())}
    inputs = (jnp.zeros((3, 16, 16, 3)), jnp.zeros((3, 4), jnp.int32),
              jnp.ones((3, 4), jnp.int32))
    return model, params, inputs


def test_threshold_empties_the_masks_the_head_calls_no_target():
    model, params, inputs = _fixed(0.6)
    logits, coarse, p_none = infer_with_no_target(model, params, *inputs, (16, 16))
    np.testing.assert_allclose(np.asarray(p_none), jax.nn.sigmoid(jnp.array([4.0, 0.0, -4.0])),
                               rtol=1e-6)
    assert np.all(np.asarray(logits[0]) == EMPTY_MASK_LOGIT)
    assert np.all(np.asarray(coarse[0]) == EMPTY_MASK_LOGIT)
    off_model, _, _ = _fixed(0.0)
    plain, plain_coarse = infer_from_pred_masks(off_model, params, *inputs, (16, 16))
    np.testing.assert_array_equal(np.asarray(logits[1:]), np.asarray(plain[1:]))
    np.testing.assert_array_equal(np.asarray(coarse[1:]), np.asarray(plain_coarse[1:]))
    # The default infer of a thresholded model is the same emptied output.
    np.testing.assert_array_equal(np.asarray(infer_from_pred_masks(model, params, *inputs,
                                                                   (16, 16))[0]),
                                  np.asarray(logits))
    # Threshold 0 = off: the head is computed but nothing is emptied.
    _, _, p_off = infer_with_no_target(off_model, params, *inputs, (16, 16))
    np.testing.assert_allclose(np.asarray(p_off), np.asarray(p_none))
    assert float(no_target_probability(dict(pred_logits=jnp.zeros((1, 1, 2))))[0]) == 0.5


def test_config_errors():
    cfg = micro_model_config()
    cfg.no_target_threshold = 1.0
    with pytest.raises(ValueError, match="model.no_target_threshold must be in"):
        build_magnet(cfg)
    other = jmceln_configs.get_config("tiny")
    other.model.no_target_threshold = 0.5
    with pytest.raises(methods.MethodError, match="'model.no_target_threshold' belongs to "
                                                  "method 'magnet'"):
        methods.check_config(other)


def test_predictor_reports_no_target():
    """The class head's bias forces the answer "no target": the Predictor reports it with an
    empty mask (the opposite case and the threshold's comparison are tested on infer above;
    one compile of the micro model is enough here)."""
    from magnet_jax.predict import Predictor, _no_target_fields

    cfg = micro_model_config()
    cfg.no_target_threshold = 0.5
    model = build_magnet(cfg)
    params = random_params(model, 32)
    head = params["predictor"]["class_embed"]
    head["kernel"] = jnp.zeros_like(head["kernel"])
    head["bias"] = jnp.asarray([8.0, -8.0], jnp.float32)        # p(no-object) = sigmoid(16)
    predictor = Predictor(cfg, params, max_batch=2)
    image = Image.fromarray(np.full((40, 48, 3), 120, np.uint8))
    for pred in predictor.predict(image, ["the red circle", "the blue square"]):
        assert pred.no_target is True and pred.no_target_probability > 0.99
        assert not pred.mask.any() and pred.score == 0.0
        assert _no_target_fields(pred) == {"no_target": True, "no_target_probability": 1.0}
    # Without the threshold there is no head to report (and no report).
    cfg.no_target_threshold = 0.0
    assert not Predictor(cfg, params, max_batch=2).has_no_target_head


@pytest.mark.parametrize("arg", ["grefcoco", "synthetic_gres"])
def test_gres_configs_train_the_head_and_threshold_it(arg):
    from configs import magnet as magnet_configs

    cfg = magnet_configs.get_config(arg)
    assert methods.check_config(cfg).name == "magnet"
    assert cfg.loss.class_weight > 0 and cfg.model.no_target_threshold == 0.5
    assert build_magnet(cfg.model).no_target_threshold == 0.5
    objective = methods.get_method("magnet").make_objective(build_magnet(cfg.model), cfg)
    assert "no_target" in objective.batch_keys
    if arg == "synthetic_gres":
        assert cfg.data.synthetic.gres and cfg.data.train_split == "gres_train"
    # The ordinary default reads no flags and keeps the head off.
    default = magnet_configs.get_config("synthetic")
    assert default.model.no_target_threshold == 0.0
    assert "no_target" not in methods.get_method("magnet").make_objective(
        build_magnet(default.model), default).batch_keys
