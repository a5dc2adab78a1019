"""Import Hugging Face ViLT checkpoints into the params of models/vilt.py (the ViLT module).

Reads a local directory holding `config.json` and `model.safetensors` (or its sharded index
`model.safetensors.index.json`), or `pytorch_model.bin` (or `pytorch_model.bin.index.json`).
Accepts a bare ViltModel's keys and the `vilt.`-prefixed keys of the task models
(ViltForMaskedLM, ViltForQuestionAnswering, ...); the heads' keys (`mlm_score.*`,
`itm_score.*`, `classifier.*`, `rank_output.*`) and the text position/token-type id buffers
are ignored. A checkpoint without the pooler (ViltForTokenClassification) is refused.

The checkpoint's config.json is compared with the target ViLT kwargs first: any architectural
difference (width, layers, heads, mlp_dim, patch_size, image_size, vocabulary and table sizes,
LayerNorm epsilon, activation) is one ValueError naming both values and both keys. The position
table is not resized: the module interpolates it to every input's patch grid at run time, so
keep image_size at the checkpoint's. Every source key is accounted for (common.KeyAccounting)
and the result is checked against the module's abstract params.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from magnet_jax.weights import common
from magnet_jax.weights.bert import read_hf_config
from magnet_jax.weights.common import WeightConversionError

# Prefix of ViltModel inside the task models.
MODEL_PREFIX = "vilt."
# Keys of the task heads and of buffers, with no place in ViLT.
IGNORED_PREFIXES = ("mlm_score.", "itm_score.", "classifier.", "rank_output.")
IGNORED_KEYS = ("embeddings.text_embeddings.position_ids",
                "embeddings.text_embeddings.token_type_ids")
# Weight files of a HF directory, in order of preference: (index of shards, single file).
WEIGHT_FILES = (("model.safetensors.index.json", "model.safetensors"),
                ("pytorch_model.bin.index.json", "pytorch_model.bin"))
# ViltConfig's defaults (older config.json files omit some fields).
HF_DEFAULTS = dict(vocab_size=30522, type_vocab_size=2, modality_type_vocab_size=2,
                   max_position_embeddings=40, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                   hidden_dropout_prob=0.0, layer_norm_eps=1e-12, image_size=384,
                   patch_size=32, num_channels=3, qkv_bias=True)
# ViLT kwarg <- ViltConfig field, for the fields that must agree with the checkpoint.
CHECKED_FIELDS = (("width", "hidden_size"), ("layers", "num_hidden_layers"),
                  ("heads", "num_attention_heads"), ("mlp_dim", "intermediate_size"),
                  ("patch_size", "patch_size"), ("image_size", "image_size"),
                  ("vocab_size", "vocab_size"), ("max_text_positions", "max_position_embeddings"),
                  ("type_vocab_size", "type_vocab_size"),
                  ("modality_type_vocab_size", "modality_type_vocab_size"),
                  ("layer_norm_eps", "layer_norm_eps"), ("act", "hidden_act"))
# models.vilt.ViLT's defaults, for target kwargs that leave these fields out.
MODEL_DEFAULTS = dict(max_text_positions=40, type_vocab_size=2, modality_type_vocab_size=2,
                      layer_norm_eps=1e-12, act="gelu")


def _square(value: Any, field: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise WeightConversionError(f"{source}: non-square {field} {list(value)} is not "
                                        "supported")
        value = value[0]
    return int(value)


def vilt_kwargs_from_hf_config(config: Mapping[str, Any],
                               source: str = "config.json") -> dict[str, Any]:
    """HF ViltConfig fields (config.json as a dict) -> models.vilt.ViLT kwargs.

    max_image_length is not read: the module always keeps every patch, in order."""
    model_type = config.get("model_type", "vilt")
    if model_type != "vilt":
        raise WeightConversionError(f"{source}: model_type is {model_type!r}, expected 'vilt'")
    hf = {**HF_DEFAULTS, **config}
    if hf["hidden_act"] != "gelu":
        raise WeightConversionError(
            f"{source}: hidden_act {hf['hidden_act']!r} is not supported (ViLT uses exact GELU)")
    if not hf["qkv_bias"]:
        raise WeightConversionError(f"{source}: qkv_bias false is not supported")
    if int(hf["num_channels"]) != 3:
        raise WeightConversionError(f"{source}: num_channels {hf['num_channels']} is not 3")
    kwargs = dict(vocab_size=int(hf["vocab_size"]), width=int(hf["hidden_size"]),
                  layers=int(hf["num_hidden_layers"]), heads=int(hf["num_attention_heads"]),
                  mlp_dim=int(hf["intermediate_size"]),
                  patch_size=_square(hf["patch_size"], "patch_size", source),
                  image_size=_square(hf["image_size"], "image_size", source),
                  max_text_positions=int(hf["max_position_embeddings"]),
                  type_vocab_size=int(hf["type_vocab_size"]),
                  modality_type_vocab_size=int(hf["modality_type_vocab_size"]),
                  layer_norm_eps=float(hf["layer_norm_eps"]), act=str(hf["hidden_act"]),
                  dropout=float(hf["hidden_dropout_prob"]))
    if kwargs["width"] % kwargs["heads"]:
        raise WeightConversionError(f"{source}: hidden_size {kwargs['width']} is not divisible "
                                    f"by num_attention_heads {kwargs['heads']}")
    return kwargs


def check_compatible(ckpt: Mapping[str, Any], model_kwargs: Mapping[str, Any],
                     source: str = "ViLT checkpoint", config_name: str = "model_kwargs") -> None:
    """One-line ValueError listing every field where checkpoint and target kwargs differ."""
    problems = []
    for field, hf_field in CHECKED_FIELDS:
        want = model_kwargs.get(field, MODEL_DEFAULTS.get(field))
        if want is None:
            raise WeightConversionError(f"{config_name} has no {field!r}")
        if ckpt[field] != want:
            problems.append(f"{source} {hf_field} {ckpt[field]} does not match "
                            f"{config_name}.{field} {want}")
    if problems:
        raise WeightConversionError("; ".join(problems))


def vilt_rules(cfg: Mapping[str, Any]) -> list[common.Rule]:
    """Key map of a ViltModel with ViLT kwargs `cfg` (bare keys -> ViLT params paths), less
    the two (1, ...) nn.Parameters (cls_token, position_embeddings: see vilt_to_params)."""
    b = common.RuleBuilder()
    w, p, mlp = cfg["width"], cfg["patch_size"], cfg["mlp_dim"]
    e = "embeddings"
    t = f"{e}.text_embeddings"
    b.embedding(f"{t}.word_embeddings", "embeddings/text_embeddings/word_embeddings",
                cfg["vocab_size"], w)
    b.embedding(f"{t}.position_embeddings", "embeddings/text_embeddings/position_embeddings",
                cfg["max_text_positions"], w)
    b.embedding(f"{t}.token_type_embeddings", "embeddings/text_embeddings/token_type_embeddings",
                cfg["type_vocab_size"], w)
    b.norm(f"{t}.LayerNorm", "embeddings/text_embeddings/LayerNorm", w)
    b.param(f"{e}.patch_embeddings.projection.weight", "embeddings/patch_embeddings/kernel",
            (w, 3, p, p), "hwio")
    b.param(f"{e}.patch_embeddings.projection.bias", "embeddings/patch_embeddings/bias", (w,))
    b.embedding(f"{e}.token_type_embeddings", "embeddings/token_type_embeddings",
                cfg["modality_type_vocab_size"], w)
    for n in range(cfg["layers"]):
        s, d = f"encoder.layer.{n}", f"encoder/layer_{n}"
        for q in ("query", "key", "value"):
            b.linear(f"{s}.attention.attention.{q}", f"{d}/attention/attention/{q}", w, w)
        b.linear(f"{s}.attention.output.dense", f"{d}/attention/output/dense", w, w)
        b.norm(f"{s}.layernorm_before", f"{d}/layernorm_before", w)
        b.norm(f"{s}.layernorm_after", f"{d}/layernorm_after", w)
        b.linear(f"{s}.intermediate.dense", f"{d}/intermediate/dense", mlp, w)
        b.linear(f"{s}.output.dense", f"{d}/output/dense", w, mlp)
    b.norm("layernorm", "layernorm", w)
    b.linear("pooler.dense", "pooler/dense", w, w)
    return b.rules


def _take_reshaped(acc: common.KeyAccounting, params: dict[str, Any], src: str, dst: str,
                   src_shape: tuple[int, ...], shape: tuple[int, ...]) -> None:
    """An nn.Parameter with leading ones (cls_token, position_embeddings) -> a leaf of `shape`."""
    arr = acc.take(src, src_shape)
    if arr is not None:
        common.assign(params, dst, np.asarray(arr, np.float32).reshape(shape))


def strip_prefix(sd: Mapping[str, Any], source: str = "ViLT checkpoint") -> dict[str, Any]:
    """Drop 'vilt.' (task models' ViltModel) from keys; refuses a clash with bare keys."""
    out = {}
    for k, v in sd.items():
        if k.startswith(MODEL_PREFIX):
            k = k[len(MODEL_PREFIX):]
        if k in out:
            raise WeightConversionError(f"{source} holds {k} both with and without the "
                                        f"{MODEL_PREFIX!r} prefix")
        out[k] = v
    return out


def read_hf_weights(hf_dir: str, trusted: bool = False) -> tuple[dict[str, Any], str]:
    """All tensors of a HF directory (single file or sharded) -> (state dict, file read)."""
    for index_name, single in WEIGHT_FILES:
        index = os.path.join(hf_dir, index_name)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise common.WeightFileError(
                    f"{index} is not a valid shard index ({type(e).__name__}: {e})") from None
            sd: dict[str, Any] = {}
            for shard in shards:
                sd.update(common.load_state_dict(os.path.join(hf_dir, shard), trusted=trusted))
            return sd, index
        path = os.path.join(hf_dir, single)
        if os.path.isfile(path):
            return common.load_state_dict(path, trusted=trusted), path
    raise common.WeightFileNotFoundError(
        f"{hf_dir} holds none of model.safetensors, pytorch_model.bin or their shard indexes")


def abstract_params(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """ShapeDtypeStructs of ViLT(**model_kwargs)'s params (no compute)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from magnet_jax.models.vilt import ViLT  # pylint: disable=g-import-not-at-top
    s = model_kwargs["image_size"]
    ids = jnp.zeros((1, 2), jnp.int32)
    return common.unbox(jax.eval_shape(ViLT(**model_kwargs).init, jax.random.key(0), ids, None,
                                       jnp.zeros((1, s, s, 3), jnp.float32))["params"])


def vilt_to_params(sd: Mapping[str, Any], ckpt: Mapping[str, Any],
                   model_kwargs: Mapping[str, Any], *, source: str = "ViLT checkpoint",
                   check: bool = True) -> dict[str, Any]:
    """State dict of config `ckpt` (ViLT kwargs read from its config.json) -> ViLT params."""
    check_compatible(ckpt, model_kwargs, source)
    sd = strip_prefix(sd, source)
    acc = common.KeyAccounting(sd, what=f"{source} does not match the ViLT key map")
    params = common.apply_rules(vilt_rules(ckpt), acc)
    w, rows = ckpt["width"], (ckpt["image_size"] // ckpt["patch_size"]) ** 2 + 1
    _take_reshaped(acc, params, "embeddings.cls_token", "embeddings/cls_token", (1, 1, w), (w,))
    _take_reshaped(acc, params, "embeddings.position_embeddings",
                   "embeddings/position_embeddings", (1, rows, w), (rows, w))
    for k in list(sd):
        if k.startswith(IGNORED_PREFIXES) or k in IGNORED_KEYS:
            acc.ignore(k)
    acc.finish()
    if check:
        common.check_against_abstract(params, abstract_params(model_kwargs),
                                      what=f"params imported from {source}")
    return params


def import_vilt(path: str | os.PathLike, model_kwargs: Mapping[str, Any], *,
                trusted: bool = False) -> dict[str, Any]:
    """A local HF ViLT directory -> ViLT(**model_kwargs)'s params (NumPy float32 leaves).

    `trusted` lets a .bin file pickle objects other than tensors (arbitrary code: only for
    files from a trusted source)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise common.WeightFileNotFoundError(f"no such ViLT checkpoint directory: {path}")
    if not os.path.isdir(path):
        raise common.WeightFileError(
            f"{path} is a file; pass the Hugging Face ViLT directory (config.json is needed)")
    ckpt = vilt_kwargs_from_hf_config(read_hf_config(path), os.path.join(path, "config.json"))
    sd, source = read_hf_weights(path, trusted)
    return vilt_to_params(sd, ckpt, model_kwargs, source=source)


__all__ = ["check_compatible", "import_vilt", "read_hf_weights", "strip_prefix",
           "vilt_kwargs_from_hf_config", "vilt_rules", "vilt_to_params"]
