"""The pure train step of any method: its loss function (methods/<name>/, `Objective.loss_fn`)
differentiated and applied in one jit-compiled function with explicit shardings.

The train state is a plain pytree (step, params, opt_state); params hold the model's tree at
the root (for MagNet the official layout, which the optimizer groups and the converter rely
on) plus each training-only head under its name (MagNet: `mask_grounding`); with a
`StackedLayout` the groups the model scans over are stored stacked (training/layout.py).
RNG = fold_in(key(seed), step), so a resumed run draws the same dropout, drop-path and sampling
bits; JAX partitions those bits with the arrays, so 1 device and a sharded mesh draw the same
ones (jax_stack.md §3.2).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from magnet_jax import sharding
from magnet_jax.models import dummy_inputs
from magnet_jax.training.layout import StackedLayout
from magnet_jax.training.optimizer import global_norm


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


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
                    accumulation_steps: int = 1, flat_global_norm: bool = False,
                    layout: StackedLayout | None = None) -> Callable:
    """The pure step (state, batch) -> (state, metrics); metrics are global means.

    layout: the parameters are stored stacked (training/layout.py); the loss sees them per
    layer.

    flat_global_norm: the grad_norm metric as one reduction (optimizer.global_norm); only
    where the parameters are replicated.

    accumulation_steps k > 1 splits the batch into k microbatches, scans over them summing
    gradients (peak activation memory of one microbatch) and makes one update with the mean:
    the same update as the whole batch when every example has weight 1 (the losses are
    per-microbatch weighted means). Microbatch j draws its randomness from fold_in(key, j).
    """
    if layout:
        per_layer_loss = loss_fn

        def loss_fn(params, batch, key):
            return per_layer_loss(layout.unstack_in_graph(params), batch, key)

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
        metrics = dict(metrics, grad_norm=global_norm(grads, flat_global_norm))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _boxed_params(model: nn.Module, init_heads: Callable[[jax.Array], dict] | None,
                  image_size: int, max_tokens: int, key: jax.Array) -> dict:
    """The per-layer parameter tree with its logical annotations (model + training heads)."""
    k_model, k_head = jax.random.split(key)
    params = dict(model.init(k_model, *dummy_inputs(image_size, max_tokens))["params"])
    if init_heads is not None:
        params.update(init_heads(k_head))
    return params


def abstract_boxed_params(model: nn.Module, init_heads: Callable[[jax.Array], dict] | None,
                          image_size: int, seed: int, max_tokens: int = 20) -> dict:
    """The per-layer parameter tree of the train state as ShapeDtypeStructs in their logical
    annotations (one trace of the init; pass it on to `abstract_train_state` and
    `init_train_state` to spare them another)."""
    return jax.eval_shape(lambda k: _boxed_params(model, init_heads, image_size, max_tokens, k),
                          jax.random.key(seed))


def abstract_params(model: nn.Module, init_heads: Callable[[jax.Array], dict] | None,
                    image_size: int, seed: int, max_tokens: int = 20) -> dict:
    """ShapeDtypeStructs of the per-layer parameter tree of the train state (no shardings)."""
    return nn.unbox(abstract_boxed_params(model, init_heads, image_size, seed, max_tokens))


def abstract_train_state(model: nn.Module, init_heads: Callable[[jax.Array], dict] | None,
                         make_tx: Callable[[Any], Any], image_size: int, seed: int, mesh: Mesh,
                         max_tokens: int = 20, layout: StackedLayout | None = None,
                         boxed_params: dict | None = None):
    """The train state's shapes and shardings, without computing it (no compilation).

    init_heads(key) -> {name: boxed params} of the objective's training-only heads (None: none).
    make_tx(abstract params) -> optax transformation (the groups depend on the tree).
    layout: store the parameters (and so the optimiser's moments) stacked
    (training/layout.py); make_tx then receives the stacked tree.
    boxed_params: `abstract_boxed_params` of the same arguments, if the caller has it.
    Returns (boxed_state: key -> boxed state, abstract state (ShapeDtypeStructs with their
    shardings), state_shardings, tx).
    """
    layout = layout or StackedLayout()
    if boxed_params is None:
        boxed_params = abstract_boxed_params(model, init_heads, image_size, seed, max_tokens)
    boxed_params = layout.stack(boxed_params)
    # The optimiser groups only need the tree's paths and shapes.
    tx = make_tx(nn.unbox(boxed_params))

    def state_of(params):
        # The optimiser state is created from the boxed params, so its moments inherit the
        # parameters' logical annotations and are sharded like them (jax_stack.md §2.3).
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def boxed_state(key):
        return state_of(layout.stack(_boxed_params(model, init_heads, image_size, max_tokens,
                                                   key)))

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        boxed = jax.eval_shape(state_of, boxed_params)
        shardings = sharding.logical_shardings(boxed, mesh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            nn.unbox(boxed), shardings)
    return boxed_state, abstract, shardings, tx


def init_train_state(model: nn.Module, init_heads: Callable[[jax.Array], dict] | None,
                     make_tx: Callable[[Any], Any], image_size: int, seed: int, mesh: Mesh,
                     max_tokens: int = 20, layout: StackedLayout | None = None,
                     boxed_params: dict | None = None):
    """Create the sharded train state directly on the mesh (no replicated host copy).

    make_tx(abstract params) -> optax transformation (the groups depend on the tree).
    layout, boxed_params: as in `abstract_train_state`.
    Returns (state, state_shardings, tx).
    """
    boxed_state, _, shardings, tx = abstract_train_state(model, init_heads, make_tx, image_size,
                                                         seed, mesh, max_tokens, layout,
                                                         boxed_params)
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
