"""Model architecture presets (the `model` config section): official MagNet and smaller variants.

They live in the package because the converter and the Predictor need them without configs/."""

from __future__ import annotations

import ml_collections

# Model keys added after runs and converted weights were stored, with the value that rebuilds
# those: a stored model config without the key means this value (models.build_magnet, and the
# resume check of training.checkpointing).
ADDED_MODEL_KEYS = {"fusion.lang_gate_init": "zeros", "scan_layers": True,
                    "no_target_threshold": 0.0}

SWIN_SIZES = {
    # name: (embed_dim, depths, num_heads)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def official_model_config(image_size: int = 480) -> ml_collections.ConfigDict:
    """Swin-B (window 12) + BERT-base, the architecture of every released checkpoint."""
    m = ml_collections.ConfigDict()
    m.name = "magnet"
    m.image_size = image_size
    m.max_tokens = 20
    m.dtype = "float32"
    m.remat = False
    # Run stacks of identical layers (Swin block pairs, BERT stages, the deformable encoder, the
    # mask decoder's level cycles) as one lax.scan each: the same parameters and function,
    # compiled once per stack instead of once per layer (docs/benchmarks.md, "Compile time").
    m.scan_layers = True
    # Build the parts only training uses (last language fusion, lang_proj); off for inference.
    m.training_heads = False
    m.swin = ml_collections.ConfigDict(dict(
        patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
        window_size=12, mlp_ratio=4.0, drop_path_rate=0.3))
    m.bert = ml_collections.ConfigDict(dict(
        vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
        max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
        hidden_dropout=0.1, attention_dropout=0.1, stage_ends=(3, 6, 9, 12)))
    # lang_gate_init "zeros" is the official init, under which the language-side gates never
    # train; "normal" lets them (docs/results.md, "Levers measured").
    m.fusion = ml_collections.ConfigDict(dict(
        pyramid_pools=(1, 2, 3, 6), lang_pwam_mask="official", lang_gate_init="zeros",
        dropout=0.0))
    m.pixel_decoder = ml_collections.ConfigDict(dict(
        conv_dim=256, num_layers=4, ffn_dim=1024, num_heads=8, num_points=4))
    m.decoder = ml_collections.ConfigDict(dict(
        hidden_dim=256, num_heads=8, num_layers=9, ffn_dim=2048, num_queries=1, num_classes=1))
    return m


def swin_model_config(size: str, window_size: int = 12, image_size: int = 480):
    """The official layout with another Swin size (tiny/small/base/large)."""
    if size not in SWIN_SIZES:
        raise ValueError(f"unknown Swin size {size!r}; known: {sorted(SWIN_SIZES)}")
    m = official_model_config(image_size)
    embed, depths, heads = SWIN_SIZES[size]
    m.swin.embed_dim, m.swin.depths, m.swin.num_heads = embed, depths, heads
    m.swin.window_size = window_size
    return m


def tiny_model_config(image_size: int = 64) -> ml_collections.ConfigDict:
    """A CI-sized model: every module of the official one, a fraction of the width."""
    m = official_model_config(image_size)
    m.swin.update(dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4,
                       drop_path_rate=0.1))
    m.bert.update(dict(vocab_size=30522, hidden_size=64, num_layers=4, num_heads=2,
                       intermediate_size=128, stage_ends=(1, 2, 3, 4)))
    m.pixel_decoder.update(dict(conv_dim=64, num_layers=2, ffn_dim=128, num_heads=8, num_points=2))
    m.decoder.update(dict(hidden_dim=64, num_heads=8, num_layers=3, ffn_dim=128))
    return m
