"""JMCELN configs: `--config configs/jmceln.py:ARG`, overridable as `--config.key=value`.

ARG is one of configs/magnet.py's (synthetic, tiny, refcoco, refcoco+, refcocog_umd,
refcocog_google, swin_tiny, all448): the same trunk, data and recipe, with MagNet's decoder and
its Mask Grounding and alignment losses replaced by JMCELN's (training_objectives.md §7.2, a
reconstruction; docs/methods.md lists which parts the paper states and which are ours).

  model.jmceln     the decoder: num_stages K (3), num_embeddings N_e of the learnable
                   contextual embedding (8), pan "filter" (σ(M_k) = σ(M̃_k)·σ(M_k−1)) | "gate"
                   (M_k = M̃_k + g_k (M_k−1 − M̃_k), g_k = σ(gate_init) at init) | "none"
                   (no PAN, an ablation), num_heads, ffn_dim; the width is the pixel decoder's.
  jmceln           the loss: stage_weights w_k of Σ_k w_k (BCE + Dice)(M_k, y), (0.5, 0.75, 1.0).

`python -m magnet_jax.train --config configs/jmceln.py:synthetic` trains it on the built-in
synthetic data (docs/results.md compares it with MagNet).
"""

from __future__ import annotations

import ml_collections

from configs import magnet


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    config = magnet.get_config(arg)
    config.name = f"jmceln_{arg}"
    # MagNet's own parts: its decoder, the heads only its losses read, and those losses.
    del config.model["decoder"]
    del config.model["training_heads"]
    del config.model["no_target_threshold"]
    del config["mg"]
    del config["cal"]
    config.model.name = "jmceln"
    small = arg in magnet.SMALL
    config.model.jmceln = ml_collections.ConfigDict(dict(
        num_stages=3, num_embeddings=8, pan="filter", gate_init=0.0, num_heads=8,
        ffn_dim=128 if small else 2048))
    config.jmceln = ml_collections.ConfigDict(dict(stage_weights=(0.5, 0.75, 1.0)))
    return config
