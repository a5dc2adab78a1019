"""MagNet configs: `--config configs/magnet.py:ARG`.

ARG  model
---  -----
official / refcoco / refcoco+ / refcocog_umd / refcocog_google
     Swin-B (window 12) + BERT-base at 480×480, the released single-dataset checkpoints.
all448  the same at 448×448 (magnet_all.pth).
swin_tiny  Swin-T (window 7) + BERT-base at 224×224: a reduced official-layout model.
tiny    the CI-sized model of every test (64×64).

Any field can be overridden: --config.model.image_size=448.
"""

from __future__ import annotations

import ml_collections

from magnet_jax.models import presets

OFFICIAL_480 = ("official", "refcoco", "refcoco+", "refcocog_umd", "refcocog_google")


def model_config(arg: str) -> ml_collections.ConfigDict:
    if arg in OFFICIAL_480:
        return presets.official_model_config(480)
    if arg == "all448":
        return presets.official_model_config(448)
    if arg == "swin_tiny":
        return presets.swin_model_config("tiny", window_size=7, image_size=224)
    if arg == "tiny":
        return presets.tiny_model_config(64)
    known = OFFICIAL_480 + ("all448", "swin_tiny", "tiny")
    raise ValueError(f"unknown config argument {arg!r}; known: {', '.join(known)}")


def get_config(arg: str = "official") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = arg
    config.model = model_config(arg)
    config.seed = 0
    return config
