"""MaIL's third modality: instance masks as tokens (training_objectives.md §7.1, step 2; the
options are ours, switch `model.mail.mask_tokens`).

Every option turns K instance masks (B, K, S, S) with validity bits (B, K) into tokens of the
encoder width plus their attention mask; MaIL then adds the mask modality's type embedding.

- "pooled": mask-average-pool ViLT's patch embeddings (projection + position) inside each
  instance, weighted by the fraction of each patch the mask covers: K tokens, the cheapest.
- "masked_image": the image times each mask (outside = ViLT's 0, mid-grey), through ViLT's own
  patch projection, + positions, pooled the same way: K tokens, K extra patch embeddings.
- "patch": each mask as a 1-channel image through its own patch projection, + positions;
  `patch_reduce="sum"` adds the valid instances into one map (P tokens), "per_instance"
  keeps them apart (K·P tokens).
- "off": no mask tokens (the ablation without the modality).

An instance with validity 0 (padding, or no instances given at all) is masked out of the
attention; with no valid instance the encoder sees image and text alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magnet_jax.models.ops import area_downsample

MASK_TOKEN_KINDS = ("off", "pooled", "masked_image", "patch")
PATCH_REDUCE = ("sum", "per_instance")


def check_kind(kind: str, reduce: str = "sum") -> None:
    if kind not in MASK_TOKEN_KINDS:
        raise ValueError(f"unknown model.mail.mask_tokens {kind!r}; expected one of "
                         f"{', '.join(MASK_TOKEN_KINDS)}")
    if reduce not in PATCH_REDUCE:
        raise ValueError(f"unknown model.mail.patch_reduce {reduce!r}; expected one of "
                         f"{', '.join(PATCH_REDUCE)}")


def num_mask_tokens(kind: str, num_instances: int, num_patches: int,
                    reduce: str = "sum") -> int:
    """How many tokens the mask modality adds to the sequence."""
    if kind == "off":
        return 0
    if kind == "patch":
        return num_patches if reduce == "sum" else num_instances * num_patches
    return num_instances


def patch_coverage(masks: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, K, S, S) 0/1 masks -> (B, K, gh·gw) float32 fraction of each patch covered."""
    b, k, h, w = masks.shape
    cover = area_downsample(masks.reshape(b * k, h, w), grid)
    return cover.reshape(b, k, grid[0] * grid[1])


def pool_by_coverage(features: jax.Array, cover: jax.Array) -> jax.Array:
    """features (B, P, D) or (B, K, P, D), cover (B, K, P) -> (B, K, D) coverage-weighted mean
    (0 for an empty mask)."""
    weights = cover / jnp.maximum(cover.sum(axis=-1, keepdims=True), 1e-6)
    if features.ndim == 3:
        return jnp.einsum("bkp,bpd->bkd", weights.astype(features.dtype), features)
    return jnp.einsum("bkp,bkpd->bkd", weights.astype(features.dtype), features)
