"""The shared building blocks (Swin, BERT, fusion, the deformable pixel decoder, the
Mask2Former decoder, the MagNet trunk) and model helpers; `build_model` goes through the method
registry (magnet_jax.methods)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from magnet_jax.models.magnet import MagNet, binary_mask, mask_logits_at
from magnet_jax.models.presets import ADDED_MODEL_KEYS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def trunk_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    """The MagNet trunk's constructor arguments (image and language models, their fusion, the
    pixel decoder) from a `model` config section: shared by every method built on the trunk."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    swin, bert, fusion = cfg.swin, cfg.bert, cfg.fusion
    if swin.embed_dim % 4:
        raise ValueError(f"model.swin.embed_dim must be a multiple of 4, got {swin.embed_dim}")
    if bert.hidden_size % bert.num_heads:
        raise ValueError(f"model.bert.hidden_size {bert.hidden_size} is not divisible by "
                         f"model.bert.num_heads {bert.num_heads}")
    # Stacks of identical layers as one lax.scan each (models/stacks.py): same parameters,
    # same function, a fraction of the compile time.
    scan = bool(cfg.get("scan_layers", ADDED_MODEL_KEYS["scan_layers"]))
    ends = tuple(bert.stage_ends)
    if list(ends) != sorted(ends) or ends[-1] != bert.num_layers or ends[0] < 1:
        raise ValueError(f"model.bert.stage_ends {ends} must increase and end at "
                         f"model.bert.num_layers={bert.num_layers}")
    image_kwargs = dict(patch_size=swin.patch_size, embed_dim=swin.embed_dim,
                        depths=tuple(swin.depths), num_heads=tuple(swin.num_heads),
                        window_size=swin.window_size, mlp_ratio=swin.mlp_ratio,
                        drop_path_rate=swin.drop_path_rate,
                        pyramid_pools=tuple(fusion.pyramid_pools), remat=cfg.remat, scan=scan)
    language_kwargs = dict(vocab_size=bert.vocab_size, hidden_size=bert.hidden_size,
                           num_layers=bert.num_layers, num_heads=bert.num_heads,
                           intermediate_size=bert.intermediate_size,
                           max_position_embeddings=bert.max_position_embeddings,
                           type_vocab_size=bert.type_vocab_size,
                           layer_norm_eps=bert.layer_norm_eps,
                           hidden_dropout=bert.hidden_dropout,
                           attention_dropout=bert.attention_dropout, remat=cfg.remat, scan=scan,
                           res_gate_init=fusion.get(
                               "lang_gate_init", ADDED_MODEL_KEYS["fusion.lang_gate_init"]))
    pd = cfg.pixel_decoder
    pixel_kwargs = dict(conv_dim=pd.conv_dim, ffn_dim=pd.ffn_dim, num_layers=pd.num_layers,
                        num_heads=pd.num_heads, num_points=pd.num_points, remat=cfg.remat,
                        scan=scan)
    return dict(image_model_kwargs=image_kwargs, language_model_kwargs=language_kwargs,
                text_stage_ends=ends, lang_pwam_mask=fusion.lang_pwam_mask,
                pixel_decoder_kwargs=pixel_kwargs, dtype=DTYPES[cfg.dtype])


def build_magnet(cfg: ml_collections.ConfigDict) -> MagNet:
    """MagNet (trunk + Mask2Former decoder) from a `model` config section."""
    trunk = trunk_kwargs(cfg)
    dec = cfg.decoder
    decoder_kwargs = dict(hidden_dim=dec.hidden_dim, num_heads=dec.num_heads,
                          num_layers=dec.num_layers, ffn_dim=dec.ffn_dim,
                          num_queries=dec.num_queries, num_classes=dec.num_classes,
                          scan=trunk["pixel_decoder_kwargs"]["scan"])
    if cfg.pixel_decoder.conv_dim != dec.hidden_dim:
        raise ValueError(f"model.pixel_decoder.conv_dim ({cfg.pixel_decoder.conv_dim}) must equal "
                         f"model.decoder.hidden_dim ({dec.hidden_dim})")
    threshold = float(cfg.get("no_target_threshold", ADDED_MODEL_KEYS["no_target_threshold"]))
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"model.no_target_threshold must be in [0, 1) (0 = off), got {threshold}")
    return MagNet(**trunk, decoder_kwargs=decoder_kwargs,
                  training_heads=cfg.get("training_heads", False), no_target_threshold=threshold)


def build_model(cfg: ml_collections.ConfigDict):
    """The Linen module of the method named by cfg.name (the `model` config section), through
    the method registry (magnet_jax.methods)."""
    from magnet_jax import methods   # the methods import this package
    return methods.build_model(cfg)


def dummy_inputs(image_size: int, max_tokens: int = 20, batch: int = 1):
    """Zero image, zero ids and an all-ones mask of the static input shapes."""
    return (jnp.zeros((batch, image_size, image_size, 3), jnp.float32),
            jnp.zeros((batch, max_tokens), jnp.int32), jnp.ones((batch, max_tokens), jnp.int32))


def abstract_params(model, image_size: int, max_tokens: int = 20, boxed: bool = False):
    """ShapeDtypeStructs of the parameters (no compute); boxed keeps the sharding annotations."""
    tree = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(image_size, max_tokens))
    return tree["params"] if boxed else nn.unbox(tree)["params"]


def init_params(model, image_size: int, seed: int = 0, max_tokens: int = 20):
    """The model's own initialisers, jit-compiled; plain (unboxed) arrays."""
    init = jax.jit(lambda key: nn.unbox(model.init(key, *dummy_inputs(image_size, max_tokens))))
    return init(jax.random.key(seed))["params"]


def random_params(model, image_size: int, seed: int = 0, max_tokens: int = 20):
    """Random parameters of the right shapes without compiling the init: N(0, 0.02²) for
    weights, 1 + N(0, 0.1²) for norm scales. For demos and benchmarks, not for training."""
    abstract = abstract_params(model, image_size, max_tokens)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape, np.float32))
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32))

    return jax.tree_util.tree_map_with_path(fill, abstract)


__all__ = ["build_model", "build_magnet", "trunk_kwargs", "MagNet", "mask_logits_at", "binary_mask", "abstract_params",
           "init_params", "random_params", "dummy_inputs"]
