"""CM-MaskSD's segmentation network (training_objectives.md §7.3; CRIS's architecture on CLIP
ViT towers, a reconstruction): one branch Seg(I, T), called three times per training step with
shared parameters (unmasked, patches masked, words masked).

    image (ImageNet-normalised, as the pipeline gives it) -> CLIP normalisation in the graph
    CLIP ViT: patch tokens [masked patches -> a learned patch mask token] -> layers; the
      tokens after `feature_layers` (3 of them) form a pyramid at `pyramid_strides` (CRIS's
      8, 16, 32; resized from the patch grid)
    CLIP text: token embeddings [masked words -> a learned word mask token] -> causal layers;
      the words (B, L) and the end-of-text sentence embedding (B, D)
    SentenceFPN (sentence-gated) -> stride 16 -> VisionLanguageDecoder (words) ->
    DynamicKernelProjector (a sentence-generated kernel) -> (B, 1, S/4, S/4) mask logits
    (S·4/s_2 with a middle pyramid stride s_2 other than 16)

The mask tokens are the only parameters the self-distillation adds ("nearly parameter-free").
`return_clip_features` also returns the patch and word tokens in CLIP's joint space (post-LN +
projection, as CLIP pools its class token), which the correlation-guided masking compares.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models.ops import renormalise
from magnet_jax.methods.cmmasksd.decoder import (DynamicKernelProjector, SentenceFPN,
                                                 VisionLanguageDecoder, resize_to)
from magnet_jax.models.clip import CLIPText, CLIPVision
from magnet_jax.models.layers import dense

# OpenAI CLIP's image normalisation.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CRIS_STRIDES = (8, 16, 32)


def clip_normalise(image: jax.Array) -> jax.Array:
    """ImageNet-normalised pixels (the data pipeline's) -> CLIP-normalised, exactly."""
    return renormalise(image, CLIP_MEAN, CLIP_STD)


class CMMaskSD(nn.Module):
    vision: Mapping[str, Any]         # CLIPVision kwargs (image_size = the model's input size)
    text: Mapping[str, Any]           # CLIPText kwargs
    feature_layers: Sequence[int] = (4, 8, 12)   # ViT layers of the pyramid levels
    pyramid_strides: Sequence[int] = CRIS_STRIDES  # the levels' strides; the decoder works at
                                                   # the middle one, the mask at a quarter of it
    d_model: int = 512                # CRIS's vis_dim: the FPN output and decoder width
    num_layers: int = 3
    num_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.1
    kernel_size: int = 3
    mask_threshold: float = 0.5       # inference: foreground where sigmoid > this (CRIS: 0.35)
    dtype: Any = jnp.float32

    def setup(self):
        if len(self.feature_layers) != 3:
            raise ValueError(f"model.cmmasksd.feature_layers needs 3 ViT layers (strides 8, 16, "
                             f"32), got {tuple(self.feature_layers)}")
        self.clip_vision = CLIPVision(**self.vision, dtype=self.dtype)
        self.clip_text = CLIPText(**self.text, dtype=self.dtype)
        init = nn.initializers.normal(0.02)
        self.patch_mask_token = self.param("patch_mask_token", init, (self.vision["width"],))
        self.word_mask_token = self.param("word_mask_token", init, (self.text["width"],))
        width = self.vision["width"]
        self.neck = SentenceFPN((width, width, width), self.d_model, dtype=self.dtype)
        self.word_proj = dense(self.d_model, name="word_proj", dtype=self.dtype)
        self.decoder = VisionLanguageDecoder(self.num_layers, self.d_model, self.num_heads,
                                             self.ffn_dim, self.dropout, dtype=self.dtype)
        self.projector = DynamicKernelProjector(self.d_model // 2, self.text["output_dim"],
                                                self.kernel_size, dtype=self.dtype)

    def __call__(self, image: jax.Array, ids: jax.Array, att: jax.Array, train: bool = False,
                 patch_mask: jax.Array | None = None, word_mask: jax.Array | None = None,
                 return_clip_features: bool = False) -> dict:
        b, size = image.shape[0], image.shape[1]
        if size % max(self.pyramid_strides):
            raise ValueError(f"CM-MaskSD needs an input size divisible by "
                             f"{max(self.pyramid_strides)}, got {size}")
        patches = self.clip_vision.embed_patches(clip_normalise(image).astype(self.dtype))
        if patch_mask is not None:
            patches = jnp.where(patch_mask[..., None],
                                self.patch_mask_token.astype(patches.dtype), patches)
        vis = self.clip_vision.encode(patches, tuple(self.feature_layers))
        grid = int(math.isqrt(patches.shape[1]))
        pyramid = []
        for hidden, stride in zip(vis["hidden"], self.pyramid_strides):
            level = hidden[:, 1:].reshape(b, grid, grid, -1)
            pyramid.append(resize_to(level, (size // stride, size // stride)))

        words = self.clip_text.embed_tokens(ids)
        if word_mask is not None:
            words = jnp.where(word_mask[..., None], self.word_mask_token.astype(words.dtype),
                              words)
        txt = self.clip_text.encode(words, ids, att)
        sentence = txt["embeds"]
        word_features = self.clip_text.projection(txt["tokens"])   # CLIP's joint space

        x = self.neck(pyramid, sentence)
        x = self.decoder(x, self.word_proj(word_features), att, train=train)
        logits = self.projector(x, sentence)
        out = {"pred_masks": logits[:, None].astype(jnp.float32)}
        if return_clip_features:
            tokens = self.clip_vision.post_layernorm(vis["tokens"][:, 1:])
            out["clip_patches"] = self.clip_vision.projection(tokens)
            out["clip_words"] = word_features
        return out


def infer(model: CMMaskSD, params, image, ids, att, size):
    """Every method's inference (query 0 upsampled), shifted by logit(mask_threshold), so that
    every consumer's `logit > 0` (evaluate, predict, export) means sigmoid > mask_threshold."""
    from magnet_jax.methods.base import infer_from_pred_masks
    t = float(model.mask_threshold)
    shift = math.log(t / (1 - t))
    full, coarse = infer_from_pred_masks(model, params, image, ids, att, size)
    return full - shift, coarse - shift


__all__ = ["CMMaskSD", "CLIP_MEAN", "CLIP_STD", "clip_normalise", "infer"]
