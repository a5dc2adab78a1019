"""MagNet: the interleaved multimodal Swin / BERT encoder, pixel decoder and mask decoder.

magnet_architecture.md §1 gives the schedule. Per stage s: Swin blocks, BERT layers, then
image-side fusion and language-side fusion, both from the pre-fusion tensors. The parameter
tree matches the official state_dict (§9) up to Linen naming.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from magnet_jax.models import ops
from magnet_jax.models.bert import BertEmbeddings, BertEncoder, additive_attention_mask
from magnet_jax.models.fusion import (ImagePWAM, LanguagePWAM, Mixer, PyramidPool,
                                      batched_pyramid_branches, fuse_image_stage,
                                      pyramid_branch)
from magnet_jax.models.layers import (TanhGate, dense, normal_002, stochastic_depth_rates,
                                      torch_default_kernel)
from magnet_jax.models.mask_decoder import MaskedAttentionDecoder
from magnet_jax.models.msdeform import PixelDecoder
from magnet_jax.models.stacks import MIN_SCAN_STEPS, layer_keys, scan_layers
from magnet_jax.models.swin import PatchEmbed, PatchMerging, SwinBlock

Dtype = Any
LANG_PWAM_MASKS = ("official", "binary")
LANG_GATE_INITS = {"zeros": nn.initializers.zeros, "normal": normal_002}


class ImageStage(nn.Module):
    """One stage of the multimodal Swin (`image_model/layers_s`)."""
    dim: int
    depth: int
    num_heads: int
    window_size: int
    mlp_ratio: float
    drop_path: Sequence[float]
    pyramid_pools: Sequence[int]
    has_downsample: bool
    remat: bool = False
    scan: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        block_cls = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat else SwinBlock
        self.blocks = [block_cls(self.dim, self.num_heads, self.window_size,
                                 0 if j % 2 == 0 else self.window_size // 2,
                                 self.mlp_ratio, self.drop_path[j], dtype=self.dtype)
                       for j in range(self.depth)]
        r = self.dim // 4
        self.fusion = ImagePWAM(self.dim, dtype=self.dtype)
        # The last stage's gated tokens are discarded, so its gate is not built.
        self.res_gate = TanhGate(self.dim, "gelu", dtype=self.dtype) if self.has_downsample else None
        self.pyramids = [PyramidPool(self.dim, r, p, dtype=self.dtype) for p in self.pyramid_pools]
        self.fusions = [ImagePWAM(r, dtype=self.dtype) for _ in self.pyramid_pools]
        self.mixer = Mixer(self.dim, dtype=self.dtype)
        self.downsample = PatchMerging(self.dim, dtype=self.dtype) if self.has_downsample else None

    def run_blocks(self, x, deterministic: bool):
        pairs = self.depth // 2
        if not self.scan or self.depth % 2 or pairs < MIN_SCAN_STEPS or self.is_initializing():
            for block in self.blocks:
                x = block(x, deterministic)
            return x
        # (plain, shifted) block pairs as one scan step: the two differ in their static shift.
        params = self.variables["params"]
        pair_params = [(params[f"blocks_{2 * k}"], params[f"blocks_{2 * k + 1}"])
                       for k in range(pairs)]
        rates = jnp.asarray(self.drop_path, jnp.float32).reshape(pairs, 2)
        keys = layer_keys(None if deterministic else self.make_rng("droppath"), pairs)
        blocks = [SwinBlock(self.dim, self.num_heads, self.window_size, shift, self.mlp_ratio,
                            dtype=self.dtype, parent=None)   # unbound: applied per step
                  for shift in (0, self.window_size // 2)]

        def step(x, pair, inputs):
            rate, key = inputs
            for j, (block, p) in enumerate(zip(blocks, pair)):
                rngs = {} if key is None else {"droppath": jax.random.fold_in(key, j)}
                x = block.apply({"params": p}, x, deterministic, rate[j], rngs=rngs)
            return x, None

        x, _ = scan_layers(step, x, pair_params, (rates, keys), remat=self.remat)
        return x

    def fuse(self, x, words, m01):
        """-> (feature map for the pixel decoder, input of the next stage or None)."""
        pools = tuple(self.pyramid_pools)
        if self.scan and len(pools) >= MIN_SCAN_STEPS and not self.is_initializing():
            params = self.variables["params"]
            branches = batched_pyramid_branches(
                [params[f"pyramids_{k}"] for k in range(len(pools))],
                [params[f"fusions_{k}"] for k in range(len(pools))],
                pools, self.dim, self.dim // 4, x, words, m01, dtype=self.dtype)
        else:
            branches = [pyramid_branch(p, fu, x, words, m01)
                        for p, fu in zip(self.pyramids, self.fusions)]
        feat, gated = fuse_image_stage(x, words, m01, fusion=self.fusion, res_gate=self.res_gate,
                                       mixer=self.mixer, branches=branches)
        nxt = self.downsample(gated) if self.downsample is not None else None
        return feat, nxt


class ImageModel(nn.Module):
    """The multimodal Swin trunk (`image_model`)."""
    patch_size: int
    embed_dim: int
    depths: Sequence[int]
    num_heads: Sequence[int]
    window_size: int
    mlp_ratio: float
    drop_path_rate: float
    pyramid_pools: Sequence[int]
    remat: bool = False
    scan: bool = True
    dtype: Dtype = jnp.float32

    def setup(self):
        self.patch_embed = PatchEmbed(self.embed_dim, self.patch_size, dtype=self.dtype)
        rates = stochastic_depth_rates(self.drop_path_rate, self.depths)
        n = len(self.depths)
        self.layers = [ImageStage(self.embed_dim * 2 ** s, self.depths[s], self.num_heads[s],
                                  self.window_size, self.mlp_ratio, tuple(rates[s]),
                                  tuple(self.pyramid_pools), s < n - 1, remat=self.remat,
                                  scan=self.scan, dtype=self.dtype)
                       for s in range(n)]

    def embed(self, image):
        return self.patch_embed(image)

    def run_blocks(self, stage: int, x, deterministic: bool):
        return self.layers[stage].run_blocks(x, deterministic)

    def fuse(self, stage: int, x, words, m01):
        return self.layers[stage].fuse(x, words, m01)


class LanguageModel(nn.Module):
    """BERT with language-side PWAMs and gates (`language_model`)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_dropout: float
    attention_dropout: float
    num_fusions: int
    remat: bool = False
    scan: bool = True
    # "zeros" is the official init; both gate layers at zero get zero gradients, so the
    # language-side fusion never switches on in training. "normal": N(0, 0.02²) as the image side.
    res_gate_init: str = "zeros"
    dtype: Dtype = jnp.float32

    def setup(self):
        if self.res_gate_init not in LANG_GATE_INITS:
            raise ValueError("model.fusion.lang_gate_init must be one of "
                             f"{tuple(LANG_GATE_INITS)}, got {self.res_gate_init!r}")
        self.embeddings = BertEmbeddings(self.vocab_size, self.hidden_size,
                                         self.max_position_embeddings, self.type_vocab_size,
                                         self.layer_norm_eps, self.hidden_dropout, dtype=self.dtype)
        self.encoder = BertEncoder(self.num_layers, self.hidden_size, self.num_heads,
                                   self.intermediate_size, self.layer_norm_eps,
                                   self.hidden_dropout, self.attention_dropout,
                                   remat=self.remat, scan=self.scan, dtype=self.dtype)
        self.pwams = [LanguagePWAM(self.hidden_size, dtype=self.dtype) for _ in range(self.num_fusions)]
        self.res_gates = [TanhGate(self.hidden_size, "relu",
                                   kernel_init=LANG_GATE_INITS[self.res_gate_init],
                                   dtype=self.dtype) for _ in range(self.num_fusions)]

    def embed(self, ids, deterministic: bool):
        return self.embeddings(ids, deterministic)

    def run_layers(self, words, mask, start: int, end: int, deterministic: bool):
        return self.encoder(words, mask, start, end, deterministic)

    def fuse(self, stage: int, words, x_map, e):
        b, h, w, c = x_map.shape
        out = self.pwams[stage](words, x_map.reshape(b, h * w, c), e)
        return self.res_gates[stage](words, out)


class MagNet(nn.Module):
    """image (B, H, W, 3) normalised, ids (B, N) int, att (B, N) {0,1} ->
    dict(pred_masks (B, Q, H/4, W/4), pred_logits (B, Q, 2), aux_outputs [9 × the same]).

    With `training_heads`, the modules that the official checkpoints carry but inference never
    runs are built too: the last language fusion (`language_model/pwams_3`, `res_gates_3`),
    which gives the final language features l_4', and `lang_proj` (text -> pixel-embedding
    width), both used by the training objectives (training_objectives.md §3.3, §5).
    """
    image_model_kwargs: dict
    language_model_kwargs: dict
    text_stage_ends: Sequence[int]
    lang_pwam_mask: str = "official"
    pixel_decoder_kwargs: dict = None
    decoder_kwargs: dict = None
    training_heads: bool = False
    dtype: Dtype = jnp.float32
    # Generalised RIS (> 0): inference answers "no target" (an empty mask) where the class
    # head's no-object probability exceeds this (methods.base.infer_with_no_target).
    no_target_threshold: float = 0.0

    def setup(self):
        self.setup_trunk()
        self.predictor = MaskedAttentionDecoder(**(self.decoder_kwargs or {}), dtype=self.dtype)
        if self.training_heads:
            self.lang_proj = dense((self.decoder_kwargs or {}).get("hidden_dim", 256),
                                   name="lang_proj", kernel_init=torch_default_kernel,
                                   dtype=self.dtype)

    def setup_trunk(self):
        """The encoder and the pixel decoder: what methods built on the trunk share."""
        if self.lang_pwam_mask not in LANG_PWAM_MASKS:
            raise ValueError(f"model.fusion.lang_pwam_mask must be one of {LANG_PWAM_MASKS}, "
                             f"got {self.lang_pwam_mask!r}")
        num_stages = len(self.image_model_kwargs["depths"])
        if len(self.text_stage_ends) != num_stages:
            raise ValueError(f"model.bert.stage_ends needs {num_stages} entries, "
                             f"got {tuple(self.text_stage_ends)}")
        self.image_model = ImageModel(**self.image_model_kwargs, dtype=self.dtype)
        # At inference l_4' feeds nothing (§4.4): the last language fusion is not built.
        num_fusions = num_stages if self.training_heads else num_stages - 1
        self.language_model = LanguageModel(**self.language_model_kwargs,
                                            num_fusions=num_fusions, dtype=self.dtype)
        self.pixel_decoder = PixelDecoder(**(self.pixel_decoder_kwargs or {}), dtype=self.dtype)

    def _masks(self, att):
        m01 = att.astype(jnp.float32)[..., None]                 # (B, N, 1)
        ext = additive_attention_mask(att)                       # (B, 1, N), 0 / −10000
        # The official code hands BERT's additive mask to the language PWAM (§4.3).
        lang_e = jnp.swapaxes(ext, 1, 2) if self.lang_pwam_mask == "official" else m01
        return m01, ext, lang_e

    def _text_stage(self, s, words, ext, lang_e, visual, start, end, deterministic):
        """BERT layers [start, end) of stage s, then (if built) the language fusion with the
        stage's pre-fusion visual map. Returns (l_s, l_s' or None)."""
        words = self.language_model.run_layers(words, ext, start, end, deterministic)
        if s < self.language_model.num_fusions:
            return words, self.language_model.fuse(s, words, visual, lang_e)
        return words, None

    def encode(self, image, ids, att, train: bool = False, return_intermediates: bool = False,
               masked_ids=None):
        """Interleaved encoder -> list of 4 fused feature maps, fine to coarse (NHWC).

        return_intermediates: also the pre-fusion visual maps i_1..i_4 and the final language
        features (l_4' when the training heads are built, else l_4), as a dict.
        masked_ids: other token ids (B, N) with the same attention mask (Mask Grounding's
        masked sentence), run through the language path beside `ids` as one batch of 2B, with
        the visual maps of this pass: `encode_text` in the same program, not a second copy of
        the language path. Their final features go to the intermediates as masked_text_final.
        """
        deterministic = not train
        m01, ext, lang_e = self._masks(att)
        b = ids.shape[0]
        x = self.image_model.embed(image.astype(self.dtype))
        if masked_ids is not None:
            ids = jnp.concatenate([ids, masked_ids.astype(ids.dtype)])
            ext, lang_e = (jnp.concatenate([a, a]) for a in (ext, lang_e))
        words = self.language_model.embed(ids, deterministic)
        features, visual_stages, start = [], [], 0
        for s, end in enumerate(self.text_stage_ends):
            x = self.image_model.run_blocks(s, x, deterministic)
            visual = x if masked_ids is None else jnp.concatenate([x, x])
            words, fused_words = self._text_stage(s, words, ext, lang_e, visual, start, end,
                                                  deterministic)
            feat, x_next = self.image_model.fuse(s, x, words[:b], m01)
            features.append(feat)
            visual_stages.append(x)
            words = fused_words if fused_words is not None else words
            x, start = x_next, end
        if return_intermediates:
            extra = dict(visual_stages=visual_stages, text_final=words[:b])
            if masked_ids is not None:
                extra["masked_text_final"] = words[b:]
            return features, extra
        return features

    def encode_text(self, ids, att, visual_stages, train: bool = False):
        """The language path alone on other token ids (e.g. a masked sentence), fused with the
        visual maps of a previous `encode`: -> final language features (B, N, C_text)."""
        deterministic = not train
        _, ext, lang_e = self._masks(att)
        words, start = self.language_model.embed(ids, deterministic), 0
        for s, end in enumerate(self.text_stage_ends):
            words, fused_words = self._text_stage(s, words, ext, lang_e, visual_stages[s], start,
                                                  end, deterministic)
            words = fused_words if fused_words is not None else words
            start = end
        return words

    def project_text(self, text_features):
        """lang_proj: text features (..., C_text) -> the pixel-embedding width (training only)."""
        if not self.training_heads:
            raise ValueError("project_text needs the training heads (model.training_heads=True)")
        return self.lang_proj(text_features)

    def __call__(self, image, ids, att, train: bool = False, return_intermediates: bool = False,
                 masked_ids=None):
        """return_intermediates adds `intermediates`: visual_stages, text_final, features
        (the 4 fused maps), mask_features and, with the training heads, text_projected
        (lang_proj of text_final), for the training objectives; with masked_ids (see
        `encode`) also masked_text_final."""
        features, extra = self.encode(image, ids, att, train, return_intermediates=True,
                                      masked_ids=masked_ids)
        mask_features, memories = self.pixel_decoder(features)
        predictions = self.predictor(memories, mask_features)
        final = predictions[-1]
        outputs = dict(pred_masks=final["pred_masks"], pred_logits=final["pred_logits"],
                       aux_outputs=predictions[:-1])
        if self.training_heads:
            # Always run, so that init creates lang_proj; 20 tokens, negligible cost.
            extra["text_projected"] = self.lang_proj(extra["text_final"])
        if return_intermediates:
            outputs["intermediates"] = dict(extra, features=features, mask_features=mask_features)
        return outputs


def upsample_mask_logits(pred_masks: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, Q, h, w) mask logits -> (B, H, W) float32 logits of query 0, bilinear with
    align_corners=True like the official evaluation."""
    masks = pred_masks[:, 0, :, :, None].astype(jnp.float32)
    return ops.resize_bilinear_align_corners(masks, size)[..., 0]


def mask_logits_at(outputs: dict, size: tuple[int, int]) -> jax.Array:
    """Final mask logits of a model output dict at `size`: (B, H, W) float32.

    Binary mask = jax.nn.sigmoid(logits) > 0.5 (not logits > 0; magnet_architecture.md §7).
    """
    return upsample_mask_logits(outputs["pred_masks"], size)


def binary_mask(logits: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(logits.astype(jnp.float32)) > 0.5
