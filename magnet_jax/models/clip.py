"""CLIP's two towers (ViT image encoder, causal text transformer) in Linen.

Numerics follow Hugging Face's CLIPModel (and OpenAI's original, which it reproduces): pre-norm
residual layers, QuickGELU MLP, the vision tower's "pre_layrnorm" before the layers and
post-LayerNorm on the class token, the text tower's final LayerNorm and pooling at the
end-of-text position, bias-free projections. No dropout (CLIP trains without it).

Each tower is written with `setup()` so that its parts can be called separately:
  CLIPVision.embed_patches(pixels) -> patch tokens; CLIPVision.encode(tokens, hidden_layers)
  CLIPText.embed_tokens(ids) -> token embeddings;   CLIPText.encode(embeddings, ids, att)
which lets a caller modify the tokens between the two steps (e.g. add prompts or fuse another
modality) without re-implementing the tower.

Parameter names mirror Hugging Face's (`encoder/layers_n/self_attn/q_proj`, `pre_layrnorm`, ...)
so that weights map one to one (magnet_jax/weights/clip.py). The layer stacks run as one
lax.scan per stretch of layers (models/stacks.py) with one parameter subtree per layer.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import stacks
from magnet_jax.models.layers import dense, gelu, layer_norm, normal_002

Dtype = Any

# OpenAI's ViT-B models (clip/model.py build_model; HF openai/clip-vit-base-patch16/32).
_VIT_B_TEXT = dict(width=512, layers=12, heads=8, vocab_size=49408, context_length=77,
                   output_dim=512, mlp_ratio=4.0, act="quick_gelu", layer_norm_eps=1e-5,
                   eos_token_id=None)
CLIP_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    f"ViT-B/{patch}": dict(
        vision=dict(width=768, layers=12, heads=12, patch_size=patch, image_size=224,
                    output_dim=512, mlp_ratio=4.0, act="quick_gelu", layer_norm_eps=1e-5),
        text=dict(_VIT_B_TEXT))
    for patch in (16, 32)
}


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's GELU approximation x·σ(1.702x), which every OpenAI CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu}


def clip_config(name: str, **overrides) -> dict[str, dict[str, Any]]:
    """{'vision': CLIPVision kwargs, 'text': CLIPText kwargs} of preset `name`, with overrides.

    An override `key=value` sets `key` in every tower that has it (width=32, layers=2 set both;
    image_size only the vision tower); `vision_key=` / `text_key=` set one tower only.
    """
    if name not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(CLIP_PRESETS)}")
    cfg = copy.deepcopy(CLIP_PRESETS[name])
    shared = ("dtype", "scan_layers", "remat")   # module options no preset lists
    for key, value in overrides.items():
        tower, _, field = key.partition("_")
        if tower in cfg and (field in cfg[tower] or field in shared):
            cfg[tower][field] = value
            continue
        towers = [t for t in cfg if key in cfg[t] or key in shared]
        if not towers:
            raise ValueError(f"clip_config: unknown override {key!r}")
        for t in towers:
            cfg[t][key] = value
    for tower, c in cfg.items():
        if c["width"] % c["heads"]:
            raise ValueError(
                f"CLIP {tower} width {c['width']} is not divisible by heads {c['heads']}")
    v = cfg["vision"]
    if v["image_size"] % v["patch_size"]:
        raise ValueError(f"CLIP vision image_size {v['image_size']} is not a multiple of "
                         f"patch_size {v['patch_size']}")
    return cfg


class CLIPAttention(nn.Module):
    """Multi-head self-attention; `mask` (B, 1, N, N) bool, True where a key may be attended."""
    width: int
    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, n, _ = x.shape
        hd = self.width // self.heads

        def project(name):
            y = dense(self.width, name=name, axes=("embed", "heads"), dtype=self.dtype)(x)
            return y.reshape(b, n, self.heads, hd)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = (jnp.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5).astype(jnp.float32)
        if mask is not None:
            # The most negative finite float, as HF adds: a fully masked row (left padding)
            # then gets a uniform softmax as there, instead of NaN.
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.width)
        return dense(self.width, name="out_proj", axes=("heads", "embed"), dtype=self.dtype)(ctx)


class CLIPLayer(nn.Module):
    """Pre-norm residual block: x + attn(LN1(x)); x + fc2(act(fc1(LN2(x))))."""
    width: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        h = layer_norm(self.layer_norm_eps, name="layer_norm1", dtype=self.dtype)(x)
        x = x + CLIPAttention(self.width, self.heads, dtype=self.dtype, name="self_attn")(h, mask)
        h = layer_norm(self.layer_norm_eps, name="layer_norm2", dtype=self.dtype)(x)
        return x + CLIPMLP(self.width, self.mlp_dim, self.act, dtype=self.dtype, name="mlp")(h)


class CLIPMLP(nn.Module):
    width: int
    mlp_dim: int
    act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.mlp_dim, name="fc1", axes=("embed", "mlp"), dtype=self.dtype)(x)
        return dense(self.width, name="fc2", axes=("mlp", "embed"),
                     dtype=self.dtype)(ACTIVATIONS[self.act](h))


class CLIPEncoder(nn.Module):
    """The stack `encoder/layers_n`, run over a half-open range [start, end); with `scan`, a
    range of several layers runs as one lax.scan (models/stacks.py)."""
    num_layers: int
    width: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    scan: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    def _layer_args(self):
        return (self.width, self.heads, self.mlp_dim, self.act, self.layer_norm_eps, self.dtype)

    def setup(self):
        layer_cls = nn.remat(CLIPLayer) if self.remat else CLIPLayer
        self.layers = [layer_cls(*self._layer_args()) for _ in range(self.num_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array | None, start: int = 0,
                 end: int | None = None) -> jax.Array:
        end = self.num_layers if end is None else end
        if not self.scan or end - start < stacks.MIN_SCAN_STEPS or self.is_initializing():
            for i in range(start, end):
                x = self.layers[i](x, mask)
            return x
        params = self.variables["params"]
        layer = CLIPLayer(*self._layer_args(), parent=None)   # unbound: applied per step

        def step(x, p, _):
            return layer.apply({"params": p}, x, mask), None

        x, _ = stacks.scan_layers(step, x, [params[f"layers_{i}"] for i in range(start, end)],
                                  remat=self.remat)
        return x


def _mlp_dim(width: int, mlp_ratio: float) -> int:
    return int(round(width * mlp_ratio))


class CLIPVision(nn.Module):
    """CLIP's ViT. Pixels (B, H, W, 3), NHWC, already normalised with CLIP's mean and std.

    encode() returns dict(hidden: the tokens after each layer listed in `hidden_layers`
    (1-based; (B, 1+N, width) each, in the order asked), tokens: the last layer's output
    (B, 1+N, width) before the post-LayerNorm, pooled: post-LayerNorm of the class token
    (B, width), embeds: its projection (B, output_dim)).
    """
    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    output_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def setup(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIPVision: image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        p, scale = self.patch_size, self.width ** -0.5
        self.patch_embedding = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(normal_002, (None, None, None, "embed")))
        # OpenAI's init: class and position embeddings ~ N(0, width^-1).
        self.class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(nn.initializers.normal(scale), (None,)),
            (self.width,), jnp.float32)
        self.position_embedding = nn.Embed(
            self.grid ** 2 + 1, self.width, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(scale),
                                                        (None, "embed")))
        self.pre_layrnorm = layer_norm(self.layer_norm_eps, name="pre_layrnorm", dtype=self.dtype)
        self.encoder = CLIPEncoder(self.layers, self.width, self.heads,
                                   _mlp_dim(self.width, self.mlp_ratio), self.act,
                                   self.layer_norm_eps, scan=self.scan_layers, remat=self.remat,
                                   dtype=self.dtype)
        self.post_layernorm = layer_norm(self.layer_norm_eps, name="post_layernorm",
                                         dtype=self.dtype)
        self.projection = dense(self.output_dim, name="projection", use_bias=False,
                                axes=("embed", None), dtype=self.dtype)

    def embed_patches(self, pixels: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> (B, N, width) patch tokens, row-major over the patch grid."""
        _, h, w, _ = pixels.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"CLIPVision: input {h}x{w} does not match image_size {self.image_size} (the "
                f"position table holds a {self.grid}x{self.grid} patch grid)")
        x = self.patch_embedding(pixels)
        return x.reshape(x.shape[0], -1, self.width)

    def encode(self, patch_tokens: jax.Array, hidden_layers: Sequence[int] = ()) -> dict:
        b, n, _ = patch_tokens.shape
        if n != self.grid ** 2:
            raise ValueError(
                f"CLIPVision: {n} patch tokens, but image_size {self.image_size} / patch "
                f"{self.patch_size} gives a position table for {self.grid}x{self.grid} = "
                f"{self.grid ** 2}")
        wanted = tuple(int(i) for i in hidden_layers)
        if any(not 1 <= i <= self.layers for i in wanted):
            raise ValueError(f"CLIPVision: hidden_layers {wanted} must lie in 1..{self.layers}")
        cls = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b, 1, self.width))
        x = jnp.concatenate([cls, patch_tokens.astype(self.dtype)], axis=1)
        x = x + self.position_embedding.embedding.astype(self.dtype)[None]
        x = self.pre_layrnorm(x)
        # One scan per stretch between requested layers, so the stack is never unrolled.
        after, start = {}, 0
        for end in sorted(set(wanted)):
            x = self.encoder(x, None, start, end)
            after[end], start = x, end
        x = self.encoder(x, None, start, self.layers)
        pooled = self.post_layernorm(x[:, 0])
        return dict(hidden=tuple(after[i] for i in wanted), tokens=x, pooled=pooled,
                    embeds=self.projection(pooled))

    def __call__(self, pixels: jax.Array, hidden_layers: Sequence[int] = ()) -> dict:
        return self.encode(self.embed_patches(pixels), hidden_layers)


def causal_padding_mask(length: int, att: jax.Array | None) -> jax.Array:
    """(B or 1, 1, L, L) bool: query q sees key k iff k <= q and att[k] (HF's rule with a mask)."""
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if att is None:
        return causal
    return causal & (att != 0)[:, None, None, :]


def end_of_text_positions(ids: jax.Array, eos_token_id: int | None) -> jax.Array:
    """(B,) pooling positions: argmax(ids) (OpenAI: the end-of-text id is the vocabulary's
    largest) or, with `eos_token_id`, the first position holding it (HF's rule since #24773)."""
    if eos_token_id is None:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax(ids == eos_token_id, axis=-1)


class CLIPText(nn.Module):
    """CLIP's causal text transformer. ids (B, L) int, att (B, L) {0,1} with L <= context_length.

    encode() returns dict(tokens: final-LayerNorm features (B, L, width), pooled: the feature at
    the end-of-text position (B, width), embeds: its projection (B, output_dim)).
    eos_token_id None pools at argmax(ids) (OpenAI), else at the first `eos_token_id`.
    """
    width: int
    layers: int
    heads: int
    vocab_size: int
    context_length: int
    output_dim: int
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int | None = None
    dtype: Dtype = jnp.float32
    scan_layers: bool = True
    remat: bool = False

    def setup(self):
        self.token_embedding = nn.Embed(
            self.vocab_size, self.width, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(normal_002, ("vocab", "embed")))
        self.position_embedding = nn.Embed(
            self.context_length, self.width, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.01),
                                                        (None, "embed")))
        self.encoder = CLIPEncoder(self.layers, self.width, self.heads,
                                   _mlp_dim(self.width, self.mlp_ratio), self.act,
                                   self.layer_norm_eps, scan=self.scan_layers, remat=self.remat,
                                   dtype=self.dtype)
        self.final_layer_norm = layer_norm(self.layer_norm_eps, name="final_layer_norm",
                                           dtype=self.dtype)
        self.projection = dense(self.output_dim, name="projection", use_bias=False,
                                axes=("embed", None), dtype=self.dtype)

    def _check_length(self, length: int) -> None:
        if length > self.context_length:
            raise ValueError(
                f"CLIPText: {length} tokens exceed context_length {self.context_length}")

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """(B, L) -> (B, L, width) token embeddings (no positions yet)."""
        self._check_length(ids.shape[1])
        return self.token_embedding(ids)

    def encode(self, token_embeddings: jax.Array, ids: jax.Array,
               att: jax.Array | None = None) -> dict:
        b, n, _ = token_embeddings.shape
        self._check_length(n)
        table = self.position_embedding.embedding
        x = token_embeddings.astype(self.dtype) + table[:n].astype(self.dtype)[None]
        x = self.encoder(x, causal_padding_mask(n, att))
        x = self.final_layer_norm(x)
        pooled = x[jnp.arange(b), end_of_text_positions(ids, self.eos_token_id)]
        return dict(tokens=x, pooled=pooled, embeds=self.projection(pooled))

    def __call__(self, ids: jax.Array, att: jax.Array | None = None) -> dict:
        return self.encode(self.embed_tokens(ids), ids, att)


__all__ = ["CLIP_PRESETS", "CLIPEncoder", "CLIPLayer", "CLIPText", "CLIPVision",
           "causal_padding_mask", "clip_config", "end_of_text_positions", "quick_gelu"]
