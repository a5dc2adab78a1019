"""The pure train step: every objective in one jit-compiled function with explicit shardings.

L = L_seg + λ_MG · L_MG + λ_CAL · L_CAL (training_objectives.md §6.1), computed in float32.
The train state is a plain pytree (step, params, opt_state); params hold the MagNet tree at
the root (the official layout, which the optimizer groups and the converter rely on) plus
the Mask Grounding head under `mask_grounding`. RNG = fold_in(key(seed), step), so a resumed
run draws the same dropout, drop-path and sampling bits; JAX partitions those bits with the
arrays, so 1 device and a sharded mesh draw the same ones (jax_stack.md §3.2).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from magnet_jax import sharding
from magnet_jax.losses import cal_loss, mask_grounding_loss, segmentation_loss
from magnet_jax.models import dummy_inputs
from magnet_jax.models.magnet import MagNet

MG_KEY = "mask_grounding"
BATCH_KEYS = ("image", "mask", "ids", "att", "weight")
MG_BATCH_KEYS = ("mg_ids", "mg_targets")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


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


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The MagNet part of the training params (what inference and checkpoints of the model use)."""
    return {k: v for k, v in params.items() if k != MG_KEY}


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
        variables = {"params": model_params(params)}
        # The masked sentence goes through the language path with the unmasked pass's visual
        # maps (mg.text_path = "shared_visual", training_objectives.md §3.3), batched with it.
        out = model.apply(variables, batch["image"], batch["ids"], batch["att"], train=True,
                          return_intermediates=True,
                          masked_ids=batch["mg_ids"] if objectives.uses_mg else None,
                          rngs={"dropout": k_drop, "droppath": k_path})
        total, metrics = segmentation_loss(out, batch["mask"], batch["weight"], **objectives.seg)
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


def _microbatches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """(B, ...) -> (k, B/k, ...) with microbatch j = examples j, j+k, ...: each microbatch
    takes an equal share of every device's rows, so all devices work on every microbatch."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} is not divisible into "
                             f"{k} microbatches (train.accumulation_steps)")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return {name: split(x) for name, x in batch.items()}


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, seed: int,
                    accumulation_steps: int = 1) -> Callable:
    """The pure step (state, batch) -> (state, metrics); metrics are global means.

    accumulation_steps k > 1 splits the batch into k microbatches, scans over them summing
    gradients (peak activation memory of one microbatch) and makes one update with the mean:
    the same update as the whole batch when every example has weight 1 (the losses are
    per-microbatch weighted means). Microbatch j draws its randomness from fold_in(key, j).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def gradients(params, batch, key):
        if accumulation_steps == 1:
            (_, metrics), grads = grad_fn(params, batch, key)
            return grads, metrics
        micro = _microbatches(batch, accumulation_steps)

        def body(acc, xs):
            j, mb = xs
            (_, m), g = grad_fn(params, mb, jax.random.fold_in(key, j))
            return jax.tree.map(jnp.add, acc, (g, m)), None

        zeros = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro),
                                               key))
        init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zeros[1], zeros[0][1]))
        (grads, metrics), _ = jax.lax.scan(body, init,
                                           (jnp.arange(accumulation_steps), micro))
        scale = 1.0 / accumulation_steps
        return jax.tree.map(lambda x: x * scale, grads), jax.tree.map(lambda x: x * scale, metrics)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        grads, metrics = gradients(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _mg_head_inputs(model: MagNet, image_size: int, max_tokens: int):
    """Dummy inputs of the Mask Grounding head with the model's shapes."""
    image_kwargs, text_kwargs = model.image_model_kwargs, model.language_model_kwargs
    stages = len(image_kwargs["depths"])
    side = image_size // (image_kwargs["patch_size"] * 2 ** (stages - 1))
    width = text_kwargs["hidden_size"]
    return (jnp.zeros((1, max_tokens, width)), jnp.ones((1, max_tokens), jnp.int32),
            jnp.zeros((1, side, side, image_kwargs["embed_dim"] * 2 ** (stages - 1))),
            jnp.zeros((1, image_size, image_size)),
            jnp.zeros((text_kwargs["vocab_size"], width)))


def abstract_train_state(model: MagNet, mg_head: nn.Module | None, make_tx: Callable[[Any], Any],
                         image_size: int, seed: int, mesh: Mesh, max_tokens: int = 20):
    """The train state's shapes and shardings, without computing it (no compilation).

    make_tx(abstract params) -> optax transformation (the groups depend on the tree).
    Returns (boxed_state: key -> boxed state, abstract state (ShapeDtypeStructs with their
    shardings), state_shardings, tx).
    """
    def boxed_params(key):
        k_model, k_head = jax.random.split(key)
        params = dict(model.init(k_model, *dummy_inputs(image_size, max_tokens))["params"])
        if mg_head is not None:
            params[MG_KEY] = mg_head.init(k_head, *_mg_head_inputs(model, image_size,
                                                                   max_tokens))["params"]
        return params

    key = jax.random.key(seed)
    # The optimiser groups only need the tree's paths and shapes.
    tx = make_tx(nn.unbox(jax.eval_shape(boxed_params, key)))

    def boxed_state(key):
        # The optimiser state is created from the boxed params, so its moments inherit the
        # parameters' logical annotations and are sharded like them (jax_stack.md §2.3).
        params = boxed_params(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        boxed = jax.eval_shape(boxed_state, key)
        shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.unbox(boxed), shardings)
    return boxed_state, abstract, shardings, tx


def init_train_state(model: MagNet, mg_head: nn.Module | None, make_tx: Callable[[Any], Any],
                     image_size: int, seed: int, mesh: Mesh, max_tokens: int = 20):
    """Create the sharded train state directly on the mesh (no replicated host copy).

    make_tx(abstract params) -> optax transformation (the groups depend on the tree).
    Returns (state, state_shardings, tx).
    """
    boxed_state, _, shardings, tx = abstract_train_state(model, mg_head, make_tx, image_size,
                                                         seed, mesh, max_tokens)
    state = jax.jit(lambda k: nn.unbox(boxed_state(k)),
                    out_shardings=shardings)(jax.random.key(seed))
    return state, shardings, tx


def jit_train_step(train_step: Callable, state_shardings: TrainState, mesh: Mesh,
                   compiler_options: dict | None = None) -> Callable:
    """jax.jit with explicit shardings: state as created, batch over the data axes, donated state.

    compiler_options go to XLA (tests use {"xla_backend_optimization_level": 0} to compile fast).
    """
    return jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0,
                   compiler_options=compiler_options)
