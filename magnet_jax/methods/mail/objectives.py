"""MaIL's training objective (training_objectives.md §7.1, step 4): BCE + Dice on the one
stride-4 mask (§2 option B, no deep supervision), weights from the `loss` section.

`mail.drop_instances` (ours, default 0): the probability that an example's instance masks are
all marked invalid for the step, so the model also learns to segment without them (what the
Predictor does when it is given none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from magnet_jax.losses import segmentation_loss
from magnet_jax.methods.base import BASE_BATCH_KEYS, Objective

INSTANCE_KEYS = ("instance_masks", "instance_valid")


def settings(config: ml_collections.ConfigDict) -> dict:
    c = config.get("mail", ml_collections.ConfigDict())
    drop = float(c.get("drop_instances", 0.0))
    if not 0 <= drop <= 1:
        raise ValueError(f"mail.drop_instances must be in [0, 1], got {drop}")
    return dict(drop_instances=drop)


def make_objective(model, config: ml_collections.ConfigDict) -> Objective:
    from magnet_jax.methods.mail import dataset_kwargs
    seg = dict(config.loss.to_dict())
    if seg.get("class_weight", 0) > 0:
        raise ValueError("loss.class_weight must be 0 for MaIL: it predicts one mask")
    seg.pop("deep_supervision", None)   # one prediction: nothing deeper to supervise
    drop = settings(config)["drop_instances"]
    uses_instances = model.mask_tokens != "off"

    def loss_fn(params, batch, key):
        k_drop, k_dropout = jax.random.split(key)
        extra = {}
        if uses_instances:
            valid = batch["instance_valid"]
            if drop > 0:
                keep = jax.random.uniform(k_drop, (valid.shape[0], 1)) >= drop
                valid = valid * keep.astype(valid.dtype)
            extra = dict(instance_masks=batch["instance_masks"], instance_valid=valid)
        out = model.apply({"params": params}, batch["image"], batch["ids"], batch["att"],
                          train=True, rngs={"dropout": k_dropout}, **extra)
        total, metrics = segmentation_loss(out, batch["mask"], batch["weight"],
                                           deep_supervision=False, **seg)
        metrics = dict(metrics)
        if uses_instances:
            metrics["valid_instances"] = (jnp.sum(extra["instance_valid"] > 0)
                                          / extra["instance_valid"].shape[0])
        metrics["loss"] = total
        return total, metrics

    keys = BASE_BATCH_KEYS + (INSTANCE_KEYS if uses_instances else ())
    return Objective(loss_fn=loss_fn, batch_keys=keys,
                     data_kwargs=dataset_kwargs(config.model) if uses_instances else {},
                     summary=dict(mask_tokens=model.mask_tokens,
                                  num_instances=model.num_instances, drop_instances=drop,
                                  loss=seg.get("kind", "bce_dice")))
