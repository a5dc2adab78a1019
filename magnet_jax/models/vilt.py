"""ViLT's single-stream vision-and-language transformer in Linen.

Numerics follow Hugging Face's ViltModel (dandelin/vilt-b32-mlm): BERT text embeddings (word +
position + token type, LayerNorm), ViT patch embeddings (a patch_size-strided conv, a class
token, a position table for the pretraining grid image_size // patch_size, resized to the input's
patch grid by bilinear interpolation with align_corners=True), a modality type embedding added
to each part (0 text, 1 image), one pre-norm encoder over [text; image] (ViT layers: LayerNorm
before attention and before the MLP, exact GELU), a final LayerNorm and BERT's tanh pooler on
the first token.

Written with `setup()` so that its parts can be called separately:
  ViLT.embed_text(ids) -> (B, L, D);  ViLT.embed_image(pixels) -> (B, 1 + gh·gw, D);
  ViLT.encode(concatenated embeddings, mask, collect) -> tokens (+ raw layer outputs);
  ViLT.pool(tokens) -> (B, D)
so that a caller can modify or mask tokens between the steps.

What is deliberately not supported (HF's ViltEmbeddings.visual_embed):
- pixel_mask: every patch is valid (HF's pixel_mask all ones);
- patch sampling: HF draws the image tokens with torch.multinomial, which with every patch
  valid returns a random permutation of all of them (max_image_length < 0), or a random subset
  (0 < max_image_length < patches). The encoder is permutation-equivariant, so a permutation only
  reorders the image tokens; here they stay in row-major order. A subset is not reproduced.
- image_embeds / inputs_embeds inputs and image_token_type_idx 2 (NLVR2's second image): call
  embed_* / modality_embedding and encode directly instead.

Parameter names mirror Hugging Face's (`embeddings/text_embeddings/word_embeddings`,
`encoder/layer_n/attention/attention/query`, `layernorm`, `pooler/dense`, ...), so weights map
one to one (magnet_jax/weights/vilt.py). The layer stack runs as one lax.scan per stretch of
layers (models/stacks.py) with one parameter subtree per layer.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax.models.ops import renormalise
from magnet_jax.models import stacks
from magnet_jax.models.layers import dense, gelu, layer_norm, normal_002

Dtype = Any

# dandelin/vilt-b32-mlm's config.
VILT_B32: dict[str, Any] = dict(
    vocab_size=30522, width=768, layers=12, heads=12, mlp_dim=3072, patch_size=32,
    image_size=384, max_text_positions=40, type_vocab_size=2, modality_type_vocab_size=2,
    layer_norm_eps=1e-12, act="gelu", dropout=0.0)

ACTIVATIONS = {"gelu": gelu}

# ViLT's image normalisation (ViltImageProcessor: IMAGENET_STANDARD_MEAN / _STD).
VILT_MEAN = (0.5, 0.5, 0.5)
VILT_STD = (0.5, 0.5, 0.5)


def vilt_normalise(image: jax.Array) -> jax.Array:
    """ImageNet-normalised pixels (the data pipeline's, NHWC) -> ViLT-normalised, exactly."""
    return renormalise(image, VILT_MEAN, VILT_STD)


def _align_corners_taps(size_in: int, size_out: int):
    """torch's bilinear align_corners=True along one axis: (i0, i1, w0, w1), each (size_out,),
    with output[o] = w0[o]·input[i0[o]] + w1[o]·input[i1[o]] (float32 weights as torch's CPU
    kernel computes them)."""
    scale = np.float32((size_in - 1) / (size_out - 1)) if size_out > 1 else np.float32(0.0)
    src = scale * np.arange(size_out, dtype=np.float32)
    i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, (np.float32(1.0) - w1).astype(np.float32), w1


def resize_align_corners(table: jax.Array, height: int, width: int) -> jax.Array:
    """(h, w, C) -> (height, width, C): F.interpolate(mode="bilinear", align_corners=True), as a
    gather and weighted sums (no matmul: exact float32 on every backend)."""
    h, w = table.shape[:2]
    if (h, w) == (height, width):
        return table
    r0, r1, rw0, rw1 = _align_corners_taps(h, height)
    c0, c1, cw0, cw1 = _align_corners_taps(w, width)
    dtype = table.dtype
    rw0, rw1 = jnp.asarray(rw0, dtype)[:, None, None], jnp.asarray(rw1, dtype)[:, None, None]
    cw0, cw1 = jnp.asarray(cw0, dtype)[None, :, None], jnp.asarray(cw1, dtype)[None, :, None]

    def cols(rows):
        return cw0 * rows[:, c0] + cw1 * rows[:, c1]

    return rw0 * cols(table[r0]) + rw1 * cols(table[r1])


class ViltTextEmbeddings(nn.Module):
    """BERT's embeddings: word + position + token type, LayerNorm, dropout (HF TextEmbeddings;
    parameter names as BertEmbeddings', plus token type ids)."""
    vocab_size: int
    width: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, token_type_ids: jax.Array | None = None,
                 deterministic: bool = True) -> jax.Array:
        n = ids.shape[1]
        if n > self.max_positions:
            raise ValueError(f"ViLT: {n} text tokens exceed max_text_positions "
                             f"{self.max_positions}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)

        def table(name, rows, axes):
            return nn.Embed(rows, self.width, name=name, dtype=self.dtype,
                            embedding_init=nn.with_logical_partitioning(normal_002, axes))

        x = table("word_embeddings", self.vocab_size, ("vocab", "embed"))(ids)
        x = x + table("token_type_embeddings", self.type_vocab_size, (None, "embed"))(
            token_type_ids)
        x = x + table("position_embeddings", self.max_positions, (None, "embed")).embedding[
            :n].astype(self.dtype)[None]
        x = layer_norm(self.layer_norm_eps, name="LayerNorm", dtype=self.dtype)(x)
        return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class ViltEmbeddings(nn.Module):
    """HF's ViltEmbeddings: text embeddings, patch projection, class token, patch position table
    and the modality type table (`token_type_embeddings`, as HF names it)."""
    vocab_size: int
    width: int
    patch_size: int
    image_size: int
    max_text_positions: int
    type_vocab_size: int
    modality_type_vocab_size: int
    layer_norm_eps: float
    dropout: float
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def setup(self):
        p = self.patch_size
        self.text_embeddings = ViltTextEmbeddings(
            self.vocab_size, self.width, self.max_text_positions, self.type_vocab_size,
            self.layer_norm_eps, self.dropout, dtype=self.dtype)
        self.patch_embeddings = nn.Conv(
            self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(normal_002, (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))
        self.cls_token = self.param(
            "cls_token", nn.with_logical_partitioning(normal_002, (None,)), (self.width,),
            jnp.float32)
        self.position_embeddings = self.param(
            "position_embeddings", nn.with_logical_partitioning(normal_002, (None, "embed")),
            (self.grid ** 2 + 1, self.width), jnp.float32)
        self.token_type_embeddings = nn.Embed(
            self.modality_type_vocab_size, self.width, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(normal_002, (None, "embed")))
        self.drop = nn.Dropout(self.dropout)

    def text(self, ids, token_type_ids=None, deterministic=True):
        x = self.text_embeddings(ids, token_type_ids, deterministic)
        return x + self.modality(0)

    def patches(self, pixels):
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"ViLT: pixels must be (B, H, W, 3) NHWC, got {pixels.shape}")
        return self.patch_embeddings(pixels.astype(self.dtype))

    def position_grid(self, gh: int, gw: int):
        table = self.position_embeddings[1:].reshape(self.grid, self.grid, self.width)
        return resize_align_corners(table, gh, gw).reshape(gh * gw, self.width)

    def image(self, pixels, deterministic=True):
        x = self.patches(pixels)
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, self.width)
        cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (b, 1, self.width))
        pos = jnp.concatenate([self.position_embeddings[:1], self.position_grid(gh, gw)])
        x = jnp.concatenate([cls, x], axis=1) + pos.astype(self.dtype)[None]
        x = self.drop(x, deterministic=deterministic)
        return x + self.modality(1)

    def modality(self, index: int):
        if not 0 <= index < self.modality_type_vocab_size:
            raise ValueError(f"ViLT: modality index {index} outside 0..."
                             f"{self.modality_type_vocab_size - 1}")
        return self.token_type_embeddings.embedding[index].astype(self.dtype)


class ViltSelfAttention(nn.Module):
    """Multi-head attention; `mask` (B, 1, 1, N) bool, True where a key may be attended."""
    width: int
    heads: int
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        b, n, _ = x.shape
        hd = self.width // self.heads

        def project(name):
            y = dense(self.width, name=name, axes=("embed", "heads"), dtype=self.dtype)(x)
            return y.reshape(b, n, self.heads, hd)

        q, k, v = project("query"), project("key"), project("value")
        scores = (jnp.einsum("bqhd,bkhd->bhqk", q, k) / (hd ** 0.5)).astype(jnp.float32)
        if mask is not None:
            # HF adds the most negative float: masked keys get exactly zero weight.
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
        return ctx.reshape(b, n, self.width)


class ViltAttention(nn.Module):
    width: int
    heads: int
    dropout: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic):
        ctx = ViltSelfAttention(self.width, self.heads, self.dropout, dtype=self.dtype,
                                name="attention")(x, mask, deterministic)
        # HF's ViltSelfOutput: `output/dense`, then dropout (the residual is in ViltLayer).
        y = _DenseBlock(self.width, ("heads", "embed"), dtype=self.dtype, name="output")(ctx)
        return nn.Dropout(self.dropout)(y, deterministic=deterministic)


class _DenseBlock(nn.Module):
    """A Dense in a one-child module, so that its params read `<name>/dense` as in HF."""
    width: int
    axes: tuple
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return dense(self.width, name="dense", axes=self.axes, dtype=self.dtype)(x)


class ViltLayer(nn.Module):
    """ViT block: h = x + attn(LN_before(x)); h + output(act(intermediate(LN_after(h))))."""
    width: int
    heads: int
    mlp_dim: int
    act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        h = layer_norm(self.layer_norm_eps, name="layernorm_before", dtype=self.dtype)(x)
        x = x + ViltAttention(self.width, self.heads, self.dropout, dtype=self.dtype,
                              name="attention")(h, mask, deterministic)
        h = layer_norm(self.layer_norm_eps, name="layernorm_after", dtype=self.dtype)(x)
        h = _DenseBlock(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
                        name="intermediate")(h)
        h = _DenseBlock(self.width, ("mlp", "embed"), dtype=self.dtype,
                        name="output")(ACTIVATIONS[self.act](h))
        return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class ViltEncoder(nn.Module):
    """The stack `encoder/layer_n`, run over a half-open range [start, end); with `scan`, a
    range of several layers runs as one lax.scan (models/stacks.py)."""
    num_layers: int
    width: int
    heads: int
    mlp_dim: int
    act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    scan: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    def _layer_args(self):
        return (self.width, self.heads, self.mlp_dim, self.act, self.layer_norm_eps,
                self.dropout, self.dtype)

    def setup(self):
        layer_cls = nn.remat(ViltLayer, static_argnums=(3,)) if self.remat else ViltLayer
        self.layer = [layer_cls(*self._layer_args()) for _ in range(self.num_layers)]

    def __call__(self, x, mask, start: int = 0, end: int | None = None,
                 deterministic: bool = True):
        end = self.num_layers if end is None else end
        if not self.scan or end - start < stacks.MIN_SCAN_STEPS or self.is_initializing():
            for i in range(start, end):
                x = self.layer[i](x, mask, deterministic)
            return x
        params = self.variables["params"]
        layer = ViltLayer(*self._layer_args(), parent=None)   # unbound: applied per step
        keys = stacks.layer_keys(None if deterministic else self.make_rng("dropout"),
                                 end - start)

        def step(x, p, key):
            rngs = {} if key is None else {"dropout": key}
            return layer.apply({"params": p}, x, mask, deterministic, rngs=rngs), None

        x, _ = stacks.scan_layers(step, x, [params[f"layer_{i}"] for i in range(start, end)],
                                  keys, remat=self.remat)
        return x


class ViLT(nn.Module):
    """ViLT (HF ViltModel with pixel_mask all ones, image tokens in row-major patch order).

    Pixels (B, H, W, 3), NHWC, already ViLT-normalised (mean = std = 0.5; `vilt_normalise`
    converts the pipeline's ImageNet normalisation). Any H, W: the patch grid is
    (H // patch_size, W // patch_size) and the position table (the image_size // patch_size
    pretraining grid) is interpolated to it.
    """
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    max_text_positions: int = 40
    type_vocab_size: int = 2
    modality_type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    act: str = "gelu"
    dropout: float = 0.0
    scan_layers: bool = True
    remat: bool = False
    dtype: Dtype = jnp.float32

    @property
    def grid(self) -> int:
        """Side of the position table's patch grid."""
        return self.image_size // self.patch_size

    def setup(self):
        if self.width % self.heads:
            raise ValueError(f"ViLT: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViLT: act {self.act!r} is not supported ({sorted(ACTIVATIONS)})")
        if self.grid < 1:
            raise ValueError(f"ViLT: image_size {self.image_size} is smaller than patch_size "
                             f"{self.patch_size}")
        self.embeddings = ViltEmbeddings(
            self.vocab_size, self.width, self.patch_size, self.image_size,
            self.max_text_positions, self.type_vocab_size, self.modality_type_vocab_size,
            self.layer_norm_eps, self.dropout, dtype=self.dtype)
        self.encoder = ViltEncoder(self.layers, self.width, self.heads, self.mlp_dim, self.act,
                                   self.layer_norm_eps, self.dropout, scan=self.scan_layers,
                                   remat=self.remat, dtype=self.dtype)
        self.layernorm = layer_norm(self.layer_norm_eps, name="layernorm", dtype=self.dtype)
        self.pooler = _DenseBlock(self.width, ("embed", "mlp"), dtype=self.dtype)

    # -- embeddings ---------------------------------------------------------------------------

    def embed_text(self, ids: jax.Array, token_type_ids: jax.Array | None = None,
                   train: bool = False) -> jax.Array:
        """(B, L) ids -> (B, L, D): BERT embeddings (LayerNorm, dropout) + modality type 0."""
        return self.embeddings.text(ids, token_type_ids, not train)

    def patch_embed(self, pixels: jax.Array) -> jax.Array:
        """(B, H, W, 3) -> (B, H // p, W // p, D): the patch projection only."""
        return self.embeddings.patches(pixels)

    def position_grid(self, gh: int, gw: int) -> jax.Array:
        """(gh·gw, D): the patch position embeddings resized to a gh × gw grid, row-major."""
        return self.embeddings.position_grid(gh, gw)

    def embed_image(self, pixels: jax.Array, train: bool = False) -> jax.Array:
        """(B, H, W, 3) -> (B, 1 + gh·gw, D): [cls; patches] + positions, dropout, + modality
        type 1."""
        return self.embeddings.image(pixels, not train)

    def modality_embedding(self, index: int) -> jax.Array:
        """(D,): row `index` of the modality type table (0 text, 1 image)."""
        return self.embeddings.modality(index)

    # -- transformer --------------------------------------------------------------------------

    def encode(self, x: jax.Array, mask: jax.Array | None, collect: Sequence[int] = (),
               train: bool = False) -> dict:
        """x (B, N, D) embeddings, mask (B, N) 1 = attend (None: all) ->
        {tokens: final-LayerNorm output (B, N, D), hidden: raw outputs of the 1-based layers in
        `collect` (before the final LayerNorm), in the order asked}."""
        wanted = tuple(int(i) for i in collect)
        if any(not 1 <= i <= self.layers for i in wanted):
            raise ValueError(f"ViLT: collect {wanted} must lie in 1..{self.layers}")
        att = None if mask is None else (mask != 0)[:, None, None, :]
        x = x.astype(self.dtype)
        # One scan per stretch between requested layers, so the stack is never unrolled.
        after, start = {}, 0
        for end in sorted(set(wanted)):
            x = self.encoder(x, att, start, end, not train)
            after[end], start = x, end
        x = self.encoder(x, att, start, self.layers, not train)
        return dict(tokens=self.layernorm(x), hidden=tuple(after[i] for i in wanted))

    def pool(self, tokens: jax.Array) -> jax.Array:
        """ViLT's pooler: tanh(dense(tokens[:, 0])) -> (B, D)."""
        return jnp.tanh(self.pooler(tokens[:, 0]))

    def __call__(self, ids: jax.Array, att: jax.Array | None, pixels: jax.Array,
                 token_type_ids: jax.Array | None = None, train: bool = False) -> dict:
        """ViltModel(input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask=ones):
        {sequence: (B, L + 1 + gh·gw, D) last_hidden_state, pooled: (B, D) pooler_output}."""
        text = self.embed_text(ids, token_type_ids, train)
        image = self.embed_image(pixels, train)
        b, n_img = image.shape[0], image.shape[1]
        if text.shape[0] != b:
            raise ValueError(f"ViLT: text batch {text.shape[0]} != image batch {b}")
        if att is None:
            att = jnp.ones(ids.shape, jnp.int32)
        mask = jnp.concatenate([att.astype(jnp.int32), jnp.ones((b, n_img), jnp.int32)], axis=1)
        out = self.encode(jnp.concatenate([text, image], axis=1), mask, train=train)
        return dict(sequence=out["tokens"], pooled=self.pool(out["tokens"]))


__all__ = ["VILT_B32", "ViLT", "ViltEncoder", "ViltLayer", "resize_align_corners",
           "vilt_normalise"]
