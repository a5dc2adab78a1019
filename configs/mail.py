"""MaIL configs: `--config configs/mail.py:ARG`, overridable as `--config.key=value`.

ARG                 model, data and recipe
---                 ------------------------------------------------------------------------
synthetic           (`python -m magnet_jax.train --config configs/mail.py:synthetic`) a small
                    ViLT-style encoder (patch 8, 6 layers, width 128) from scratch at 64×64 on
                    the built-in synthetic data with its ground-truth instance masks (K = 8,
                    pooled mask tokens); the budget and recipe of configs/magnet.py:synthetic
                    (docs/results.md).
tiny                a smaller model, for tests.
refcoco, refcoco+, refcocog_umd, refcocog_google
                    ViLT-B/32 at 384×384 with training_objectives.md §7.1's recipe: AdamW 1e-4
                    (ViLT × 0.1), weight decay 1e-2, batch 32, 40 epochs, poly decay, BCE +
                    Dice; K = 16 instance masks. Needs converted data with instances
                    (`python -m magnet_jax.convert ... --with-instances` for ground truth, or
                    `python -m magnet_jax.data.add_detections` for a detector's; read the
                    leak note in docs/methods.md) and --config.init.vilt (a local Hugging Face
                    ViLT directory such as dandelin/vilt-b32-mlm).

  model.vilt          the encoder (vocab_size, width, layers, heads, mlp_dim, patch_size,
                      image_size = the size of its position table, max_text_positions, ...)
  model.mail          num_instances (K), instances (gt | detector: which record fields),
                      mask_tokens (off | pooled | masked_image | patch), patch_reduce (sum |
                      per_instance, for "patch"), feature_layers (the 3 layers the decoder
                      reads), decoder_dim
  mail                drop_instances: per-example probability of hiding all instances in a
                      training step (0)
"""

from __future__ import annotations

import ml_collections

from configs import magnet

REFER = ("refcoco", "refcoco+", "refcocog_umd", "refcocog_google")
KNOWN = ("synthetic", "tiny") + REFER
BERT_VOCAB = 30522   # the records' stored ids are bert-base-uncased, ViLT's vocabulary too


def _model(image_size: int, vilt: dict, mail: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="mail", image_size=image_size, max_tokens=20, dtype="float32", remat=False,
        scan_layers=True, vilt=vilt, mail=mail))


def _vilt(**kw) -> dict:
    base = dict(preset="", vocab_size=BERT_VOCAB, width=768, layers=12, heads=12, mlp_dim=3072,
                patch_size=32, image_size=384, max_text_positions=40, type_vocab_size=2,
                modality_type_vocab_size=2, layer_norm_eps=1e-12, act="gelu", dropout=0.0)
    base.update(kw)
    return base


def model_config(arg: str) -> ml_collections.ConfigDict:
    if arg == "synthetic":
        return _model(64, _vilt(preset="small (from scratch)", width=128, layers=6, heads=4,
                                mlp_dim=512, patch_size=8, image_size=64),
                      dict(num_instances=8, instances="gt", mask_tokens="pooled",
                           patch_reduce="sum", feature_layers=(2, 4, 6), decoder_dim=64))
    if arg == "tiny":
        return _model(32, _vilt(preset="tiny", width=32, layers=3, heads=2, mlp_dim=64,
                                patch_size=8, image_size=32),
                      dict(num_instances=4, instances="gt", mask_tokens="pooled",
                           patch_reduce="sum", feature_layers=(1, 2, 3), decoder_dim=16))
    return _model(384, _vilt(preset="ViLT-B/32"),
                  dict(num_instances=16, instances="gt", mask_tokens="pooled",
                       patch_reduce="sum", feature_layers=(4, 8, 12), decoder_dim=256))


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    if arg not in KNOWN:
        raise ValueError(f"unknown config argument {arg!r}; known: {', '.join(KNOWN)}")
    config = magnet.get_config("synthetic" if arg in ("synthetic", "tiny") else arg)
    config.name = f"mail_{arg}"
    del config["mg"]
    del config["cal"]
    config.model = model_config(arg)
    config.mail = ml_collections.ConfigDict(dict(drop_instances=0.0))
    config.init = ml_collections.ConfigDict(dict(
        vilt="",      # a local Hugging Face ViLT directory (weights.vilt)
        params=""))   # a converted magnet_jax params directory of this method
    # BCE + Dice on the one mask (§2 option B), no deep supervision.
    config.loss.update(dict(kind="bce_dice", bce_weight=1.0, dice_weight=1.0,
                            deep_supervision=False))
    if arg in REFER:
        config.optim.update(dict(lr=1e-4, weight_decay=1e-2, backbone_lr_mult=0.1,
                                 text_trainable="all", clip_global_norm=0.0))
        config.eval.batch_size = 32
    return config
