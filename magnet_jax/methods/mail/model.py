"""MaIL's segmentation network (training_objectives.md §7.1; a reconstruction, no code is
public): one single-stream ViLT encoder over [text ; image patches ; instance-mask tokens],
then a multi-scale decoder on the patch tokens of three layers.

    text:   ViLT's BERT embeddings (word + position + token type) + modality type 0
    image:  ViLT's [class] + patch embeddings (+ positions interpolated to the grid) + type 1
            on ViLT-normalised pixels (converted from the pipeline's ImageNet normalisation
            in the graph)
    masks:  mask_tokens.py's option + a learned modality type 2 (ViLT has two types; new)
    encoder (ViLT's layers, padded words and invalid instances masked out of attention)
    the patch tokens after `feature_layers` -> (B, g, g, D) maps -> MultiScaleDecoder ->
    pred_masks (B, 1, S/4, S/4)

Without instance masks (None), every mask token is invalid: the encoder runs on image and
text alone (what the Predictor does when it is given none).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.methods.mail import mask_tokens as mt
from magnet_jax.methods.mail.decoder import MultiScaleDecoder
from magnet_jax.models.vilt import ViLT, vilt_normalise


class MaIL(nn.Module):
    encoder: Mapping[str, Any]         # ViLT kwargs (models/vilt.py)
    num_instances: int = 16            # K instance masks per image
    mask_tokens: str = "pooled"        # off | pooled | masked_image | patch
    patch_reduce: str = "sum"          # "patch" tokens: sum | per_instance
    feature_layers: Sequence[int] = (4, 8, 12)
    decoder_dim: int = 256
    dtype: Any = jnp.float32

    def setup(self):
        mt.check_kind(self.mask_tokens, self.patch_reduce)
        self.vilt = ViLT(**self.encoder, dtype=self.dtype)
        width, patch = self.encoder["width"], self.encoder["patch_size"]
        if self.mask_tokens != "off":
            self.mask_type = self.param("mask_type_embedding", nn.initializers.normal(0.02),
                                        (width,))
        if self.mask_tokens == "patch":
            self.mask_patch_embed = nn.Conv(
                width, (patch, patch), strides=(patch, patch), padding="VALID",
                dtype=self.dtype, param_dtype=jnp.float32, name="mask_patch_embed",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, None, "embed")))
        self.decoder = MultiScaleDecoder(patch, self.decoder_dim, dtype=self.dtype)

    def _mask_modality(self, pixels, masks, valid, grid):
        """-> ((B, M, D) mask tokens, (B, M) attention mask) for the configured option."""
        b, k = masks.shape[:2]
        gh, gw = grid
        positions = self.vilt.position_grid(gh, gw).astype(self.dtype)       # (P, D)
        cover = mt.patch_coverage(masks, grid)                                # (B, K, P)
        if self.mask_tokens == "pooled":
            patches = self.vilt.patch_embed(pixels).reshape(b, gh * gw, -1) + positions
            tokens, att = mt.pool_by_coverage(patches, cover), valid
        elif self.mask_tokens == "masked_image":
            masked = pixels[:, None] * masks[..., None].astype(pixels.dtype)   # (B, K, S, S, 3)
            patches = self.vilt.patch_embed(masked.reshape((b * k,) + pixels.shape[1:]))
            patches = patches.reshape(b, k, gh * gw, -1) + positions
            tokens, att = mt.pool_by_coverage(patches, cover), valid
        else:   # "patch"
            size = masks.shape[2:]
            maps = self.mask_patch_embed(masks.reshape(b * k, *size, 1).astype(self.dtype))
            maps = maps.reshape(b, k, gh * gw, -1) + positions
            if self.patch_reduce == "sum":
                tokens = jnp.einsum("bk,bkpd->bpd", valid.astype(maps.dtype), maps)
                att = jnp.broadcast_to(valid.max(axis=1, keepdims=True), (b, gh * gw))
            else:
                tokens = maps.reshape(b, k * gh * gw, -1)
                att = jnp.repeat(valid, gh * gw, axis=1)
        return tokens + self.mask_type.astype(tokens.dtype), att

    def __call__(self, image: jax.Array, ids: jax.Array, att: jax.Array, train: bool = False,
                 instance_masks: jax.Array | None = None,
                 instance_valid: jax.Array | None = None) -> dict:
        b, size = image.shape[0], image.shape[1]
        patch = self.encoder["patch_size"]
        if size % patch:
            raise ValueError(f"MaIL needs an input size divisible by the patch size {patch}, "
                             f"got {size}")
        g = size // patch
        pixels = vilt_normalise(image).astype(self.dtype)
        text = self.vilt.embed_text(ids, train=train)
        visual = self.vilt.embed_image(pixels, train=train)
        parts = [text, visual]
        attend = [att.astype(jnp.int32), jnp.ones(visual.shape[:2], jnp.int32)]
        if self.mask_tokens != "off":
            k = self.num_instances
            if instance_masks is None:
                instance_masks = jnp.zeros((b, k, size, size), jnp.uint8)
                instance_valid = jnp.zeros((b, k), jnp.int32)
            elif instance_valid is None:
                raise ValueError("instance_masks given without instance_valid")
            if instance_masks.shape != (b, k, size, size):
                raise ValueError(f"instance_masks must be {(b, k, size, size)} (batch, "
                                 f"model.mail.num_instances, input size, input size), got "
                                 f"{tuple(instance_masks.shape)}")
            valid = (instance_valid > 0).astype(jnp.int32)
            tokens, mask_att = self._mask_modality(pixels, instance_masks.astype(jnp.float32),
                                                   valid, (g, g))
            parts.append(tokens.astype(text.dtype))
            attend.append(mask_att)
        x = jnp.concatenate(parts, axis=1)
        enc = self.vilt.encode(x, jnp.concatenate(attend, axis=1),
                                  collect=tuple(self.feature_layers), train=train)
        start = text.shape[1] + 1             # after the words and the image's [class] token
        maps = [h[:, start:start + g * g].reshape(b, g, g, -1) for h in enc["hidden"]]
        logits = self.decoder(maps)
        return {"pred_masks": logits[:, None]}


def sequence_length(model: MaIL, max_tokens: int, image_size: int) -> int:
    """Tokens the encoder attends over: words + [class] + patches + mask tokens."""
    g = image_size // model.encoder["patch_size"]
    return max_tokens + 1 + g * g + mt.num_mask_tokens(model.mask_tokens, model.num_instances,
                                                       g * g, model.patch_reduce)


__all__ = ["MaIL", "sequence_length"]
