"""A training checkpoint of the micro model written on a chosen mesh, without training."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import magnet as magnet_configs
from magnet_jax import sharding
from magnet_jax.training import loop
from magnet_jax.training.checkpointing import TrainCheckpoints
from magnet_jax.training.optimizer import make_optimizer
from magnet_jax.models import abstract_params
from magnet_jax.training.step import TrainState, init_train_state
from tests.training.models import micro_model_config

STEP = 3


def micro_config(data_dir: str):
    config = magnet_configs.get_config("tiny")
    config.model = micro_model_config()
    config.data.dir = str(data_dir)
    config.data.eval_splits = ("val",)
    config.train.global_batch_size = 8
    config.mg.update(dict(weight=0.5, depth=1, num_heads=2, intermediate=32))
    return config


def write_checkpoint(workdir: str | Path, data_dir: str | Path, fsdp: int = 1,
                     seed: int = 0, model_init: bool = True) -> dict:
    """Save a train state (with the Mask Grounding head and AdamW moments) as step STEP of a
    run in `workdir`, on a (devices / fsdp, fsdp) mesh: the model's initial state, or with
    model_init=False seeded NumPy values of the same layout (no compilation). Returns the model
    params as NumPy."""
    config = micro_config(data_dir)
    mesh = sharding.make_mesh(-1, fsdp)
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    opt_cfg = loop.optimizer_config(config, 10)

    def initial_state():
        return init_train_state(model, objective.init_heads, lambda p: make_optimizer(p, opt_cfg),
                                int(model_cfg.image_size), seed, mesh)[0]

    if model_init:
        state = initial_state()
    else:     # the same tree from shapes alone, every leaf on the first device
        params = dict(abstract_params(model, int(model_cfg.image_size)))
        params.update(jax.eval_shape(objective.init_heads, jax.random.key(0)))
        params = nn.unbox(params)
        abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                              opt_state=jax.eval_shape(make_optimizer(params, opt_cfg).init,
                                                       params))
        rng = np.random.default_rng(seed)
        state = jax.tree.map(
            lambda a: jnp.asarray((0.05 * rng.standard_normal(a.shape)).astype(a.dtype)),
            abstract)
    ckpt = TrainCheckpoints(workdir, async_save=False)
    data_iter = loop.train_iterator(config, str(data_dir), int(model_cfg.image_size), objective)
    ckpt.save(STEP, state, data_iter, config, metrics={"val/oIoU": 0.25})
    ckpt.close()
    params = objective.model_params(state.params)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
