"""Import Hugging Face BERT checkpoints into params/language_model/{embeddings,encoder}.

Reads a local directory holding `config.json` and `model.safetensors` (preferred, no torch) or
`pytorch_model.bin`. Handles the `bert.` prefix of pre-training checkpoints and the legacy
`LayerNorm.gamma/beta` names; ignores `pooler.*`, `cls.*` and the `embeddings.position_ids` /
`embeddings.token_type_ids` buffers (`jax_stack.md` §10, `magnet_architecture.md` §9.3).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from magnet_jax.weights import common
from magnet_jax.weights.common import WeightConversionError

# Prefixes of keys that exist in HF files but have no place in the MagNet language model.
IGNORED_PREFIXES = ("pooler.", "cls.")
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def add_bert_rules(b: common.RuleBuilder, src: str, dst: str, bert: Mapping[str, Any]) -> None:
    """Rules for BertEmbeddings + BertEncoder; `src`/`dst` end without a separator ('' allowed)."""
    s = f"{src}." if src else ""
    d = f"{dst}/" if dst else ""
    h, inter = bert["hidden_size"], bert["intermediate_size"]
    b.embedding(f"{s}embeddings.word_embeddings", f"{d}embeddings/word_embeddings",
                bert["vocab_size"], h)
    b.embedding(f"{s}embeddings.position_embeddings", f"{d}embeddings/position_embeddings",
                bert["max_position_embeddings"], h)
    b.embedding(f"{s}embeddings.token_type_embeddings", f"{d}embeddings/token_type_embeddings",
                bert["type_vocab_size"], h)
    b.norm(f"{s}embeddings.LayerNorm", f"{d}embeddings/LayerNorm", h)
    for n in range(bert["num_layers"]):
        ls, ld = f"{s}encoder.layer.{n}", f"{d}encoder/layer_{n}"
        for q in ("query", "key", "value"):
            b.linear(f"{ls}.attention.self.{q}", f"{ld}/attention/self/{q}", h, h)
        b.linear(f"{ls}.attention.output.dense", f"{ld}/attention/output/dense", h, h)
        b.norm(f"{ls}.attention.output.LayerNorm", f"{ld}/attention/output/LayerNorm", h)
        b.linear(f"{ls}.intermediate.dense", f"{ld}/intermediate/dense", inter, h)
        b.linear(f"{ls}.output.dense", f"{ld}/output/dense", h, inter)
        b.norm(f"{ls}.output.LayerNorm", f"{ld}/output/LayerNorm", h)


def bert_rules(bert: Mapping[str, Any]) -> list[common.Rule]:
    b = common.RuleBuilder()
    add_bert_rules(b, "", "", bert)
    return b.rules


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """HF BertConfig fields -> the contract's model.bert fields (incl. stage_ends)."""
    model_type = hf.get("model_type", "bert")
    if model_type != "bert":
        raise WeightConversionError(f"{source}: model_type is {model_type!r}, expected 'bert'")
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise WeightConversionError(
            f"{source}: hidden_act {act!r} is not supported (the Linen BERT uses exact erf GELU)")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise WeightConversionError(f"{source}: position_embedding_type {pos!r} is not supported")
    try:
        layers = int(hf["num_hidden_layers"])
        cfg = dict(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]), num_layers=layers,
            num_heads=int(hf["num_attention_heads"]), intermediate_size=int(hf["intermediate_size"]),
            max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
            type_vocab_size=int(hf.get("type_vocab_size", 2)),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
            attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
            stage_ends=common.equal_split_ends(layers, 4))
    except KeyError as e:
        raise WeightConversionError(f"{source}: missing field {e.args[0]!r}") from None
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise WeightConversionError(
            f"{source}: hidden_size {cfg['hidden_size']} is not divisible by "
            f"num_attention_heads {cfg['num_heads']}")
    return cfg


def normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Strip 'module.' / 'bert.' prefixes, rename legacy LayerNorm.gamma/beta."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "bert."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        if k in out:
            raise WeightConversionError(
                f"BERT checkpoint has two entries for {k} after normalising names")
        out[k] = v
    return out


def bert_to_params(state_dict: Mapping[str, Any], bert: Mapping[str, Any],
                   what: str = "BERT checkpoint"):
    """HF BERT state dict + model.bert config -> ({'embeddings', 'encoder'} subtree, key report)."""
    sd = normalise_keys(state_dict)
    acc = common.KeyAccounting(sd, what=f"{what} does not match the BERT key map")
    params = common.apply_rules(bert_rules(bert), acc)
    for k in list(sd):
        if k.startswith(IGNORED_PREFIXES) or k in IGNORED_BUFFERS:
            acc.ignore(k)
    acc.finish()
    return params, acc


def find_weights_file(hf_dir: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            return path
    raise common.WeightFileNotFoundError(
        f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise common.WeightFileNotFoundError(f"no config.json in {hf_dir}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise common.WeightFileError(f"{path} is not valid JSON ({e})") from None


def import_bert(hf_dir: str, *, trusted: bool = False, return_report: bool = False):
    """Local HF BERT directory -> (params subtree for params/language_model, model.bert dict)."""
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise common.WeightFileNotFoundError(f"no such directory: {hf_dir}")
    hf = read_hf_config(hf_dir)
    bert = config_from_hf(hf, os.path.join(hf_dir, "config.json"))
    weights = find_weights_file(hf_dir)
    sd = common.load_state_dict(weights, trusted=trusted)
    params, acc = bert_to_params(sd, bert, what=weights)
    if return_report:
        return params, bert, acc
    return params, bert
