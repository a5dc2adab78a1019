"""Key map of the official MagNet checkpoints (`magnet_architecture.md` §9).

`official_to_params(state_dict)` infers the architecture from tensor shapes, maps every key to
its Linen path with the right layout transform, recomputes and checks the 24 Swin
`relative_position_index` buffers, skips the dead keys of §9.6 (`ignored_official_keys`) and
fails with ONE error naming every missing, unexpected or wrongly shaped key.
`params_to_official(params, config)` is the exact inverse (plus the dead keys), used by the
round-trip tests to synthesise official-format state dicts without the official code.

What cannot be inferred from shapes, and the rule used instead:
- image size: not stored; `image_size` argument, default 480 (448 for `magnet_all.pth`);
- BERT heads: `bert_num_heads` if given, else the base config's when its hidden size matches
  (12 for 768), else hidden / 64 (the BERT-base head size);
- pixel-decoder heads: `attention_weights` only gives heads × levels × points; heads come from
  the base config (8 for the official model), points = the rest;
- decoder heads: from the base config (8 for the official model);
- pyramid pool sizes: (1, 2, 3, 6) when there are 4 pyramids, else `pyramid_pools` must be given;
- BERT stage ends: the layers split into one near-equal part per Swin stage
  (`common.equal_split_ends`: 12 -> (3, 6, 9, 12));
- drop_path_rate, dropout, dtype, remat, max_tokens: training/runtime settings, kept from the
  base config.
The base config is `magnet_jax.models.presets.official_model_config()` (or `base_config=`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from magnet_jax.weights import bert as bert_mod
from magnet_jax.weights import common
from magnet_jax.weights import swin as swin_mod
from magnet_jax.weights.common import WeightConversionError

OFFICIAL_POOLS = (1, 2, 3, 6)
# Keys whose presence identifies an official MagNet state dict.
_SIGNATURE_KEYS = (
    "image_model.patch_embed.proj.weight",
    "image_model.layers.0.fusion.vis_project.0.weight",
    "language_model.embeddings.word_embeddings.weight",
    "classifier.predictor.query_feat.weight",
)


@dataclasses.dataclass
class ConversionResult:
    params: dict[str, Any]
    config: Any  # ml_collections.ConfigDict (model section)
    consumed: list[str]
    ignored: list[str]
    num_source_keys: int


# ---------------------------------------------------------------------------------------------
# Config handling.

def base_model_config():
    """The official model config (magnet_jax.models.presets)."""
    from magnet_jax.models.presets import official_model_config
    return official_model_config()


def _cfg(cfg: Any) -> dict[str, Any]:
    """ConfigDict / dict -> plain nested dict (read-only use)."""
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    return dict(cfg)


# ---------------------------------------------------------------------------------------------
# The key map, generated from a config.


def _stage_dims(cfg) -> list[int]:
    sw = cfg["swin"]
    return [sw["embed_dim"] * 2**s for s in range(len(sw["depths"]))]


def _image_pwam(b: common.RuleBuilder, src: str, dst: str, d: int, text: int) -> None:
    b.conv1d(f"{src}.vis_project.0", f"{dst}/vis_project", d, d)
    att_s, att_d = f"{src}.image_lang_att", f"{dst}/image_lang_att"
    b.conv1d(f"{att_s}.f_key.0", f"{att_d}/f_key", d, text)
    b.conv1d(f"{att_s}.f_value.0", f"{att_d}/f_value", d, text)
    b.linear(f"{att_s}.f_query.0", f"{att_d}/f_query", d, d)
    b.norm(f"{att_s}.f_query.1", f"{att_d}/f_query_norm", d)
    b.linear(f"{att_s}.W.0", f"{att_d}/W", d, d)
    b.norm(f"{att_s}.W.1", f"{att_d}/W_norm", d)
    b.conv1d(f"{src}.project_mm.0", f"{dst}/project_mm", d, d)


def _language_pwam(b: common.RuleBuilder, src: str, dst: str, text: int, vis: int) -> None:
    b.linear(f"{src}.vis_project.0", f"{dst}/vis_project", text, text)  # Linear here (trap)
    att_s, att_d = f"{src}.image_lang_att", f"{dst}/image_lang_att"
    b.conv1d(f"{att_s}.f_query.0", f"{att_d}/f_query", text, text)
    b.conv1d(f"{att_s}.f_key.0", f"{att_d}/f_key", text, vis)
    b.conv1d(f"{att_s}.f_value.0", f"{att_d}/f_value", text, vis)
    b.conv1d(f"{att_s}.W.0", f"{att_d}/W", text, text)
    b.conv1d(f"{src}.project_mm.0", f"{dst}/project_mm", text, text)


def official_rules(config: Any) -> list[common.Rule]:
    """Every consumed key of an official state dict for `config`, with its Linen path(s)."""
    cfg = _cfg(config)
    sw, bt, fu = cfg["swin"], cfg["bert"], cfg["fusion"]
    pd, dc = cfg["pixel_decoder"], cfg["decoder"]
    dims = _stage_dims(cfg)
    num_stages = len(dims)
    text = bt["hidden_size"]
    pools = tuple(fu["pyramid_pools"])
    b = common.RuleBuilder()

    # --- image_model (§9.2): Swin trunk in the Microsoft layout, then the fusion modules
    swin_mod.add_swin_rules(b, "image_model", "image_model", sw, swin_mod.MICROSOFT)
    for s, c in enumerate(dims):
        src, dst = f"image_model.layers.{s}", f"image_model/layers_{s}"
        _image_pwam(b, f"{src}.fusion", f"{dst}/fusion", c, text)
        if s < num_stages - 1:  # the last stage's gate is dead (§9.6)
            b.linear(f"{src}.res_gate.0", f"{dst}/res_gate/fc1", c, c, bias=False)
            b.linear(f"{src}.res_gate.2", f"{dst}/res_gate/fc2", c, c, bias=False)
        r = c // 4
        for k in range(len(pools)):
            ps, pdst = f"{src}.pyramids.{k}", f"{dst}/pyramids_{k}"
            b.conv1x1(f"{ps}.1", f"{pdst}/expand", 4 * c, c, bias=False)
            b.norm(f"{ps}.2", f"{pdst}/norm", 4 * c)
            b.conv1x1(f"{ps}.3", f"{pdst}/reduce", c, 4 * c, bias=False)
            b.conv1x1(f"{ps}.5", f"{pdst}/out", r, c, bias=False)
            _image_pwam(b, f"{src}.fusions.{k}", f"{dst}/fusions_{k}", r, text)
        b.linear(f"{src}.mixer.0", f"{dst}/mixer/fc1", c, len(pools) * r + c)
        b.norm(f"{src}.mixer.1", f"{dst}/mixer/norm", c)
        b.linear(f"{src}.mixer.2", f"{dst}/mixer/fc2", c, c)

    # --- language_model (§9.3)
    lm, ld = "language_model", "language_model"
    bert_mod.add_bert_rules(b, lm, ld, bt)
    for s in range(num_stages - 1):  # the last stage's language fusion is dead (§9.6)
        _language_pwam(b, f"{lm}.pwams.{s}", f"{ld}/pwams_{s}", text, dims[s])
        b.linear(f"{lm}.res_gates.{s}.0", f"{ld}/res_gates_{s}/fc1", text, text, bias=False)
        b.linear(f"{lm}.res_gates.{s}.2", f"{ld}/res_gates_{s}/fc2", text, text, bias=False)

    # --- classifier.pixel_decoder (§9.4); level k reads stage num_stages-1-k
    ps, pdd = "classifier.pixel_decoder", "pixel_decoder"
    cd = pd["conv_dim"]
    levels = num_stages
    for k in range(levels):
        b.conv1x1(f"{ps}.input_proj.{k}.0", f"{pdd}/input_proj_{k}/proj", cd, dims[num_stages - 1 - k])
        b.norm(f"{ps}.input_proj.{k}.1", f"{pdd}/input_proj_{k}/norm", cd)
    b.param(f"{ps}.transformer.level_embed", f"{pdd}/transformer/level_embed", (levels, cd))
    samples = pd["num_heads"] * levels * pd["num_points"]
    for n in range(pd["num_layers"]):
        es, ed = f"{ps}.transformer.encoder.layers.{n}", f"{pdd}/transformer/encoder/layers_{n}"
        b.linear(f"{es}.self_attn.sampling_offsets", f"{ed}/self_attn/sampling_offsets", 2 * samples, cd)
        b.linear(f"{es}.self_attn.attention_weights", f"{ed}/self_attn/attention_weights", samples, cd)
        b.linear(f"{es}.self_attn.value_proj", f"{ed}/self_attn/value_proj", cd, cd)
        b.linear(f"{es}.self_attn.output_proj", f"{ed}/self_attn/output_proj", cd, cd)
        b.norm(f"{es}.norm1", f"{ed}/norm1", cd)
        b.linear(f"{es}.linear1", f"{ed}/linear1", pd["ffn_dim"], cd)
        b.linear(f"{es}.linear2", f"{ed}/linear2", cd, pd["ffn_dim"])
        b.norm(f"{es}.norm2", f"{ed}/norm2", cd)
    b.conv1x1(f"{ps}.mask_features", f"{pdd}/mask_features", cd, cd)

    # --- classifier.predictor (§9.5)
    qs, qd = "classifier.predictor", "predictor"
    hd = dc["hidden_dim"]
    for n in range(dc["num_layers"]):
        b.mha(f"{qs}.transformer_cross_attention_layers.{n}.multihead_attn", f"{qd}/cross_attn_{n}", hd)
        b.norm(f"{qs}.transformer_cross_attention_layers.{n}.norm", f"{qd}/cross_attn_{n}/norm", hd)
        b.mha(f"{qs}.transformer_self_attention_layers.{n}.self_attn", f"{qd}/self_attn_{n}", hd)
        b.norm(f"{qs}.transformer_self_attention_layers.{n}.norm", f"{qd}/self_attn_{n}/norm", hd)
        b.linear(f"{qs}.transformer_ffn_layers.{n}.linear1", f"{qd}/ffn_{n}/linear1", dc["ffn_dim"], hd)
        b.linear(f"{qs}.transformer_ffn_layers.{n}.linear2", f"{qd}/ffn_{n}/linear2", hd, dc["ffn_dim"])
        b.norm(f"{qs}.transformer_ffn_layers.{n}.norm", f"{qd}/ffn_{n}/norm", hd)
    b.norm(f"{qs}.decoder_norm", f"{qd}/decoder_norm", hd)
    b.param(f"{qs}.query_feat.weight", f"{qd}/query_feat", (dc["num_queries"], hd))
    b.param(f"{qs}.query_embed.weight", f"{qd}/query_embed", (dc["num_queries"], hd))
    b.param(f"{qs}.level_embed.weight", f"{qd}/level_embed", (levels - 1, hd))
    b.linear(f"{qs}.class_embed", f"{qd}/class_embed", dc["num_classes"] + 1, hd)
    b.linear(f"{qs}.mask_embed.layers.0", f"{qd}/mask_embed/layers_0", hd, hd)
    b.linear(f"{qs}.mask_embed.layers.1", f"{qd}/mask_embed/layers_1", hd, hd)
    b.linear(f"{qs}.mask_embed.layers.2", f"{qd}/mask_embed/layers_2", cd, hd)
    return b.rules


def ignored_official_keys(config: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Dead keys of §9.6 plus the index buffers: {key: (shape, dtype)} for `config`."""
    cfg = _cfg(config)
    sw, bt, dc = cfg["swin"], cfg["bert"], cfg["decoder"]
    dims = _stage_dims(cfg)
    last = len(dims) - 1
    text = bt["hidden_size"]
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    f32 = "float32"
    for s, c in enumerate(dims):
        out[f"image_model.norm{s}.weight"] = ((c,), f32)
        out[f"image_model.norm{s}.bias"] = ((c,), f32)
        out[f"language_model.norms.{s}.weight"] = ((text,), f32)
        out[f"language_model.norms.{s}.bias"] = ((text,), f32)
    c = dims[last]
    out[f"image_model.layers.{last}.res_gate.0.weight"] = ((c, c), f32)
    out[f"image_model.layers.{last}.res_gate.2.weight"] = ((c, c), f32)
    b = common.RuleBuilder()
    _language_pwam(b, f"language_model.pwams.{last}", "-", text, c)
    b.linear(f"language_model.res_gates.{last}.0", "-", text, text, bias=False)
    b.linear(f"language_model.res_gates.{last}.2", "-", text, text, bias=False)
    for rule in b.rules:
        out[rule.src] = (rule.src_shape, f32)
    out["lang_proj.weight"] = ((dc["hidden_dim"], text), f32)
    out["lang_proj.bias"] = ((dc["hidden_dim"],), f32)
    w2 = sw["window_size"] ** 2
    for s, depth in enumerate(sw["depths"]):
        for j in range(depth):
            out[f"image_model.layers.{s}.blocks.{j}.attn.relative_position_index"] = ((w2, w2), "int64")
    return out


IGNORED_OFFICIAL_KEYS = frozenset(ignored_official_keys(base_model_config()))


def official_key_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every key of an official state dict for `config` (consumed and ignored) with its shape."""
    shapes = {r.src: r.src_shape for r in official_rules(config)}
    shapes.update({k: v[0] for k, v in ignored_official_keys(config).items()})
    return shapes


# ---------------------------------------------------------------------------------------------
# Detection and inference.


def is_official_checkpoint(state_dict: Mapping[str, Any]) -> bool:
    return all(k in state_dict for k in _SIGNATURE_KEYS)


def require_official_checkpoint(state_dict: Mapping[str, Any]) -> None:
    if is_official_checkpoint(state_dict):
        return
    keys = sorted(state_dict)
    like = ", ".join(keys[:5]) if keys else "(no keys)"
    missing = [k for k in _SIGNATURE_KEYS if k not in state_dict]
    raise WeightConversionError(
        f"not a MagNet checkpoint: found keys like {like} ({len(keys)} keys; "
        f"expected e.g. {missing[0]})")


def _count(sd: Mapping[str, Any], fmt: str) -> int:
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise WeightConversionError(f"cannot infer the architecture: key {key} is missing")
    return tuple(int(s) for s in np.shape(sd[key]))


def _div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b:
        raise WeightConversionError(f"cannot infer {what}: {a} is not divisible by {b}")
    return a // b


def infer_official_config(state_dict: Mapping[str, Any], *, image_size: int = 480,
                          bert_num_heads: int | None = None,
                          pyramid_pools: tuple[int, ...] | None = None,
                          base_config=None):
    """Model ConfigDict of an official-layout state dict, from tensor shapes (see module doc)."""
    sd = state_dict
    require_official_checkpoint(sd)
    cfg = base_config if base_config is not None else base_model_config()
    cfg = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg
    im, lm, pd, pr = "image_model", "language_model", "classifier.pixel_decoder", "classifier.predictor"

    # Swin
    e, cin, ph, pw = _shape(sd, f"{im}.patch_embed.proj.weight")
    if cin != 3 or ph != pw:
        raise WeightConversionError(
            f"{im}.patch_embed.proj.weight has shape {(e, cin, ph, pw)}; expected (C, 3, p, p)")
    num_stages = _count(sd, im + ".layers.{}.blocks.0.norm1.weight")
    if num_stages == 0:
        raise WeightConversionError(f"cannot infer the architecture: no {im}.layers.0.blocks.0 keys")
    depths = tuple(_count(sd, f"{im}.layers.{s}.blocks.{{}}.norm1.weight") for s in range(num_stages))
    heads, windows = [], set()
    for s in range(num_stages):
        key = f"{im}.layers.{s}.blocks.0.attn.relative_position_bias_table"
        rows, nh = _shape(sd, key)
        heads.append(nh)
        windows.add(common.window_from_bias_table(rows, key))
    if len(windows) != 1:
        raise WeightConversionError(
            f"relative_position_bias_table sizes disagree across stages: {sorted(windows)}")
    window = windows.pop()
    mlp_hidden = _shape(sd, f"{im}.layers.0.blocks.0.mlp.fc1.weight")[0]

    # BERT
    vocab, text = _shape(sd, f"{lm}.embeddings.word_embeddings.weight")
    max_pos = _shape(sd, f"{lm}.embeddings.position_embeddings.weight")[0]
    types = _shape(sd, f"{lm}.embeddings.token_type_embeddings.weight")[0]
    bert_layers = _count(sd, lm + ".encoder.layer.{}.attention.self.query.weight")
    inter = _shape(sd, f"{lm}.encoder.layer.0.intermediate.dense.weight")[0]
    if bert_num_heads:
        bert_heads = int(bert_num_heads)
    elif int(cfg.bert.hidden_size) == text:  # same width as the base config: trust its head count
        bert_heads = int(cfg.bert.num_heads)
    else:
        bert_heads = _div(text, 64, "the BERT head count (hidden/64; pass bert_num_heads)")
    _div(text, bert_heads, f"the BERT head size ({bert_heads} heads)")

    # Fusion
    num_pyramids = _count(sd, im + ".layers.0.pyramids.{}.1.weight")
    if pyramid_pools is None:
        if num_pyramids != len(OFFICIAL_POOLS):
            raise WeightConversionError(
                f"found {num_pyramids} pyramid branches per stage; pass pyramid_pools (the pool sizes "
                f"are not stored), (1, 2, 3, 6) is assumed only for 4 branches")
        pyramid_pools = OFFICIAL_POOLS
    elif len(pyramid_pools) != num_pyramids:
        raise WeightConversionError(
            f"pyramid_pools {tuple(pyramid_pools)} has {len(pyramid_pools)} sizes but the checkpoint "
            f"has {num_pyramids} pyramid branches per stage")

    # Pixel decoder
    levels = _count(sd, pd + ".input_proj.{}.0.weight")
    conv_dim = _shape(sd, f"{pd}.input_proj.0.0.weight")[0]
    enc_layers = _count(sd, pd + ".transformer.encoder.layers.{}.linear1.weight")
    enc_ffn = _shape(sd, f"{pd}.transformer.encoder.layers.0.linear1.weight")[0]
    samples = _shape(sd, f"{pd}.transformer.encoder.layers.0.self_attn.attention_weights.weight")[0]
    pd_heads = int(cfg.pixel_decoder.num_heads)
    pd_points = _div(samples, pd_heads * levels,
                     f"the pixel-decoder points ({pd_heads} heads x {levels} levels)")

    # Decoder
    queries, hidden = _shape(sd, f"{pr}.query_feat.weight")
    dec_layers = _count(sd, pr + ".transformer_ffn_layers.{}.linear1.weight")
    dec_ffn = _shape(sd, f"{pr}.transformer_ffn_layers.0.linear1.weight")[0]
    classes = _shape(sd, f"{pr}.class_embed.weight")[0] - 1
    _div(hidden, int(cfg.decoder.num_heads), f"the decoder head size ({cfg.decoder.num_heads} heads)")

    with cfg.unlocked():
        cfg.image_size = int(image_size)
        cfg.swin.patch_size = int(ph)
        cfg.swin.embed_dim = int(e)
        cfg.swin.depths = depths
        cfg.swin.num_heads = tuple(heads)
        cfg.swin.window_size = int(window)
        cfg.swin.mlp_ratio = float(mlp_hidden) / float(e)
        cfg.bert.vocab_size = int(vocab)
        cfg.bert.hidden_size = int(text)
        cfg.bert.num_layers = int(bert_layers)
        cfg.bert.num_heads = int(bert_heads)
        cfg.bert.intermediate_size = int(inter)
        cfg.bert.max_position_embeddings = int(max_pos)
        cfg.bert.type_vocab_size = int(types)
        cfg.bert.stage_ends = common.equal_split_ends(bert_layers, num_stages)
        cfg.fusion.pyramid_pools = tuple(int(p) for p in pyramid_pools)
        cfg.pixel_decoder.conv_dim = int(conv_dim)
        cfg.pixel_decoder.num_layers = int(enc_layers)
        cfg.pixel_decoder.ffn_dim = int(enc_ffn)
        cfg.pixel_decoder.num_points = int(pd_points)
        cfg.decoder.hidden_dim = int(hidden)
        cfg.decoder.num_layers = int(dec_layers)
        cfg.decoder.ffn_dim = int(dec_ffn)
        cfg.decoder.num_queries = int(queries)
        cfg.decoder.num_classes = int(classes)
    if levels != num_stages:
        raise WeightConversionError(
            f"{pd}.input_proj has {levels} levels but the Swin trunk has {num_stages} stages")
    return cfg


def forensics(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Facts about the dead keys (§9.6 "checkpoint forensics"): a parameter that got no gradient
    keeps its initial value, so identity norms / zero gates say which outputs training used."""
    sd = state_dict

    def identity_norms(prefix_re):
        import re  # pylint: disable=g-import-not-at-top
        keys = [k for k in sd if re.match(prefix_re, k)]
        if not keys:
            return None
        return all(np.all(common.to_numpy(sd[k]) == (1.0 if k.endswith("weight") else 0.0))
                   for k in keys)

    gates = sorted(k for k in sd if k.startswith("language_model.res_gates."))
    last = max((int(k.split(".")[2]) for k in gates), default=None)
    last_gates = [k for k in gates if last is not None and k.split(".")[2] == str(last)]
    out: dict[str, Any] = {
        "image_model.norm* untouched (ones/zeros)": identity_norms(r"image_model\.norm\d+\."),
        "language_model.norms.* untouched (ones/zeros)": identity_norms(r"language_model\.norms\."),
        f"language_model.res_gates.{last} all zero": (
            all(not np.any(common.to_numpy(sd[k])) for k in last_gates) if last_gates else None),
    }
    if "lang_proj.weight" in sd:
        out["lang_proj.weight std"] = float(np.std(common.to_numpy(sd["lang_proj.weight"])))
    return out


# ---------------------------------------------------------------------------------------------
# Conversion.


def convert_official(state_dict: Mapping[str, Any], *, image_size: int = 480,
                     bert_num_heads: int | None = None,
                     pyramid_pools: tuple[int, ...] | None = None,
                     base_config=None) -> ConversionResult:
    """Full conversion with bookkeeping (what `official_to_params` returns, plus key lists)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    cfg = infer_official_config(sd, image_size=image_size, bert_num_heads=bert_num_heads,
                                pyramid_pools=pyramid_pools, base_config=base_config)
    acc = common.KeyAccounting(sd, what="official MagNet checkpoint does not match the key map")
    params = common.apply_rules(official_rules(cfg), acc)
    swin_mod.check_relative_position_index(acc, _cfg(cfg)["swin"], "image_model")
    for key in ignored_official_keys(cfg):
        acc.ignore(key)
    acc.finish()
    return ConversionResult(params=params, config=cfg, consumed=acc.consumed, ignored=acc.ignored,
                            num_source_keys=len(sd))


def official_to_params(state_dict: Mapping[str, Any], *, image_size: int = 480,
                       bert_num_heads: int | None = None,
                       pyramid_pools: tuple[int, ...] | None = None,
                       base_config=None):
    """Official MagNet state dict -> (params tree rooted at image_model/language_model/...,
    model ConfigDict). Raises WeightConversionError naming every problem key."""
    result = convert_official(state_dict, image_size=image_size, bert_num_heads=bert_num_heads,
                              pyramid_pools=pyramid_pools, base_config=base_config)
    return result.params, result.config


def params_to_official(params: Mapping[str, Any], config: Any, *, include_dead: bool = True,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Inverse of `official_to_params`: Linen params -> official-layout {key: np.ndarray}.

    With `include_dead`, also writes the dead keys of §9.6 (norms ones/zeros, the rest small
    random values from `seed`) and the relative_position_index buffers, so the result has
    exactly the official key set.
    """
    if "params" in params and "image_model" not in params:
        params = params["params"]
    sd = {rule.src: common.invert_rule(rule, params) for rule in official_rules(config)}
    if include_dead:
        rng = np.random.default_rng(seed)
        window = int(_cfg(config)["swin"]["window_size"])
        index = common.relative_position_index(window)
        for key, (shape, dtype) in ignored_official_keys(config).items():
            if dtype == "int64":
                sd[key] = index.copy()
            elif key.startswith(("image_model.norm", "language_model.norms.")):
                sd[key] = (np.ones if key.endswith("weight") else np.zeros)(shape, np.float32)
            else:
                sd[key] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return sd
