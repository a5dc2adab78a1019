"""JMCELN's training objective (training_objectives.md §7.2, a reconstruction):
L = Σ_k w_k · L_seg(M_k, y) over the K stage predictions after PAN, w_k increasing in k
(default 0.5, 0.75, 1.0), with L_seg the shared segmentation loss (BCE + Dice by default)."""

from __future__ import annotations

import jax
import ml_collections

from magnet_jax.losses import segmentation_loss
from magnet_jax.methods.base import BASE_BATCH_KEYS, Objective
from magnet_jax.methods.jmceln.model import JMCELN


def stage_weights(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    weights = tuple(float(w) for w in config.jmceln.stage_weights)
    stages = int(config.model.jmceln.num_stages)
    if len(weights) != stages:
        raise ValueError(f"jmceln.stage_weights has {len(weights)} entries but "
                         f"model.jmceln.num_stages is {stages}")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"jmceln.stage_weights must be >= 0 and not all 0, got {weights}")
    return weights


def make_objective(model: JMCELN, config: ml_collections.ConfigDict) -> Objective:
    seg = dict(config.loss.to_dict())
    if seg.get("class_weight", 0) > 0:
        raise ValueError("loss.class_weight must be 0 for JMCELN: its stages predict masks only")
    if not seg.pop("deep_supervision", True):
        raise ValueError("loss.deep_supervision must stay True for JMCELN: every stage is "
                         "supervised (set jmceln.stage_weights to weigh them)")
    weights = stage_weights(config)

    def loss_fn(params, batch, key):
        k_drop, k_path = jax.random.split(key)
        out = model.apply({"params": params}, batch["image"], batch["ids"], batch["att"],
                          train=True, rngs={"dropout": k_drop, "droppath": k_path})
        total, metrics = segmentation_loss(out, batch["mask"], batch["weight"],
                                           deep_supervision=True, prediction_weights=weights,
                                           **seg)
        metrics["loss"] = total
        return total, metrics

    return Objective(loss_fn=loss_fn, batch_keys=BASE_BATCH_KEYS,
                     summary=dict(stages=len(weights), pan=config.model.jmceln.pan))
