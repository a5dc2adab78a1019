"""MagNet's training objective: L = L_seg + λ_MG · L_MG + λ_CAL · L_CAL
(training_objectives.md §6.1), computed in float32.

The Mask Grounding head is a training-only head stored in the train params under MG_KEY; the
token masking it needs runs in the data pipeline (data/token_masking.py) and adds the batch
keys MG_BATCH_KEYS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from magnet_jax.data.token_masking import MaskTokens
from magnet_jax.losses import segmentation_loss
from magnet_jax.methods.base import BASE_BATCH_KEYS, Objective
from magnet_jax.methods.magnet.alignment_loss import cal_loss
from magnet_jax.methods.magnet.mask_grounding_head import MaskGroundingHead
from magnet_jax.methods.magnet.mask_grounding_loss import mask_grounding_loss
from magnet_jax.models.magnet import MagNet

MG_KEY = "mask_grounding"
MG_BATCH_KEYS = ("mg_ids", "mg_targets")
# With the class term on (loss.class_weight > 0), the class head learns "no target" from the
# batch's no_target flags (generalised RIS; all 0 on ordinary REFER data).
NO_TARGET_KEY = "no_target"


@dataclasses.dataclass(frozen=True)
class Objectives:
    """Which losses run and their weights (the `loss`, `mg` and `cal` config sections)."""
    seg: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # segmentation_loss kwargs
    mg_weight: float = 0.5                                             # 0 turns Mask Grounding off
    cal_weight: float = 0.5                                            # 0 turns CAL off
    cal: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # cal_loss kwargs
    mg_max_predictions: int = 0        # > 0: vocabulary logits at this many selected positions

    @property
    def uses_mg(self) -> bool:
        return self.mg_weight > 0

    @property
    def uses_cal(self) -> bool:
        return self.cal_weight > 0


def selected_positions(targets: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(B, N) targets (−1 = not selected) -> the first k selected positions of each row and
    their targets; rows with fewer are padded with position 0 and target −1 (ignored), and
    selections past the k-th are dropped (BERT's max_predictions_per_seq)."""
    k = min(int(k), targets.shape[1])
    order = jnp.argsort(jnp.where(targets >= 0, 0, 1), axis=1, stable=True)[:, :k]
    picked = jnp.take_along_axis(targets, order, axis=1)
    return jnp.where(picked >= 0, order, 0), picked


def make_loss_fn(model: MagNet, mg_head: nn.Module | None, objectives: Objectives) -> Callable:
    """(params, batch, key) -> (total loss, metrics); batch arrays have a leading batch axis."""
    if objectives.uses_mg and mg_head is None:
        raise ValueError("Mask Grounding is on (mg.weight > 0) but no Mask Grounding head was given")
    if (objectives.uses_mg or objectives.uses_cal) and not model.training_heads:
        raise ValueError("Mask Grounding and CAL need model.training_heads=True")

    def loss_fn(params, batch, key):
        k_drop, k_path, k_mg, k_cal = jax.random.split(key, 4)
        variables = {"params": {k: v for k, v in params.items() if k != MG_KEY}}
        # The masked sentence goes through the language path with the unmasked pass's visual
        # maps (mg.text_path = "shared_visual", training_objectives.md §3.3), batched with it.
        out = model.apply(variables, batch["image"], batch["ids"], batch["att"], train=True,
                          return_intermediates=True,
                          masked_ids=batch["mg_ids"] if objectives.uses_mg else None,
                          rngs={"dropout": k_drop, "droppath": k_path})
        total, metrics = segmentation_loss(out, batch["mask"], batch["weight"],
                                           no_target=batch.get(NO_TARGET_KEY), **objectives.seg)
        inter = out["intermediates"]
        if objectives.uses_mg:
            text = inter["masked_text_final"]
            embedding = variables["params"]["language_model"]["embeddings"]["word_embeddings"]
            positions, targets = None, batch["mg_targets"]
            if objectives.mg_max_predictions > 0:
                positions, targets = selected_positions(targets, objectives.mg_max_predictions)
            logits = mg_head.apply({"params": params[MG_KEY]}, text, batch["att"],
                                   inter["features"][-1], batch["mask"], embedding["embedding"],
                                   deterministic=False, positions=positions,
                                   rngs={"dropout": k_mg})
            loss_mg, mg_metrics = mask_grounding_loss(logits, targets, batch["weight"])
            total = total + objectives.mg_weight * loss_mg
            metrics.update(mg_metrics)
        if objectives.uses_cal:
            # Sentence embedding: lang_proj of the [CLS] state of the final language features.
            loss_cal, cal_metrics = cal_loss(inter["mask_features"], inter["text_projected"][:, 0],
                                             batch["mask"], batch["weight"], k_cal, **objectives.cal)
            total = total + objectives.cal_weight * loss_cal
            metrics.update(cal_metrics)
        metrics["loss"] = total
        return total, metrics

    return loss_fn


def mg_head_inputs(model: MagNet, image_size: int, max_tokens: int):
    """Dummy inputs of the Mask Grounding head with the model's shapes."""
    image_kwargs, text_kwargs = model.image_model_kwargs, model.language_model_kwargs
    stages = len(image_kwargs["depths"])
    side = image_size // (image_kwargs["patch_size"] * 2 ** (stages - 1))
    width = text_kwargs["hidden_size"]
    return (jnp.zeros((1, max_tokens, width)), jnp.ones((1, max_tokens), jnp.int32),
            jnp.zeros((1, side, side, image_kwargs["embed_dim"] * 2 ** (stages - 1))),
            jnp.zeros((1, image_size, image_size)),
            jnp.zeros((text_kwargs["vocab_size"], width)))


def head_initializer(model: MagNet, mg_head: nn.Module | None, image_size: int,
                     max_tokens: int) -> Callable[[jax.Array], dict]:
    """key -> {MG_KEY: boxed head params}, or {} without a head."""
    def init_heads(key):
        if mg_head is None:
            return {}
        return {MG_KEY: mg_head.init(key, *mg_head_inputs(model, image_size,
                                                          max_tokens))["params"]}
    return init_heads


def mask_grounding_head(config: ml_collections.ConfigDict) -> MaskGroundingHead | None:
    """The Mask Grounding head of the `mg` section (None when mg.weight is 0)."""
    if config.mg.weight <= 0:
        return None
    dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
    return MaskGroundingHead(num_heads=config.mg.num_heads, intermediate=config.mg.intermediate,
                             depth=config.mg.depth, mask_encoder=config.mg.mask_encoder,
                             dropout=config.mg.dropout, dtype=dtype)


def objectives_from_config(config: ml_collections.ConfigDict) -> Objectives:
    cal = dict(config.cal.to_dict())
    cal_weight = cal.pop("weight")
    return Objectives(seg=dict(config.loss.to_dict()), mg_weight=float(config.mg.weight),
                      cal_weight=float(cal_weight), cal=cal,
                      mg_max_predictions=int(config.mg.max_predictions))


def make_objective(model: MagNet, config: ml_collections.ConfigDict) -> Objective:
    objectives = objectives_from_config(config)
    head = mask_grounding_head(config)
    data_kwargs = {}
    if objectives.uses_mg:
        data_kwargs["mask_tokens"] = MaskTokens(
            p_select=config.mg.p_select, p_mask=config.mg.p_mask, p_random=config.mg.p_random,
            min_selected=config.mg.min_selected, vocab_size=config.model.bert.vocab_size)
    return Objective(
        loss_fn=make_loss_fn(model, head, objectives),
        batch_keys=(BASE_BATCH_KEYS + (MG_BATCH_KEYS if objectives.uses_mg else ())
                    + ((NO_TARGET_KEY,) if objectives.seg.get("class_weight", 0) > 0 else ())),
        head_names=(MG_KEY,) if head is not None else (),
        init_heads=head_initializer(model, head, int(config.model.image_size),
                                    int(config.model.max_tokens)),
        data_kwargs=data_kwargs,
        summary=dict(mg=objectives.uses_mg, cal=objectives.uses_cal))
