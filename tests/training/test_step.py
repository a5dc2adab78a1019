"""The pure train step: all objectives, sharded init, and equality across meshes."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from magnet_jax import sharding
from magnet_jax.models import build_model
from magnet_jax.methods.magnet.mask_grounding_head import MaskGroundingHead
from magnet_jax.models.presets import tiny_model_config
from magnet_jax.training.optimizer import make_optimizer
from tests.training.models import micro_model_config
from magnet_jax.methods.magnet.objectives import (MG_KEY, Objectives, head_initializer,
                                                  make_loss_fn)
from magnet_jax.training.step import (abstract_train_state, init_train_state, jit_train_step,
                                      make_train_step)

SIZE, BATCH = 32, 8
OBJECTIVES = Objectives(seg=dict(deep_supervision=True), mg_weight=0.5, cal_weight=0.5,
                        cal=dict(num_fg=16, num_bg=16))


def _batch():
    rng = np.random.default_rng(0)
    mask = np.zeros((BATCH, SIZE, SIZE), np.float32)
    for b in range(BATCH):
        y, x = rng.integers(0, SIZE // 2, 2)
        mask[b, y:y + SIZE // 2, x:x + SIZE // 3] = 1
    ids = rng.integers(1000, 2000, (BATCH, 20)).astype(np.int32)
    lengths = rng.integers(4, 21, BATCH)
    att = (np.arange(20)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * att
    ids[:, 0] = 101
    targets = np.where((rng.random((BATCH, 20)) < 0.3) & (att == 1), ids, -1).astype(np.int32)
    targets[:, 0] = -1
    mg_ids = np.where(targets >= 0, 103, ids).astype(np.int32)
    weight = np.ones((BATCH,), np.float32)
    weight[-1] = 0.0                            # a padded example
    return dict(image=rng.standard_normal((BATCH, SIZE, SIZE, 3)).astype(np.float32), mask=mask,
                ids=ids, att=att, weight=weight, mg_ids=mg_ids, mg_targets=targets)


def _model_and_head():
    cfg = tiny_model_config(SIZE)
    cfg.training_heads = True
    return build_model(cfg), MaskGroundingHead(num_heads=2, intermediate=128, depth=1)


def heads(model, head):
    return head_initializer(model, head, SIZE, 20)


def _run(mesh, steps=2):
    """`steps` SGD steps on one batch: SGD keeps parameter differences proportional to gradient
    differences (Adam's normalised first steps would turn rounding into ±lr)."""
    model, head = _model_and_head()
    state, shardings, tx = init_train_state(model, heads(model, head), lambda p: optax.sgd(1e-3),
                                            SIZE, seed=0, mesh=mesh)
    # Unoptimised XLA compiles faster; the numerics are the same float32 ops.
    step = jit_train_step(make_train_step(make_loss_fn(model, head, OBJECTIVES), tx, seed=0),
                          shardings, mesh, compiler_options={"xla_backend_optimization_level": 0})
    batch = jax.device_put(_batch(), sharding.batch_sharding(mesh))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, metrics, losses


@pytest.fixture(scope="module")
def single_device_run():
    return _run(sharding.make_mesh(1, 1, devices=jax.devices()[:1]))


@pytest.mark.slow
def test_train_step_runs_every_objective(single_device_run):
    state, metrics, losses = single_device_run
    assert int(state.step) == 2
    for key in ("loss", "loss_seg", "loss_mg", "loss_cal", "grad_norm"):
        assert np.isfinite(float(metrics[key])), key
    assert float(metrics["loss_mg"]) > 0 and float(metrics["mg_num_selected"]) > 0
    assert float(metrics["grad_norm"]) > 0
    assert MG_KEY in state.params and "lang_proj" in state.params
    assert losses[-1] < losses[0]          # one step on this batch lowers its loss


@pytest.mark.slow
# (4, 2) has both a data and an fsdp axis over the 8 devices; pure data parallelism over
# several devices is also covered by the two-process test's (2, 2) mesh and by test_loop.
@pytest.mark.parametrize("data,fsdp", [(4, 2)])
def test_same_loss_and_update_on_sharded_meshes(single_device_run, data, fsdp):
    ref_state, _, ref_losses = single_device_run
    state, _, losses = _run(sharding.make_mesh(data, fsdp))
    # The batch's loss, then the loss after one update (which depends on every parameter).
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    worst = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)))
    print(f"mesh ({data}, {fsdp}): losses {losses} vs {ref_losses}; max |Δparam| {worst:.2e}")
    assert worst < 1e-5
    if fsdp > 1:   # FSDP really shards: a kernel's rows are split over the fsdp axis.
        kernel = state.params["image_model"]["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"]
        assert kernel.sharding.shard_shape(kernel.shape)[0] == kernel.shape[0] // fsdp


def test_adamw_state_is_sharded_like_the_parameters():
    model, head = _model_and_head()
    mesh = sharding.make_mesh(4, 2)
    # The shardings init_train_state's jit creates the state with, traced without compiling.
    _, state, shardings, _ = abstract_train_state(
        model, heads(model, head), lambda p: make_optimizer(p, dict(total_steps=10)), SIZE,
        seed=0, mesh=mesh)
    kernel_spec = shardings.params["image_model"]["layers_0"]["blocks_0"]["mlp"]["fc1"]["kernel"].spec
    assert kernel_spec == jax.sharding.PartitionSpec("fsdp", None)
    specs = [s.spec for s in jax.tree.leaves(shardings.opt_state)]
    # The Adam moments of that kernel carry the same spec; counters are replicated.
    assert specs.count(kernel_spec) >= 2
    assert state.step.shape == () and shardings.step.spec == jax.sharding.PartitionSpec()


def _deterministic_model():
    cfg = micro_model_config()
    cfg.training_heads = False
    cfg.swin.drop_path_rate = 0.0
    cfg.bert.hidden_dropout = cfg.bert.attention_dropout = 0.0
    return build_model(cfg)


@pytest.mark.slow
@pytest.mark.extended
def test_gradient_accumulation_equals_the_whole_batch():
    """Two microbatches scanned inside the step give the whole batch's update (no dropout,
    every weight 1: the mean of the microbatch means is the batch mean)."""
    model = _deterministic_model()
    mesh = sharding.make_mesh(8, 1)
    batch = _batch()
    batch["weight"][:] = 1.0
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    objectives = Objectives(seg=dict(deep_supervision=True), mg_weight=0.0, cal_weight=0.0)
    results = []
    for k in (1, 2):
        state, shardings, tx = init_train_state(model, None, lambda p: optax.sgd(1e-2), SIZE,
                                                seed=0, mesh=mesh)
        step = jit_train_step(make_train_step(make_loss_fn(model, None, objectives), tx, seed=0,
                                              accumulation_steps=k),
                              shardings, mesh, compiler_options={"xla_backend_optimization_level": 0})
        state, metrics = step(state, batch)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-4)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    assert worst < 1e-6


_TWO_PROCESS_STEP = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import optax
from magnet_jax import sharding
from magnet_jax.methods.magnet.objectives import make_loss_fn
from magnet_jax.training.step import (abstract_train_state, init_train_state, jit_train_step,
                                      make_train_step)
from tests.training import test_step as t
mesh = sharding.make_mesh(2, 2)                     # 4 devices over 2 processes
model, head = t._model_and_head()
state, shardings, tx = init_train_state(model, t.heads(model, head), lambda p: optax.sgd(1e-3),
                                        t.SIZE, seed=0, mesh=mesh)
step = jit_train_step(make_train_step(make_loss_fn(model, head, t.OBJECTIVES), tx, seed=0),
                      shardings, mesh, compiler_options={"xla_backend_optimization_level": 0})
half = t.BATCH // 2
pid = jax.process_index()
local = {k: v[pid * half:(pid + 1) * half] for k, v in t._batch().items()}
batch = {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), v)
         for k, v in local.items()}
losses = []
for _ in range(2):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
print("LOSSES " + json.dumps(losses), flush=True)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
# Outside CI (pytest -m extended): two processes compiling the full step on 2 cores take ~3
# min; CI keeps the two-process evaluation (tests/evaluation/test_evaluate.py) and metrics.
@pytest.mark.extended
def test_two_process_run_gives_the_single_device_losses(single_device_run):
    from tests.multiprocess import run_two_processes

    losses = run_two_processes(_TWO_PROCESS_STEP, "LOSSES", timeout=600)
    _, _, ref_losses = single_device_run
    assert losses[0] == losses[1]
    np.testing.assert_allclose(losses[0], ref_losses, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.extended
def test_bf16_compute_keeps_float32_master_weights(single_device_run):
    """bf16 activations: the parameters stay float32, the loss is float32 and close to the
    float32 model's on the same weights, batch and objectives (single_device_run)."""
    cfg = tiny_model_config(SIZE)
    cfg.training_heads = True
    cfg.dtype = "bfloat16"
    model = build_model(cfg)
    head = MaskGroundingHead(num_heads=2, intermediate=128, depth=1, dtype=jax.numpy.bfloat16)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    state, shardings, tx = init_train_state(model, heads(model, head), lambda p: optax.sgd(1e-3),
                                            SIZE, seed=0, mesh=mesh)
    step = jit_train_step(make_train_step(make_loss_fn(model, head, OBJECTIVES), tx, seed=0),
                          shardings, mesh, compiler_options={"xla_backend_optimization_level": 0})
    state, metrics = step(state, jax.device_put(_batch(), sharding.batch_sharding(mesh)))
    assert metrics["loss"].dtype == np.float32
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
    _, _, ref_losses = single_device_run
    print(f"first-step loss float32 {ref_losses[0]:.5f}, bfloat16 {float(metrics['loss']):.5f}")
    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_allclose(float(metrics["loss"]), ref_losses[0], rtol=5e-2)
