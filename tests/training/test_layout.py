"""The stacked train-state layout (magnet_jax/training/layout.py): found from what the model
stacks, lossless both ways, the same training as the per-layer tree, and per-layer checkpoints."""

from __future__ import annotations

import ast
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magnet_jax import sharding
from magnet_jax.models import stacks
from magnet_jax.training import layout as layout_lib
from magnet_jax.training.optimizer import leaf_treatment, make_optimizer
from magnet_jax.training.step import TrainState, jit_train_step, make_train_step

WIDTH = 8


def toy_params(seed: int = 0) -> dict:
    """A scanned stack of 3 layers (layer_i), an unscanned one (head) and a frozen-looking
    BERT path, with the names the optimiser groups read."""
    rng = np.random.default_rng(seed)

    def dense():
        return {"kernel": rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.3,
                "bias": rng.standard_normal((WIDTH,)).astype(np.float32) * 0.1}

    return {"trunk": {f"layer_{i}": {"mlp": dense(), "norm": {"scale": np.ones(WIDTH, np.float32)}}
                      for i in range(3)},
            "head": dense()}


def toy_loss(params, batch, key):
    del key

    def step(x, p, _):
        h = jnp.tanh(x @ p["mlp"]["kernel"] + p["mlp"]["bias"]) * p["norm"]["scale"]
        return h, None

    x, _ = stacks.scan_layers(step, batch["x"], [params["trunk"][f"layer_{i}"] for i in range(3)])
    y = x @ params["head"]["kernel"] + params["head"]["bias"]
    loss = jnp.mean((y - batch["y"]) ** 2)
    return loss, {"loss": loss}


def toy_batch(seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((8, WIDTH)).astype(np.float32),
            "y": rng.standard_normal((8, WIDTH)).astype(np.float32)}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def test_discover_stacks_what_the_model_scans_and_round_trips():
    params = toy_params()
    found = layout_lib.discover(toy_loss, abstract(params), abstract(toy_batch()),
                                jax.random.key(0))
    # Each of the 3 leaves of a layer is one group of 3; the head is used unstacked.
    assert sorted(found.groups) == sorted(
        tuple(("trunk", f"layer_{i}") + leaf for i in range(3))
        for leaf in (("mlp", "bias"), ("mlp", "kernel"), ("norm", "scale")))
    stacked = found.stack(params)
    assert set(stacked["trunk"]) == {"layer_0"}
    assert stacked["trunk"]["layer_0"]["mlp"]["kernel"].shape == (3, WIDTH, WIDTH)
    assert len(jax.tree.leaves(stacked)) == 5
    back = found.unstack(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # An empty layout leaves every tree as it is.
    assert layout_lib.StackedLayout().stack(params) is params


def test_a_group_the_optimiser_treats_unevenly_stays_per_layer():
    params = toy_params()
    # LAVT freezes the last 2 of L BERT layers: under language_model/encoder the stack of 3
    # mixes trainable layer_0 and frozen layer_1, layer_2.
    bert = {"language_model": {"encoder": params["trunk"]}, "head": params["head"]}

    def loss(p, batch, key):
        return toy_loss({"trunk": p["language_model"]["encoder"], "head": p["head"]}, batch, key)

    treatment = leaf_treatment(abstract(bert), {"text_trainable": "lavt", "bert_num_layers": 3})
    found = layout_lib.discover(loss, abstract(bert), abstract(toy_batch()), jax.random.key(0),
                                treatment)
    assert not found
    treatment = leaf_treatment(abstract(bert), {"text_trainable": "all"})
    assert len(layout_lib.discover(loss, abstract(bert), abstract(toy_batch()),
                                   jax.random.key(0), treatment).groups) == 3


def test_stacked_training_equals_per_layer_training():
    """Three AdamW steps (decay masks, clipping) from the same start: the stacked state, seen
    per layer, holds the per-layer run's parameters and moments."""
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    params, batch = toy_params(), toy_batch()
    opt = {"lr": 1e-2, "weight_decay": 0.1, "clip_global_norm": 0.5, "total_steps": 10}
    found = layout_lib.discover(toy_loss, abstract(params), abstract(batch), jax.random.key(0),
                                leaf_treatment(abstract(params), opt))
    assert found
    replicated = sharding.replicated(mesh)

    def run(layout):
        start = layout.stack(jax.tree.map(jnp.asarray, params))
        tx = make_optimizer(abstract(start), opt, layout)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=start,
                           opt_state=tx.init(start))
        shardings = jax.tree.map(lambda _: replicated, state)
        step = jit_train_step(make_train_step(toy_loss, tx, seed=0, layout=layout),
                              shardings, mesh)
        for _ in range(3):
            state, metrics = step(state, batch)
        return layout.unstack_state(state), metrics

    per_layer, m_per_layer = run(layout_lib.StackedLayout())
    stacked, m_stacked = run(found)
    assert jax.tree.structure(per_layer) == jax.tree.structure(stacked)
    for a, b in zip(jax.tree.leaves(per_layer), jax.tree.leaves(stacked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m_stacked["grad_norm"], m_per_layer["grad_norm"], rtol=1e-6)
    moved = np.abs(np.asarray(stacked.params["trunk"]["layer_2"]["mlp"]["kernel"])
                   - params["trunk"]["layer_2"]["mlp"]["kernel"]).max()
    assert moved > 1e-3     # the stacked layers did train


def test_shardings_and_abstract_arrays_gain_and_lose_the_layer_axis():
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None))
    leaf = jax.ShapeDtypeStruct((4, 2), jnp.float32, sharding=named)
    stacked = layout_lib.stack_leaves([leaf] * 3)
    assert stacked.shape == (3, 4, 2)
    assert tuple(stacked.sharding.spec) == (None, "fsdp", None)
    parts = layout_lib.split_leaf(stacked, 3)
    assert [p.shape for p in parts] == [(4, 2)] * 3
    assert tuple(parts[0].sharding.spec) == ("fsdp", None)
    assert layout_lib.split_leaf(optax.MaskedNode(), 2) == [optax.MaskedNode()] * 2


def test_a_stacked_state_is_saved_per_layer_and_restored_stacked(tmp_path):
    """The loop's conversions around TrainCheckpoints on the tiny MagNet (no train step
    compiled): the saved tree is the per-layer one, and restoring it and stacking it again
    gives back every value and sharding of the stacked state (parameters and AdamW moments)."""
    import grain
    from tests.training.test_loop import tiny_config
    from magnet_jax.training import checkpointing, loop
    from magnet_jax.training.step import abstract_params, abstract_train_state

    config = tiny_config()
    mesh = loop.make_run_mesh(config)
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    opt_cfg = loop.optimizer_config(config, 10, mesh)
    found = loop.train_layout(config, model, objective, opt_cfg, mesh)
    _, abstract_state, shardings, _ = abstract_train_state(
        model, objective.init_heads, lambda p: make_optimizer(p, opt_cfg, found),
        int(model_cfg.image_size), 0, mesh, int(model_cfg.max_tokens), layout=found)
    # Distinct random values in every leaf, moments included (no init to compile).
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jax.device_put(
        rng.standard_normal(a.shape).astype(a.dtype), a.sharding), abstract_state)
    convert = loop.LayoutConversions(found, shardings)
    ckpt = checkpointing.TrainCheckpoints(tmp_path, async_save=False)
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt.save(1, convert.per_layer_state(state), data_iter, config)
    restored = convert.stacked_state(ckpt.restore(
        1, found.unstack_state(checkpointing.abstract_like(state))))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
    per_layer = abstract_params(model, objective.init_heads, int(model_cfg.image_size), 0,
                                int(model_cfg.max_tokens))
    metadata = json.loads((tmp_path / "checkpoints" / "1" / "state" / "_METADATA").read_text())
    stored = {ast.literal_eval(k)[1:] for k in metadata["tree_metadata"]
              if k.startswith("('params'")}
    assert stored == {tuple(path) for path in layout_lib.leaves_by_path(per_layer)}
    assert ("image_model", "layers_0", "pyramids_1", "expand", "kernel") in stored


@pytest.mark.extended
def test_resume_across_layouts_continues_the_same_loss_curve(tmp_path):
    """Checkpoints hold the per-layer tree whatever the layout: a run that stops and resumes
    with train.stack_layers switched each time (per layer -> stacked -> per layer) logs the
    losses of a stacked run that never stopped."""
    from tests.training.test_loop import FAST, tiny_config, train_losses
    from magnet_jax.data import synthetic
    from magnet_jax.training import loop

    data = tmp_path / "data"
    synthetic.generate(data, num_train=24, num_val=6, num_heldout=6, image_size=32, seed=0)
    overrides = {"data.dir": str(data), "eval.at_end": False, "train.num_steps": 3,
                 "checkpoint.every_steps": 1}

    def config(stacked: bool):
        return tiny_config(**overrides, **{"train.stack_layers": stacked})

    assert loop.train(config(True), tmp_path / "full", compiler_options=FAST).step == 3
    split = tmp_path / "split"
    for stacked, stop in ((False, 1), (True, 2), (False, None)):
        loop.train(config(stacked), split, stop_after_steps=stop, compiler_options=FAST)
    expected, got = train_losses(tmp_path / "full"), train_losses(split)
    np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)],
                               rtol=1e-5)


def test_xla_folds_the_split_into_the_models_stacking():
    """The point of the layout: the slices before the loss meet the model's own stacking and
    the gradient's concatenation meets the scan's stacked gradient, so XLA drops both: the
    compiled gradient has no concatenate and no slice left (a per-layer tree keeps its
    stacking, as the second half shows)."""
    params, batch = toy_params(), toy_batch()
    found = layout_lib.discover(toy_loss, abstract(params), abstract(batch), jax.random.key(0))

    def compiled_ops(layout):
        def loss(p):
            return toy_loss(layout.unstack_in_graph(p), batch, None)[0]
        stacked = layout.stack(jax.tree.map(jnp.asarray, params))
        text = jax.jit(jax.grad(loss)).lower(stacked).compile().as_text()
        return text.count(" concatenate("), text.count(" slice(")   # fused ones included

    assert compiled_ops(found) == (0, 0)
    concatenates, slices = compiled_ops(layout_lib.StackedLayout())
    assert concatenates > 0 and slices > 0       # the stacking and the gradient's slices


def test_the_stacked_state_is_the_per_layer_state_on_an_fsdp_mesh():
    """The tiny MagNet's train state on a data=4 x fsdp=2 mesh, built stacked and split again:
    the per-layer state's tree (optimiser moments included), shapes and shardings."""
    from tests.training.test_loop import tiny_config
    from magnet_jax.training import loop
    from magnet_jax.training.step import abstract_train_state

    config = tiny_config(**{"train.mesh_fsdp": 2})
    mesh = loop.make_run_mesh(config)
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    opt_cfg = loop.optimizer_config(config, 10, mesh)
    found = loop.train_layout(config, model, objective, opt_cfg, mesh)
    assert found.num_stacked_leaves > 0

    def state(layout):
        return abstract_train_state(model, objective.init_heads,
                                    lambda p: make_optimizer(p, opt_cfg, layout),
                                    int(model_cfg.image_size), 0, mesh,
                                    int(model_cfg.max_tokens), layout)[1]

    per_layer, stacked = state(None), state(found)
    assert len(jax.tree.leaves(stacked)) < len(jax.tree.leaves(per_layer))
    split = found.unstack_state(stacked)
    assert jax.tree.structure(split) == jax.tree.structure(per_layer)
    for a, b in zip(jax.tree.leaves(per_layer), jax.tree.leaves(split)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.sharding.is_equivalent_to(b.sharding, len(a.shape))

    def spec(x):
        return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))

    stacked_flat, per_layer_flat = (layout_lib.leaves_by_path(t.params)
                                    for t in (stacked, per_layer))
    for group in found.groups:
        s, p = stacked_flat[group[0]], per_layer_flat[group[0]]
        assert s.shape == (len(group),) + p.shape and spec(s) == (None,) + spec(p)
    assert any("fsdp" in spec(stacked_flat[g[0]]) for g in found.groups)


def test_evaluation_reads_the_stacked_parameters_as_the_per_layer_ones():
    """The training loop's eval step on the stacked train-state parameters (the model's part
    of the layout, its `unstack` as the params_view) gives the per-layer step's I, U and mask
    logits."""
    from tests.training.test_loop import tiny_config
    from magnet_jax.evaluation.evaluator import make_eval_step
    from magnet_jax.models import random_params
    from magnet_jax.training import loop

    config = tiny_config()
    mesh = loop.make_run_mesh(config)
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    found = loop.train_layout(config, model, objective, loop.optimizer_config(config, 10, mesh),
                              mesh)
    size, tokens = int(model_cfg.image_size), int(model_cfg.max_tokens)
    params = random_params(model, size, 3)
    model_layout = found.only(params)
    assert model_layout and set(model_layout.root_keys) == set(params)
    stacked = model_layout.stack(params)

    def step(tree, view=None):
        shardings = jax.tree.map(lambda _: sharding.replicated(mesh), tree)
        return make_eval_step(method, model, shardings, mesh, params_view=view)

    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((8, size, size, 3)).astype(np.float32),
             "ids": rng.integers(1000, 2000, (8, tokens)).astype(np.int32),
             "att": (np.arange(tokens)[None] < rng.integers(3, tokens, (8, 1))).astype(np.int32),
             "mask": (rng.random((8, size, size)) > 0.5).astype(np.int32)}
    expected = step(params)(params, batch)
    got = step(stacked, model_layout.unstack)(stacked, batch)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(expected[1]))
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(expected[2]), rtol=1e-6, atol=1e-6)
