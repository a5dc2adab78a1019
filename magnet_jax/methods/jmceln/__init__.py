"""JMCELN (Huang & Satoh, EMNLP 2023), reconstructed on the MagNet trunk
(training_objectives.md §7.2; docs/methods.md says what is stated and what is ours): a
learnable contextual embedding refined stage by stage from the current mask, and the
Progressive Alignment Network that filters each stage's mask by the previous one."""

from __future__ import annotations

import ml_collections

from magnet_jax.methods.base import Method
from magnet_jax.methods.jmceln.decoder import check_pan
from magnet_jax.methods.jmceln.model import JMCELN
from magnet_jax.methods.jmceln.objectives import make_objective
from magnet_jax.models import trunk_kwargs

# The reconstruction's choices and their defaults (configs/jmceln.py sets them).
DEFAULTS = dict(num_stages=3, num_embeddings=8, pan="filter", gate_init=0.0, num_heads=8,
                ffn_dim=2048)


def build_jmceln(cfg: ml_collections.ConfigDict) -> JMCELN:
    """JMCELN from a `model` config section: the trunk keys of MagNet plus `model.jmceln`."""
    if "jmceln" not in cfg:
        raise ValueError("model.jmceln is missing: JMCELN needs its decoder section "
                         "(configs/jmceln.py)")
    j = cfg.jmceln
    check_pan(j.pan)
    if j.num_stages < 1 or j.num_embeddings < 1:
        raise ValueError(f"model.jmceln.num_stages ({j.num_stages}) and num_embeddings "
                         f"({j.num_embeddings}) must be >= 1")
    trunk = trunk_kwargs(cfg)
    width = int(cfg.pixel_decoder.conv_dim)
    if width % j.num_heads:
        raise ValueError(f"model.pixel_decoder.conv_dim {width} is not divisible by "
                         f"model.jmceln.num_heads {j.num_heads}")
    return JMCELN(**trunk, context_decoder_kwargs=dict(
        hidden_dim=width, num_heads=j.num_heads, ffn_dim=j.ffn_dim, num_stages=j.num_stages,
        num_embeddings=j.num_embeddings, pan=j.pan, gate_init=j.gate_init))


METHOD = Method(
    name="jmceln",
    description="JMCELN: contextual embedding + progressive alignment (reconstruction)",
    build_model=build_jmceln,
    make_objective=make_objective,
    config_sections=("jmceln",),
    model_sections=("jmceln",),
)
