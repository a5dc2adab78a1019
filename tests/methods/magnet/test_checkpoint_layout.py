"""Checkpoints written before the method plug-ins still restore: the train state of the
synthetic default has the same paths and shapes as the one recorded with the code before
the move (commit 3dbc457, when the Mask Grounding head lived in models/heads/ and the
objective in training/step.py). train_state_layout.json was written from that commit's
`abstract_train_state`; the restore of a real old checkpoint is in docs/methods.md."""

from __future__ import annotations

import json
from pathlib import Path

import jax

from configs import magnet as magnet_configs
from magnet_jax import sharding
from magnet_jax.training import loop
from magnet_jax.training.optimizer import make_optimizer
from magnet_jax.training.step import abstract_train_state

LAYOUT = Path(__file__).with_name("train_state_layout.json")


def test_train_state_layout_is_the_one_before_the_plug_ins():
    config = magnet_configs.get_config("synthetic")
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    opt_cfg = loop.optimizer_config(config, 100)
    _, state, _, _ = abstract_train_state(
        model, objective.init_heads, lambda p: make_optimizer(p, opt_cfg),
        int(model_cfg.image_size), 0, sharding.make_mesh(1, 1, jax.devices()[:1]))
    params = {jax.tree_util.keystr(p): list(leaf.shape)
              for p, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    recorded = json.loads(LAYOUT.read_text())
    missing = sorted(set(recorded["params"]) - set(params))
    added = sorted(set(params) - set(recorded["params"]))
    assert not missing and not added, (missing[:5], added[:5])
    changed = [k for k in params if params[k] != recorded["params"][k]]
    assert not changed, changed[:5]
    assert any(k.startswith("['mask_grounding']") for k in params)     # the MG head's place
    assert len(jax.tree.leaves(state.opt_state)) == recorded["opt_state_leaves"]
