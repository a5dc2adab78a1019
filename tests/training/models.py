"""Model configs shared by the training tests."""

from __future__ import annotations

from magnet_jax.models.presets import tiny_model_config


def micro_model_config():
    """The tiny model with one block per stage and one decoder layer: the loop's tests test the
    loop, so they use the fastest model to compile that still has every module."""
    model = tiny_model_config(32)
    model.swin.depths = (1, 1, 1, 1)
    model.pixel_decoder.num_layers = 1
    model.decoder.num_layers = 1
    model.training_heads = True
    return model
