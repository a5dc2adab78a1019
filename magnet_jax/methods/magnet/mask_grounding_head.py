"""Mask Grounding predictor (training only; training_objectives.md §3.3 steps 2–5).

Fuses the masked sentence's language features, the visual tokens of feat_4 and an encoding of
the ground-truth mask in a small post-LN BERT encoder, then predicts every text position over
the vocabulary with a head tied to the BERT word embeddings. The inference model never builds
this module, so the released parameter set is unchanged (style.md §3.3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import ops
from magnet_jax.models.bert import BertLayer, additive_attention_mask
from magnet_jax.models.layers import dense, gelu, layer_norm, normal_002

Dtype = Any
MASK_ENCODERS = ("occupancy", "pooled_token", "none")


def mask_occupancy(gt_mask: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, H, W) {0,1} -> (B, h, w) float32 fraction of each token cell covered, in [0, 1]."""
    return ops.area_downsample(gt_mask, size)


class MaskGroundingHead(nn.Module):
    """Masked-token predictor over [text ; visual (; pooled mask token)].

    Fields: `hidden` None means the text width Ct; `mask_encoder` one of MASK_ENCODERS.
    Parameters (excluding the tied embedding matrix, which is an argument): visual_proj,
    visual_norm, [text_proj when hidden != Ct], mask_proj ("occupancy"), position_embedding,
    token_type_embeddings, embeddings_norm, layer_{i}, transform/{dense,LayerNorm}, output_bias.
    """
    hidden: int | None = None
    num_heads: int = 12
    intermediate: int = 3072
    depth: int = 2
    mask_encoder: str = "occupancy"
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_features: jax.Array, text_att: jax.Array, visual: jax.Array,
                 gt_mask: jax.Array, word_embeddings: jax.Array,
                 deterministic: bool = True, positions: jax.Array | None = None) -> jax.Array:
        """text_features (B, N, Ct): l_4' of the masked sentence; text_att (B, N) {0,1};
        visual (B, h, w, Cv): feat_4; gt_mask (B, H, W) {0,1}; word_embeddings (V, Ct): the
        BERT word-embedding matrix itself (passed in so that gradients reach it).

        positions (B, K) int, optional: predict only these text positions (BERT's
        max_predictions_per_seq), which skips the (N - K) / N of the vocabulary projection
        that unselected tokens would waste.

        Returns logits (B, N, V) float32 for the text positions only, (B, K, V) with positions.
        """
        if self.mask_encoder not in MASK_ENCODERS:
            raise ValueError(f"mask_encoder must be one of {MASK_ENCODERS}, "
                             f"got {self.mask_encoder!r}")
        b, n, ct = text_features.shape
        _, h, w, _ = visual.shape
        vocab, emb_dim = word_embeddings.shape
        if emb_dim != ct:
            raise ValueError(f"word_embeddings width {emb_dim} != text width {ct}")
        hidden = ct if self.hidden is None else self.hidden

        text = text_features.astype(self.dtype)
        if hidden != ct:
            text = dense(hidden, name="text_proj", dtype=self.dtype)(text)

        # Visual tokens: Dense(Cv -> hidden) + LayerNorm, then a learned 2-D position embedding
        # in every mode, so that "none" differs from "occupancy" by the mask term alone.
        vis = dense(hidden, name="visual_proj", axes=("mlp", "embed"),
                    dtype=self.dtype)(visual.astype(self.dtype))
        vis = layer_norm(self.layer_norm_eps, name="visual_norm", dtype=self.dtype)(vis)
        vis = vis.reshape(b, h * w, hidden)
        pos = self.param("position_embedding",
                         nn.with_logical_partitioning(normal_002, (None, "embed")),
                         (h * w, hidden), jnp.float32)
        vis_pos = vis + pos.astype(self.dtype)[None]

        extra = []
        if self.mask_encoder != "none":
            occ = mask_occupancy(gt_mask, (h, w)).reshape(b, h * w, 1)
            if self.mask_encoder == "occupancy":
                vis_pos = vis_pos + dense(hidden, name="mask_proj", axes=(None, "embed"),
                                          dtype=self.dtype)(occ.astype(self.dtype))
            else:
                # Occupancy-weighted mean of the (position-free) visual tokens; an empty mask
                # (all-zero weights) gives a zero token instead of 0/0.
                wsum = occ.sum(axis=1, keepdims=True)
                pooled = (occ * vis.astype(jnp.float32)).sum(axis=1, keepdims=True)
                pooled = pooled / jnp.maximum(wsum, 1e-6)
                extra.append(pooled.astype(self.dtype))
        visual_tokens = jnp.concatenate([vis_pos] + extra, axis=1)
        n_vis = visual_tokens.shape[1]

        types = nn.Embed(2, hidden, name="token_type_embeddings", dtype=self.dtype,
                         embedding_init=nn.with_logical_partitioning(normal_002, (None, "embed")))
        type_ids = jnp.concatenate([jnp.zeros((n,), jnp.int32), jnp.ones((n_vis,), jnp.int32)])
        x = jnp.concatenate([text, visual_tokens], axis=1) + types(type_ids)[None]
        # As BertEmbeddings: LayerNorm + dropout on the summed input before the first layer.
        x = layer_norm(self.layer_norm_eps, name="embeddings_norm", dtype=self.dtype)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)

        # Key padding: text padding is masked out; visual (and pooled) tokens are always valid.
        att = jnp.concatenate([text_att.astype(jnp.float32), jnp.ones((b, n_vis), jnp.float32)],
                              axis=1)
        mask = additive_attention_mask(att)
        for i in range(self.depth):
            x = BertLayer(hidden, self.num_heads, self.intermediate, self.layer_norm_eps,
                          self.dropout, self.dropout, dtype=self.dtype,
                          name=f"layer_{i}")(x, mask, deterministic)

        # BertLMPredictionHead on the text positions only: transform, then tied decoder.
        y = x[:, :n]
        if positions is not None:
            y = jnp.take_along_axis(y, positions[..., None].astype(jnp.int32), axis=1)
        y = TransformHead(emb_dim, self.layer_norm_eps, dtype=self.dtype, name="transform")(y)
        bias = self.param("output_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                      ("vocab",)),
                          (vocab,), jnp.float32)
        logits = jnp.einsum("bnc,vc->bnv", y, word_embeddings.astype(y.dtype),
                            preferred_element_type=jnp.float32)
        return logits + bias


class TransformHead(nn.Module):
    """BertPredictionHeadTransform: Dense -> exact GELU -> LayerNorm. (B, N, C) -> (B, N, out)."""
    features: int
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(dense(self.features, name="dense", axes=("mlp", "embed"), dtype=self.dtype)(x))
        return layer_norm(self.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x)
