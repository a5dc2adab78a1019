"""MaIL (Li et al., 2021), reconstructed (training_objectives.md §7.1; docs/methods.md says
what is stated and what is ours): one single-stream ViLT encoder over text, image patches and
instance masks as a third modality, and a multi-scale decoder on its patch tokens.

Config: `model.vilt` (the encoder), `model.mail` (instances, mask tokens, decoder), `mail`
(training switches), `init.vilt` (a local Hugging Face ViLT directory).
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from magnet_jax.methods.base import Method
from magnet_jax.methods.mail import mask_tokens as mt
from magnet_jax.methods.mail.model import MaIL
from magnet_jax.methods.mail.objectives import make_objective

VILT_KEYS = ("vocab_size", "width", "layers", "heads", "mlp_dim", "patch_size", "image_size",
             "max_text_positions", "type_vocab_size", "modality_type_vocab_size",
             "layer_norm_eps", "act", "dropout")
NO_INSTANCES_NOTE = ("without instance masks every mask token is marked invalid and masked "
                     "out of attention: MaIL segments from the image and the text alone "
                     "(trained that way only as often as mail.drop_instances says)")


def vilt_kwargs(cfg: ml_collections.ConfigDict) -> dict:
    """The ViLT module's kwargs of a `model` config section, checked."""
    if "vilt" not in cfg:
        raise ValueError("model.vilt is missing: MaIL needs its ViLT encoder (configs/mail.py)")
    kw = {k: cfg.vilt[k] for k in VILT_KEYS}
    size, patch = int(cfg.image_size), int(kw["patch_size"])
    if size % patch:
        raise ValueError(f"model.image_size {size} is not a multiple of "
                         f"model.vilt.patch_size {patch}")
    if int(cfg.max_tokens) > int(kw["max_text_positions"]):
        raise ValueError(f"model.max_tokens {cfg.max_tokens} exceeds "
                         f"model.vilt.max_text_positions {kw['max_text_positions']}")
    if kw["width"] % kw["heads"]:
        raise ValueError(f"model.vilt.width {kw['width']} is not divisible by "
                         f"model.vilt.heads {kw['heads']}")
    kw.update(scan_layers=bool(cfg.get("scan_layers", True)), remat=bool(cfg.get("remat", False)))
    return kw


def build_mail(cfg: ml_collections.ConfigDict) -> MaIL:
    from magnet_jax.models import DTYPES
    from magnet_jax.methods.mail.decoder import level_strides
    encoder = vilt_kwargs(cfg)
    m = cfg.mail
    mt.check_kind(m.mask_tokens, m.get("patch_reduce", "sum"))
    layers = tuple(int(i) for i in m.feature_layers)
    if len(layers) != 3 or any(not 1 <= i <= encoder["layers"] for i in layers) \
            or list(layers) != sorted(set(layers)):
        raise ValueError(f"model.mail.feature_layers {layers} must name 3 increasing layers in "
                         f"1..{encoder['layers']} (model.vilt.layers)")
    level_strides(int(encoder["patch_size"]), 3)   # checks the patch size
    if int(m.num_instances) < 1:
        raise ValueError(f"model.mail.num_instances must be >= 1, got {m.num_instances}")
    return MaIL(encoder=encoder, num_instances=int(m.num_instances), mask_tokens=m.mask_tokens,
                patch_reduce=m.get("patch_reduce", "sum"), feature_layers=layers,
                decoder_dim=int(m.decoder_dim), dtype=DTYPES[cfg.get("dtype", "float32")])


def uses_instances(cfg) -> bool:
    return cfg.mail.mask_tokens != "off"


def extra_inputs(cfg, size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    if not uses_instances(cfg):
        return {}
    k = int(cfg.mail.num_instances)
    return {"instance_masks": ((k, size, size), np.uint8), "instance_valid": ((k,), np.int32)}


def dataset_kwargs(cfg) -> dict:
    """The pipeline's instance masks: K of them from `model.mail.instances` (gt | detector)."""
    if not uses_instances(cfg):
        return {}
    from magnet_jax.data.instances import InstanceSpec
    return {"instances": InstanceSpec(num=int(cfg.mail.num_instances),
                                      source=cfg.mail.get("instances", "gt"))}


def host_extra_inputs(cfg, size: int, given=None) -> dict[str, np.ndarray]:
    """One image's instance masks for the Predictor: `given` = None or a sequence / (N, H, W)
    array of masks at the image's size, best first; the first K are resized (nearest) to the
    input size and padded with invalid empty masks."""
    if not uses_instances(cfg):
        if given is not None and len(given):
            raise ValueError("this MaIL model was trained without the mask modality "
                             "(model.mail.mask_tokens='off'); it takes no instance masks")
        return {}
    from PIL import Image
    k = int(cfg.mail.num_instances)
    masks = np.zeros((k, size, size), np.uint8)
    valid = np.zeros((k,), np.int32)
    given = [] if given is None else list(given)
    for i, m in enumerate(given[:k]):
        m = np.asarray(m)
        if m.ndim != 2:
            raise ValueError(f"instance mask {i} must be 2-D (H, W), got shape {m.shape}")
        img = Image.fromarray((m > 0).astype(np.uint8) * 255)
        masks[i] = np.asarray(img.resize((size, size), Image.NEAREST)) > 0
        valid[i] = int(masks[i].any())   # as the pipeline: a mask lost in resizing is padding
    return {"instance_masks": masks, "instance_valid": valid}


def import_pretrained(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """init.vilt (a local Hugging Face ViLT directory) -> the encoder's params."""
    path = config.init.get("vilt", "")
    if not path:
        return {}
    from magnet_jax.weights.vilt import import_vilt
    return {"vilt": import_vilt(path, vilt_kwargs(config.model))}


METHOD = Method(
    name="mail",
    description="MaIL: single-stream ViLT encoder over text, image and instance masks + "
                "multi-scale decoder (reconstruction)",
    build_model=build_mail,
    make_objective=make_objective,
    config_sections=("mail",),
    model_sections=("vilt", "mail"),
    import_pretrained=import_pretrained,
    extra_inputs=extra_inputs,
    extra_inputs_note=NO_INSTANCES_NOTE,
    host_extra_inputs=host_extra_inputs,
    dataset_kwargs=dataset_kwargs,
)
