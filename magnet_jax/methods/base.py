"""The method interface: what a referring-segmentation method gives the framework.

A method is one folder under `magnet_jax/methods/` whose `__init__.py` defines `METHOD`, a
`Method`. Train, evaluate, predict, export, the Predictor, bench and restore reach the model,
its losses and its inference only through it (docs/methods.md).

Conventions every method keeps:
- its Linen module is called as `apply(variables, image, ids, att, train=False)` with image
  (B, S, S, 3) normalised, ids and att (B, N) int, and returns a dict whose `pred_masks`
  (B, Q, S/4, S/4) holds the final mask logits in query 0 (the default `infer` reads it);
- the train params are the model's params at the root plus one subtree per training-only
  head, under the head's name; inference and checkpoints of the model use the root part.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from magnet_jax.models.magnet import mask_logits_at

# The batch arrays every method receives (data/pipeline.py): image, GT mask, token ids, their
# attention mask and the example weight (0 = padding).
BASE_BATCH_KEYS = ("image", "mask", "ids", "att", "weight")


# Mask logit written where the no-target head says "no target": sigmoid 0, an empty mask.
EMPTY_MASK_LOGIT = -1e4


def no_target_probability(outputs: Mapping[str, Any]) -> jax.Array:
    """(B,) probability that the sentence refers to nothing: the class head's no-object
    softmax of query 0 (class 0 = no-object, 1 = object; training_objectives.md §2.2)."""
    return jax.nn.softmax(outputs["pred_logits"][:, 0].astype(jnp.float32), axis=-1)[:, 0]


def infer_with_no_target(model: nn.Module, params: Any, image: jax.Array, ids: jax.Array,
                         att: jax.Array, size: tuple[int, int], **extra_inputs: jax.Array
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`infer_from_pred_masks` plus the (B,) no-target probability of a model with a class
    head; where it exceeds the model's `no_target_threshold` (> 0: generalised RIS), both
    logit maps are emptied (EMPTY_MASK_LOGIT)."""
    outputs = model.apply({"params": params}, image, ids, att, train=False, **extra_inputs)
    logits, coarse = mask_logits_at(outputs, size), outputs["pred_masks"][:, 0].astype(jnp.float32)
    p_none = no_target_probability(outputs)
    threshold = float(getattr(model, "no_target_threshold", 0.0))
    if threshold > 0:
        none = (p_none > threshold)[:, None, None]
        logits = jnp.where(none, EMPTY_MASK_LOGIT, logits)
        coarse = jnp.where(none, EMPTY_MASK_LOGIT, coarse)
    return logits, coarse, p_none


def infer_from_pred_masks(model: nn.Module, params: Any, image: jax.Array, ids: jax.Array,
                          att: jax.Array, size: tuple[int, int],
                          **extra_inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> ((B, *size) float32 mask logits, (B, S/4, S/4) float32 stride-4 logits): query 0 of
    `pred_masks`, upsampled bilinearly with align_corners=True (the official evaluation).
    `extra_inputs`: the method's optional model inputs (Method.extra_inputs), by keyword.
    A model with `no_target_threshold` > 0 gives empty masks where its no-target head says
    "no target" (`infer_with_no_target`)."""
    if float(getattr(model, "no_target_threshold", 0.0)) > 0:
        return infer_with_no_target(model, params, image, ids, att, size, **extra_inputs)[:2]
    outputs = model.apply({"params": params}, image, ids, att, train=False, **extra_inputs)
    return mask_logits_at(outputs, size), outputs["pred_masks"][:, 0].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Objective:
    """A method's training objective for one run (built from the whole config)."""
    # (params, batch, key) -> (scalar loss, metrics dict); params = model params + heads.
    loss_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]
    # The batch arrays loss_fn reads: BASE_BATCH_KEYS plus the method's own.
    batch_keys: tuple[str, ...] = BASE_BATCH_KEYS
    # The training-only heads' names (train-params keys) and key -> {name: boxed params}.
    head_names: tuple[str, ...] = ()
    init_heads: Callable[[jax.Array], dict] = lambda key: {}
    # Extra keyword arguments of data.pipeline.train_dataset (e.g. the token masking of MG).
    data_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # What the bench and the logs report about this objective (e.g. which losses are on).
    summary: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def model_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The model part of a train-params tree: everything but the training-only heads."""
        return {k: v for k, v in params.items() if k not in self.head_names}


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    # The `model` config section -> the Linen module (inference and training).
    build_model: Callable[[ml_collections.ConfigDict], nn.Module]
    # (model, the whole config) -> Objective.
    make_objective: Callable[[nn.Module, ml_collections.ConfigDict], Objective]
    # Top-level config sections and `model.<section>`s that only this method reads: another
    # method's config holding them is an error (methods.check_config).
    config_sections: tuple[str, ...] = ()
    model_sections: tuple[str, ...] = ()
    # (model, params, image, ids, att, size, **extra inputs) -> (logits at size, stride-4
    # logits).
    infer: Callable[..., tuple[jax.Array, jax.Array]] = infer_from_pred_masks
    # Optional model inputs beyond (image, ids, att), passed by keyword to the module and to
    # `infer` (e.g. MaIL's instance masks): (model config, input size) -> {name: (shape
    # without the batch, numpy dtype)}. The module must accept their absence (None): what it
    # then does is `extra_inputs_note`. Batches of evaluate / train carry them under `name`.
    extra_inputs: Callable[[Any, int], dict[str, tuple[tuple[int, ...], Any]]] | None = None
    extra_inputs_note: str = ""
    # (model config, input size, what the user gave or None) -> {name: one example's array}:
    # the Predictor's conversion of user input (e.g. masks at the original image size).
    host_extra_inputs: Callable[..., dict[str, Any]] | None = None
    # (model config) -> keyword arguments of data.pipeline's train and eval datasets that
    # produce the extra inputs (e.g. instances=InstanceSpec(...)).
    dataset_kwargs: Callable[[Any], dict] | None = None
    # (model config, path or None) -> the host tokenizer of the text input (encode,
    # batch_encode, decode); path None = the config's own. None = the records' stored BERT ids
    # and the bundled BERT vocabulary (data/tokenizer.py).
    make_tokenizer: Callable[..., Any] | None = None
    # What an exported model's metadata says about its ids and tokenizer, when make_tokenizer
    # is set: (ids note, tokenizer note).
    text_notes: tuple[str, str] | None = None
    # (the whole config) -> {top-level module name: params} from the method's own `init.*`
    # weights (e.g. CLIP's), overlaid on the fresh params at the start of training.
    import_pretrained: Callable[[ml_collections.ConfigDict], dict] | None = None
    # Generalised RIS: (model, params, image, ids, att, size, **extra inputs) -> (logits at
    # size, stride-4 logits, (B,) probability of "no target"), for methods with a no-target
    # head (the `model.no_target_threshold` switch); None = the method has none.
    infer_no_target: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] | None = None

    def extra_input_specs(self, model_cfg, size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{name: (shape without batch, dtype)} of the optional model inputs; {} for none."""
        return {} if self.extra_inputs is None else dict(self.extra_inputs(model_cfg, size))

    def data_kwargs(self, model_cfg) -> dict:
        """Keyword arguments of the train / eval datasets for this method's extra inputs."""
        return {} if self.dataset_kwargs is None else dict(self.dataset_kwargs(model_cfg))

    def text_tokenizer(self, model_cfg, path: str | None = None):
        """The tokenizer of this method's text input; None when the records' ids are used."""
        return None if self.make_tokenizer is None else self.make_tokenizer(model_cfg, path)
