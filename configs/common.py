"""Shared pieces of the config files: the architecture presets live in the package
(magnet_jax.models.presets) because the converter and the Predictor need them too."""

from magnet_jax.models.presets import (SWIN_SIZES, official_model_config,  # noqa: F401
                                       swin_model_config, tiny_model_config)
