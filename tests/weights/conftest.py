"""Fixtures shared by the weight-import tests: tiny model configs and their abstract params."""

from __future__ import annotations

import numpy as np
import pytest


def official_heads_tiny_config(image_size: int = 32):
    """The CI-sized model with the head counts that the converter infers for any checkpoint
    (pixel decoder / decoder heads 8 from the official base config, BERT heads hidden/64), so a
    synthetic official checkpoint of it converts back to exactly this config."""
    from magnet_jax.models.presets import tiny_model_config
    cfg = tiny_model_config(image_size)
    cfg.swin.drop_path_rate = 0.3  # training-only, not stored: the converter keeps the official value
    cfg.bert.update(dict(vocab_size=100, max_position_embeddings=24, num_heads=1))
    cfg.pixel_decoder.update(dict(num_heads=8, num_points=1))
    cfg.decoder.update(dict(num_heads=8))
    return cfg


def random_params(abstract, seed: int = 0):
    """Random float32 NumPy leaves with the shapes of `abstract` (a nested dict)."""
    rng = np.random.default_rng(seed)

    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        return rng.standard_normal(node.shape).astype(np.float32)

    return fill(dict(node_to_dict(abstract)))


def node_to_dict(tree):
    from collections.abc import Mapping
    if isinstance(tree, Mapping):
        return {k: node_to_dict(v) for k, v in tree.items()}
    return tree


@pytest.fixture(scope="session")
def tiny_cfg():
    return official_heads_tiny_config()


@pytest.fixture(scope="session")
def tiny_abstract(tiny_cfg):
    from magnet_jax.convert import model_abstract_params
    return node_to_dict(model_abstract_params(tiny_cfg))


@pytest.fixture(scope="session")
def tiny_params(tiny_abstract):
    return random_params(tiny_abstract, seed=0)


@pytest.fixture(scope="session")
def make_random_params():
    return random_params


@pytest.fixture(scope="session")
def make_tiny_config():
    return official_heads_tiny_config
