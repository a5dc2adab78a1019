"""CM-MaskSD configs: `--config configs/cmmasksd.py:ARG`, overridable as `--config.key=value`.

ARG                 model, data and recipe
---                 ------------------------------------------------------------------------
synthetic           (`python -m magnet_jax.train --config configs/cmmasksd.py:synthetic`) a small
                    CLIP (ViT patch 8, 4 layers; text 2 layers) from scratch at 64×64 on the
                    built-in synthetic data, with the bundled synthetic BPE vocabulary; the
                    budget and recipe of configs/magnet.py:synthetic (docs/results.md).
tiny                the same model, for tests.
refcoco, refcoco+, refcocog_umd, refcocog_google
                    CLIP ViT-B/16 at 416×416 with CRIS's recipe (training_objectives.md §7.3):
                    Adam 1e-4 (CLIP towers × 0.1), no weight decay, batch 64, 50 epochs, lr ×
                    0.1 at epoch 35, BCE; 17 tokens (22 for G-Ref). Needs --config.init.clip
                    (a Hugging Face CLIP directory or OpenAI's ViT-B-16.pt state_dict) and
                    --config.model.clip.tokenizer (that directory, or bpe_simple_vocab_16e6.txt.gz).
vitb32_refcoco      the same with ViT-B/32.

  model.clip          the towers (vision: width, layers, heads, patch_size, output_dim; text:
                      width, layers, heads, vocab_size, context_length, output_dim) and the
                      tokenizer path ("" = the bundled synthetic vocabulary)
  model.cmmasksd      CRIS's decoder: feature_layers (the 3 ViT layers of the pyramid),
                      pyramid_strides (CRIS's 8, 16, 32; 4, 8, 16 at the synthetic 64 px),
                      d_model, num_layers, num_heads, ffn_dim, dropout, kernel_size
  model.mask_threshold  foreground where sigmoid > this at inference (0.5; CRIS evaluates 0.35)
  cmmasksd            the self-distillation: patch_ratio r_v (0.3), word_ratio r_t (0.15),
                      masking topk | sample | random, temperature (sample), alpha (vision
                      branch) and beta (language branch) weights (1.0; 0 turns a branch off),
                      distill bce | kl | mse, seg_on_masked (γ, 0)
"""

from __future__ import annotations

import ml_collections

from configs import magnet

REFER = ("refcoco", "refcoco+", "refcocog_umd", "refcocog_google")
KNOWN = ("synthetic", "tiny") + REFER + ("vitb32_refcoco",)
# CRIS's sentence lengths.
WORD_LEN = {"refcoco": 17, "refcoco+": 17, "refcocog_umd": 22, "refcocog_google": 22}


def _small_model() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="cmmasksd", image_size=64, max_tokens=12, dtype="float32", remat=False,
        scan_layers=True, mask_threshold=0.5,
        clip=dict(
            preset="small (from scratch)",
            vision=dict(width=96, layers=4, heads=4, patch_size=8, output_dim=64,
                        mlp_ratio=4.0, act="quick_gelu"),
            text=dict(width=64, layers=2, heads=4, vocab_size=640, context_length=12,
                      output_dim=64, mlp_ratio=4.0, act="quick_gelu"),
            tokenizer=""),
        # At 64 px CRIS's strides leave a 4x4 decoder grid: one stride finer (8x8, masks 32x32).
        cmmasksd=dict(feature_layers=(2, 3, 4), pyramid_strides=(4, 8, 16), d_model=64,
                      num_layers=2, num_heads=4, ffn_dim=128, dropout=0.1, kernel_size=3)))


def _vit_b_model(patch: int, max_tokens: int) -> ml_collections.ConfigDict:
    """OpenAI's ViT-B/16 or /32 towers at 416 with CRIS's decoder widths."""
    return ml_collections.ConfigDict(dict(
        name="cmmasksd", image_size=416, max_tokens=max_tokens, dtype="float32", remat=False,
        scan_layers=True, mask_threshold=0.5,
        clip=dict(
            preset=f"ViT-B/{patch}",
            vision=dict(width=768, layers=12, heads=12, patch_size=patch, output_dim=512,
                        mlp_ratio=4.0, act="quick_gelu"),
            text=dict(width=512, layers=12, heads=8, vocab_size=49408, context_length=77,
                      output_dim=512, mlp_ratio=4.0, act="quick_gelu"),
            tokenizer=""),
        cmmasksd=dict(feature_layers=(4, 8, 12), pyramid_strides=(8, 16, 32), d_model=512,
                      num_layers=3, num_heads=8, ffn_dim=2048, dropout=0.1, kernel_size=3)))


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    if arg not in KNOWN:
        raise ValueError(f"unknown config argument {arg!r}; known: {', '.join(KNOWN)}")
    dataset = "refcoco" if arg == "vitb32_refcoco" else arg
    config = magnet.get_config("synthetic" if arg in ("synthetic", "tiny") else dataset)
    config.name = f"cmmasksd_{arg}"
    # MagNet's own sections and its trunk's weights do not apply.
    del config["mg"]
    del config["cal"]
    config.init = ml_collections.ConfigDict(dict(
        clip="",      # a local CLIP: Hugging Face directory or OpenAI state_dict (weights.clip)
        params=""))   # a converted magnet_jax params directory of this method
    config.cmmasksd = ml_collections.ConfigDict(dict(
        patch_ratio=0.3, word_ratio=0.15, masking="topk", temperature=0.1,
        alpha=1.0, beta=1.0, distill="bce", seg_on_masked=0.0))
    if arg in ("synthetic", "tiny"):
        config.model = _small_model()
        return config
    patch = 32 if arg == "vitb32_refcoco" else 16
    config.model = _vit_b_model(patch, WORD_LEN[dataset])
    # CRIS's recipe: Adam 1e-4, CLIP × 0.1, no decay, batch 64, 50 epochs, × 0.1 at epoch 35.
    config.train.global_batch_size = 64
    config.train.num_epochs = 50
    steps_per_epoch = -(-magnet.TRAIN_REFS[dataset] // 64)
    config.eval.every_steps = steps_per_epoch
    config.checkpoint.every_steps = steps_per_epoch
    config.optim.update(dict(lr=1e-4, weight_decay=0.0, warmup_steps=0, schedule="step",
                             step_milestones=(0.7,), step_factor=0.1, backbone_lr_mult=0.1,
                             clip_global_norm=0.0, text_trainable="all"))
    config.loss.update(dict(kind="bce_dice", bce_weight=1.0, dice_weight=0.0))
    return config
