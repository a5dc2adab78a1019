"""CM-MaskSD (Wang et al., IEEE TMM 2024), reconstructed (training_objectives.md §7.3;
docs/methods.md says what is stated and what is ours): CRIS's decoder on CLIP's ViT and text
towers, with two masked self-distillation branches that share the main branch's weights:
correlation-guided masked patches and masked words, each distilled towards the unmasked
prediction.

Config: `model.clip` (the towers, the tokenizer), `model.cmmasksd` (the decoder),
`model.mask_threshold` (inference), `cmmasksd` (masking and losses), `init.clip` (weights).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from magnet_jax.methods.base import Method
from magnet_jax.methods.cmmasksd.model import CMMaskSD, infer
from magnet_jax.methods.cmmasksd.objectives import make_objective

VISION_KEYS = ("width", "layers", "heads", "patch_size", "output_dim", "mlp_ratio", "act")
# A text tower this small can only be meant for the bundled synthetic vocabulary.
SYNTHETIC_VOCAB_LIMIT = 1024
TEXT_KEYS = ("width", "layers", "heads", "vocab_size", "context_length", "output_dim",
             "mlp_ratio", "act")


def tower_kwargs(cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """(CLIPVision kwargs, CLIPText kwargs) of a `model` config section."""
    if "clip" not in cfg:
        raise ValueError("model.clip is missing: CM-MaskSD needs its CLIP towers "
                         "(configs/cmmasksd.py)")
    clip = cfg.clip
    vision = {k: clip.vision[k] for k in VISION_KEYS}
    text = {k: clip.text[k] for k in TEXT_KEYS}
    size = int(cfg.image_size)
    if size % vision["patch_size"]:
        raise ValueError(f"model.image_size {size} is not a multiple of "
                         f"model.clip.vision.patch_size {vision['patch_size']}")
    if int(cfg.max_tokens) > text["context_length"]:
        raise ValueError(f"model.max_tokens {cfg.max_tokens} exceeds "
                         f"model.clip.text.context_length {text['context_length']}")
    scan = bool(cfg.get("scan_layers", True))
    remat = bool(cfg.get("remat", False))
    vision.update(image_size=size, scan_layers=scan, remat=remat)
    text.update(scan_layers=scan, remat=remat)
    return vision, text


def build_cmmasksd(cfg: ml_collections.ConfigDict) -> CMMaskSD:
    from magnet_jax.models import DTYPES
    vision, text = tower_kwargs(cfg)
    c = cfg.cmmasksd
    if c.d_model % c.num_heads or c.d_model % 2:
        raise ValueError(f"model.cmmasksd.d_model {c.d_model} must be even and divisible by "
                         f"model.cmmasksd.num_heads {c.num_heads}")
    layers = tuple(int(i) for i in c.feature_layers)
    if len(layers) != 3 or any(not 1 <= i <= vision["layers"] for i in layers):
        raise ValueError(f"model.cmmasksd.feature_layers {layers} must name 3 layers in "
                         f"1..{vision['layers']} (model.clip.vision.layers)")
    strides = tuple(int(s) for s in c.get("pyramid_strides", (8, 16, 32)))
    if (len(strides) != 3 or strides[0] < 4 or any(b != 2 * a for a, b in zip(strides, strides[1:]))
            or int(cfg.image_size) % strides[2]):
        raise ValueError(f"model.cmmasksd.pyramid_strides {strides} must be 3 doubling strides "
                         f">= 4 that divide model.image_size {cfg.image_size}")
    threshold = float(cfg.get("mask_threshold", 0.5))
    if not 0 < threshold < 1:
        raise ValueError(f"model.mask_threshold must be in (0, 1), got {threshold}")
    return CMMaskSD(vision=vision, text=text, feature_layers=layers, pyramid_strides=strides,
                    d_model=c.d_model,
                    num_layers=c.num_layers, num_heads=c.num_heads, ffn_dim=c.ffn_dim,
                    dropout=c.dropout, kernel_size=c.kernel_size, mask_threshold=threshold,
                    dtype=DTYPES[cfg.get("dtype", "float32")])


def make_tokenizer(cfg: ml_collections.ConfigDict, path: str | None = None):
    """CLIP's BPE from `path`, else model.clip.tokenizer ("" = the bundled synthetic vocab)."""
    from magnet_jax.data.clip_tokenizer import load_clip_tokenizer
    source = path or cfg.clip.get("tokenizer", "") or None
    vocab = int(cfg.clip.text.vocab_size)
    if source is None and vocab > SYNTHETIC_VOCAB_LIMIT:
        raise ValueError("model.clip.tokenizer is empty: set it to the CLIP directory of "
                         "init.clip (vocab.json + merges.txt) or to OpenAI's "
                         "bpe_simple_vocab_16e6.txt.gz; the bundled vocabulary covers only the "
                         "synthetic data")
    tokenizer = load_clip_tokenizer(source, int(cfg.max_tokens))
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"CLIP tokenizer {tokenizer.source} has {tokenizer.vocab_size} entries, "
                         f"more than model.clip.text.vocab_size {vocab}")
    return tokenizer


def import_pretrained(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """init.clip (a Hugging Face CLIP directory or an OpenAI state_dict) -> the towers' params."""
    path = config.init.get("clip", "")
    if not path:
        return {}
    from magnet_jax.weights.clip import import_clip
    vision, text = tower_kwargs(config.model)
    towers = import_clip(path, vision_cfg=vision, text_cfg=text)
    return {"clip_vision": towers["vision"], "clip_text": towers["text"]}


METHOD = Method(
    name="cmmasksd",
    description="CM-MaskSD: CLIP + CRIS decoder + cross-modal masked self-distillation "
                "(reconstruction)",
    build_model=build_cmmasksd,
    make_objective=make_objective,
    config_sections=("cmmasksd",),
    model_sections=("clip", "cmmasksd"),
    infer=infer,
    make_tokenizer=make_tokenizer,
    import_pretrained=import_pretrained,
    text_notes=("CLIP BPE ids: <|startoftext|> ... <|endoftext|> truncated to T tokens (the last "
                "kept id replaced by <|endoftext|>), right-padded with 0 "
                "(magnet_jax.data.clip_tokenizer.load_clip_tokenizer(path, T).encode(text).ids)",
                "CLIP byte-level BPE: the model config's clip.tokenizer (a Hugging Face CLIP "
                "directory, OpenAI's bpe_simple_vocab_16e6.txt.gz, or '' = the bundled synthetic "
                "vocabulary magnet_jax/assets/clip-synthetic-bpe)"),
)
