"""Import CLIP checkpoints into the params of models/clip.py: {'vision': ..., 'text': ...}.

Two source layouts:
  - a local Hugging Face CLIPModel directory: `config.json` + `model.safetensors` (or its
    sharded index, or `pytorch_model.bin`); keys `vision_model.*`, `text_model.*`,
    `visual_projection.weight`, `text_projection.weight`. The config comes from config.json.
  - OpenAI's original state dict (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.
    in_proj_weight` (fused q, k, v), ..., `ln_final`, `text_projection`), as a torch.save'd
    .pt/.pth or a safetensors file. The config is read off the shapes; the file does not store
    the head count, activation or LayerNorm epsilon, so those come from the target config
    unchecked (OpenAI's models: heads = width / 64, QuickGELU, 1e-5; open_clip's LAION models
    in this layout use plain GELU). OpenAI's TorchScript archives (clip.load's downloads) are
    refused with the one-line recipe to turn them into a state dict.

The checkpoint is fitted to the target config (`vision_cfg`, `text_cfg`: CLIPVision / CLIPText
kwargs): a different image_size interpolates the patch position embeddings bicubically (class
row kept), a shorter context_length keeps the first rows; any other architectural difference
is a one-line ValueError naming both values. Every source key is accounted for (common.
KeyAccounting) and the result is checked against the model's abstract params.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from magnet_jax.weights import common
from magnet_jax.weights.bert import find_weights_file, read_hf_config
from magnet_jax.weights.common import Rule, WeightConversionError

# Keys with no place in the towers: the contrastive temperature, HF's position-id buffers and
# the ints that OpenAI's TorchScript models keep next to the weights.
IGNORED_KEYS = ("logit_scale", "vision_model.embeddings.position_ids",
                "text_model.embeddings.position_ids", "input_resolution", "context_length",
                "vocab_size")
# Prefixes of each tower's keys, per layout (for importing one tower only).
TOWER_PREFIXES = {
    "hf": {"vision": ("vision_model.", "visual_projection."),
           "text": ("text_model.", "text_projection.")},
    "openai": {"vision": ("visual.",), "text": None},   # text: every other key
}
# Hugging Face's CLIPVisionConfig / CLIPTextConfig defaults (older config.json files omit them).
HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, image_size=224, patch_size=32,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5)
HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
# HF's legacy end-of-text id: configs saved before transformers PR #24773 say 2 and pool at
# argmax(ids), which our eos_token_id=None does.
HF_LEGACY_EOS = 2
# Fields an OpenAI-layout file does not store (not compared against the target config).
OPENAI_UNSTORED = ("heads", "act", "layer_norm_eps")
# models.clip's defaults, for target configs that leave these fields out.
MODEL_DEFAULTS = dict(mlp_ratio=4.0, act="quick_gelu", layer_norm_eps=1e-5)


def mlp_width(cfg: Mapping[str, Any]) -> int:
    """The MLP's hidden width of a tower config (models.clip: round(width · mlp_ratio))."""
    return int(round(cfg["width"] * cfg.get("mlp_ratio", MODEL_DEFAULTS["mlp_ratio"])))


# ---------------------------------------------------------------------------------------------
# Configs.


def config_from_hf(hf: str | os.PathLike | Mapping[str, Any],
                   source: str = "config.json") -> dict[str, dict[str, Any]]:
    """HF CLIPConfig (a directory holding config.json, or the parsed dict) ->
    {'vision': CLIPVision kwargs, 'text': CLIPText kwargs}."""
    if not isinstance(hf, Mapping):
        source = os.path.join(os.fspath(hf), "config.json")
        hf = read_hf_config(os.fspath(hf))
    if hf.get("model_type", "clip") != "clip":
        raise WeightConversionError(
            f"{source}: model_type is {hf.get('model_type')!r}, expected 'clip' (a CLIPModel)")
    v = {**HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    t = {**HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    output_dim = int(hf.get("projection_dim", 512))
    image_size = v["image_size"]
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise WeightConversionError(
                f"{source}: non-square image_size {image_size} is not supported")
        image_size = image_size[0]
    eos = t["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        raise WeightConversionError(f"{source}: a list of eos_token_id {eos} is not supported")
    vision = dict(width=int(v["hidden_size"]), layers=int(v["num_hidden_layers"]),
                  heads=int(v["num_attention_heads"]), patch_size=int(v["patch_size"]),
                  image_size=int(image_size), output_dim=output_dim,
                  mlp_ratio=int(v["intermediate_size"]) / int(v["hidden_size"]),
                  act=str(v["hidden_act"]), layer_norm_eps=float(v["layer_norm_eps"]))
    text = dict(width=int(t["hidden_size"]), layers=int(t["num_hidden_layers"]),
                heads=int(t["num_attention_heads"]), vocab_size=int(t["vocab_size"]),
                context_length=int(t["max_position_embeddings"]), output_dim=output_dim,
                mlp_ratio=int(t["intermediate_size"]) / int(t["hidden_size"]),
                act=str(t["hidden_act"]), layer_norm_eps=float(t["layer_norm_eps"]),
                eos_token_id=None if eos is None or int(eos) == HF_LEGACY_EOS else int(eos))
    for tower in (vision, text):
        if tower["act"] not in ("quick_gelu", "gelu"):
            raise WeightConversionError(
                f"{source}: hidden_act {tower['act']!r} is not supported (quick_gelu, gelu)")
    return dict(vision=vision, text=text)


def _resblock_count(sd: Mapping[str, Any], prefix: str) -> int:
    depth = prefix.count(".")
    return len({k.split(".")[depth] for k in sd if k.startswith(prefix)})


def config_from_openai(sd: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """OpenAI-layout state dict -> {'vision': kwargs or None, 'text': kwargs or None}, read off
    the shapes as OpenAI's build_model does (heads = width / 64, QuickGELU: not stored)."""
    def shape(key):
        return tuple(np.shape(sd[key]))

    vision = text = None
    if "visual.conv1.weight" in sd:
        width, channels, p, p2 = shape("visual.conv1.weight")
        rows = shape("visual.positional_embedding")[0] if "visual.positional_embedding" in sd else 1
        grid = math.isqrt(rows - 1)
        if channels != 3 or p != p2 or grid * grid != rows - 1:
            raise WeightConversionError(
                f"{source}: visual.conv1.weight {shape('visual.conv1.weight')} / "
                f"{rows} position rows are not a square-patch RGB ViT")
        layers = _resblock_count(sd, "visual.transformer.resblocks.")
        fc = "visual.transformer.resblocks.0.mlp.c_fc.weight"
        vision = dict(width=width, layers=layers, heads=max(width // 64, 1), patch_size=p,
                      image_size=p * grid,
                      output_dim=shape("visual.proj")[1] if "visual.proj" in sd else width,
                      mlp_ratio=(shape(fc)[0] / width) if fc in sd else 4.0,
                      act="quick_gelu", layer_norm_eps=1e-5)
    elif any(k.startswith("visual.layer1.") for k in sd):
        vision = "resnet"
    if "ln_final.weight" in sd:
        width = shape("ln_final.weight")[0]
        fc = "transformer.resblocks.0.mlp.c_fc.weight"
        text = dict(width=width, layers=_resblock_count(sd, "transformer.resblocks."),
                    heads=max(width // 64, 1),
                    vocab_size=shape("token_embedding.weight")[0]
                    if "token_embedding.weight" in sd else 0,
                    context_length=shape("positional_embedding")[0]
                    if "positional_embedding" in sd else 0,
                    output_dim=shape("text_projection")[1] if "text_projection" in sd else width,
                    mlp_ratio=(shape(fc)[0] / width) if fc in sd else 4.0,
                    act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=None)
    return dict(vision=vision, text=text)


def check_compatible(ckpt: Mapping[str, Any], vision_cfg: Mapping[str, Any] | None,
                     text_cfg: Mapping[str, Any] | None, layout: str = "hf",
                     config_name: str = "model.clip", source: str = "CLIP checkpoint") -> None:
    """One-line ValueError listing every architectural field where checkpoint and target
    differ (image_size and a shorter context_length are fitted, not errors)."""
    problems = []
    for tower, target, fields in (
            ("vision", vision_cfg, ("width", "patch_size", "layers", "output_dim", "heads",
                                    "act", "layer_norm_eps")),
            ("text", text_cfg, ("width", "vocab_size", "layers", "output_dim", "heads", "act",
                                "layer_norm_eps"))):
        if target is None:
            continue
        have = ckpt.get(tower)
        if have == "resnet":
            raise WeightConversionError(f"{source} holds a ResNet CLIP image encoder; only ViT "
                                        "towers are supported")
        if have is None:
            raise WeightConversionError(f"{source} has no {tower} tower")
        for field in fields:
            want = target.get(field, MODEL_DEFAULTS.get(field))
            if (layout == "openai" and field in OPENAI_UNSTORED) or want is None:
                continue
            if have[field] != want:
                problems.append(f"{source} {tower} {field} {have[field]} does not match "
                                f"{config_name}.{tower}.{field} {want}")
        if have["width"] == target["width"] and mlp_width(have) != mlp_width(target):
            problems.append(f"{source} {tower} MLP width {mlp_width(have)} does not match "
                            f"{config_name}.{tower} width × mlp_ratio = {mlp_width(target)}")
        if tower == "vision" and target["image_size"] % target["patch_size"]:
            problems.append(f"{config_name}.vision.image_size {target['image_size']} is not a "
                            f"multiple of the patch size {target['patch_size']}")
        if tower == "text" and target["context_length"] > have["context_length"]:
            problems.append(f"{source} text context_length {have['context_length']} is shorter "
                            f"than {config_name}.text.context_length {target['context_length']}")
    if problems:
        raise WeightConversionError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Key maps (source key -> Linen leaf under 'vision/' or 'text/').


def _add_layer(b: common.RuleBuilder, layout: str, src: str, dst: str, width: int, mlp: int):
    if layout == "hf":
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            b.linear(f"{src}.self_attn.{n}", f"{dst}/self_attn/{n}", width, width)
        names = dict(ln1="layer_norm1", ln2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2")
    else:
        qkv = tuple(f"{dst}/self_attn/{n}" for n in ("q_proj", "k_proj", "v_proj"))
        b.rules.append(Rule(f"{src}.attn.in_proj_weight", tuple(f"{p}/kernel" for p in qkv),
                            "split3_kernel", (3 * width, width)))
        b.rules.append(Rule(f"{src}.attn.in_proj_bias", tuple(f"{p}/bias" for p in qkv),
                            "split3_bias", (3 * width,)))
        b.linear(f"{src}.attn.out_proj", f"{dst}/self_attn/out_proj", width, width)
        names = dict(ln1="ln_1", ln2="ln_2", fc1="mlp.c_fc", fc2="mlp.c_proj")
    b.norm(f"{src}.{names['ln1']}", f"{dst}/layer_norm1", width)
    b.linear(f"{src}.{names['fc1']}", f"{dst}/mlp/fc1", mlp, width)
    b.linear(f"{src}.{names['fc2']}", f"{dst}/mlp/fc2", width, mlp)
    b.norm(f"{src}.{names['ln2']}", f"{dst}/layer_norm2", width)


def vision_rules(v: Mapping[str, Any], layout: str) -> list[Rule]:
    """The vision tower's key map for checkpoint config `v` (its own image_size)."""
    b, w, p = common.RuleBuilder(), v["width"], v["patch_size"]
    rows = (v["image_size"] // p) ** 2 + 1
    hf = layout == "hf"
    s = "vision_model." if hf else "visual."
    b.param(f"{s}embeddings.class_embedding" if hf else f"{s}class_embedding",
            "vision/class_embedding", (w,))
    b.param(f"{s}embeddings.patch_embedding.weight" if hf else f"{s}conv1.weight",
            "vision/patch_embedding/kernel", (w, 3, p, p), "hwio")
    b.param(f"{s}embeddings.position_embedding.weight" if hf else f"{s}positional_embedding",
            "vision/position_embedding/embedding", (rows, w))
    b.norm(f"{s}pre_layrnorm" if hf else f"{s}ln_pre", "vision/pre_layrnorm", w)
    for n in range(v["layers"]):
        _add_layer(b, layout, f"{s}encoder.layers.{n}" if hf else f"{s}transformer.resblocks.{n}",
                   f"vision/encoder/layers_{n}", w, mlp_width(v))
    b.norm(f"{s}post_layernorm" if hf else f"{s}ln_post", "vision/post_layernorm", w)
    if hf:
        b.linear("visual_projection", "vision/projection", v["output_dim"], w, bias=False)
    else:  # OpenAI stores (width, out), applied as x @ proj: already a Dense kernel.
        b.param("visual.proj", "vision/projection/kernel", (w, v["output_dim"]))
    return b.rules


def text_rules(t: Mapping[str, Any], layout: str) -> list[Rule]:
    """The text tower's key map for checkpoint config `t` (its own context_length)."""
    b, w = common.RuleBuilder(), t["width"]
    hf = layout == "hf"
    s = "text_model." if hf else ""
    b.param(f"{s}embeddings.token_embedding.weight" if hf else "token_embedding.weight",
            "text/token_embedding/embedding", (t["vocab_size"], w))
    b.param(f"{s}embeddings.position_embedding.weight" if hf else "positional_embedding",
            "text/position_embedding/embedding", (t["context_length"], w))
    for n in range(t["layers"]):
        _add_layer(b, layout, f"{s}encoder.layers.{n}" if hf else f"transformer.resblocks.{n}",
                   f"text/encoder/layers_{n}", w, mlp_width(t))
    b.norm(f"{s}final_layer_norm" if hf else "ln_final", "text/final_layer_norm", w)
    if hf:
        b.linear("text_projection", "text/projection", t["output_dim"], w, bias=False)
    else:
        b.param("text_projection", "text/projection/kernel", (w, t["output_dim"]))
    return b.rules


# ---------------------------------------------------------------------------------------------
# Resizing.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out_size, in_size) float64 matrix of torch's bicubic resampling along one axis:
    F.interpolate(mode="bicubic", align_corners=False, antialias=False), i.e. Keys' cubic
    convolution with a = -0.75, half-pixel centres (src = (dst + 0.5)·in/out − 0.5), the four
    taps clamped to the border (border rows weigh more, nothing falls off)."""
    src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    t = src - base
    weights = np.zeros((out_size, in_size))
    for offset in (-1, 0, 1, 2):
        idx = np.clip(base + offset, 0, in_size - 1).astype(np.int64)
        np.add.at(weights, (np.arange(out_size), idx), _cubic(t - offset, a))
    return weights


def bicubic_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C), torch's bicubic (see bicubic_weights), float64 sums."""
    wh = bicubic_weights(x.shape[0], height)
    ww = bicubic_weights(x.shape[1], width)
    return np.einsum("oh,pw,hwc->opc", wh, ww, np.asarray(x, np.float64))


def resize_position_embedding(table: np.ndarray, grid: int) -> np.ndarray:
    """ViT position table (1 + g², C) -> (1 + grid², C): class row kept, the g×g patch rows
    resized bicubically as torch's F.interpolate(mode="bicubic", align_corners=False), which
    CRIS and most CLIP-based RIS code use to run CLIP at their input size."""
    rows, channels = table.shape
    g = math.isqrt(rows - 1)
    if g * g != rows - 1:
        raise WeightConversionError(f"position table of {rows} rows is not 1 + a square grid")
    if g == grid:
        return np.asarray(table, np.float32)
    patches = bicubic_resize(np.asarray(table[1:]).reshape(g, g, channels), grid, grid)
    return np.concatenate([table[:1], patches.reshape(grid * grid, channels)]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Reading.


def _hf_weights(hf_dir: str, trusted: bool) -> tuple[dict[str, np.ndarray], str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):   # sharded: read every shard the index names
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(common.load_safetensors(os.path.join(hf_dir, shard)))
        return sd, index
    path = find_weights_file(hf_dir)
    return common.load_state_dict(path, trusted=trusted), path


def _refuse_torchscript(path: str) -> None:
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as z:
        if any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist()):
            raise common.WeightFileError(
                f"{path} is a TorchScript archive (OpenAI's clip.load download); save its state "
                "dict first: torch.save(torch.jit.load(path, map_location='cpu').state_dict(), "
                "'clip_state_dict.pt')")


def read_clip_checkpoint(path: str | os.PathLike, trusted: bool = False):
    """A HF directory or an OpenAI-layout file -> (state dict, checkpoint config, layout,
    the file read). The config is {'vision': kwargs or None, 'text': kwargs or None}."""
    path = os.fspath(path)
    if os.path.isdir(path):
        ckpt = config_from_hf(path)
        sd, source = _hf_weights(path, trusted)
        return sd, ckpt, "hf", source
    if not os.path.exists(path):
        raise common.WeightFileNotFoundError(
            f"no such CLIP checkpoint: {path} (expected a Hugging Face CLIP directory or an "
            "OpenAI-layout .pt/.pth/.safetensors file)")
    _refuse_torchscript(path)
    sd = common.load_state_dict(path, trusted=trusted)
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        raise WeightConversionError(
            f"{path} holds Hugging Face CLIP keys; pass its directory (config.json is needed)")
    return sd, config_from_openai(sd, path), "openai", path


# ---------------------------------------------------------------------------------------------
# Conversion.


def _in_tower(key: str, layout: str, tower: str) -> bool:
    prefixes = TOWER_PREFIXES[layout][tower]
    if prefixes is None:   # OpenAI's text keys: everything outside visual.*
        return not key.startswith(TOWER_PREFIXES[layout]["vision"])
    return key.startswith(prefixes)


def abstract_params(vision_cfg: Mapping[str, Any] | None,
                    text_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """{'vision': ..., 'text': ...} ShapeDtypeStructs of the towers' params (no compute)."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from magnet_jax.models.clip import CLIPText, CLIPVision  # pylint: disable=g-import-not-at-top
    out = {}
    key = jax.random.key(0)
    if vision_cfg is not None:
        s = vision_cfg["image_size"]
        out["vision"] = jax.eval_shape(CLIPVision(**vision_cfg).init, key,
                                       jnp.zeros((1, s, s, 3), jnp.float32))["params"]
    if text_cfg is not None:
        ids = jnp.zeros((1, text_cfg["context_length"]), jnp.int32)
        out["text"] = jax.eval_shape(CLIPText(**text_cfg).init, key, ids)["params"]
    return out


def clip_to_params(sd: Mapping[str, Any], ckpt: Mapping[str, Any], layout: str,
                   vision_cfg: Mapping[str, Any] | None, text_cfg: Mapping[str, Any] | None, *,
                   source: str = "CLIP checkpoint", config_name: str = "model.clip",
                   check: bool = True) -> dict[str, Any]:
    """State dict (layout 'hf' or 'openai', config `ckpt`) -> params fitted to the targets.

    A tower whose target config is None is skipped (its keys ignored). `check` compares the
    result with the models' abstract params (jax.eval_shape, no compute)."""
    check_compatible(ckpt, vision_cfg, text_cfg, layout, config_name)
    rules = []
    if vision_cfg is not None:
        rules += vision_rules(ckpt["vision"], layout)
    if text_cfg is not None:
        rules += text_rules(ckpt["text"], layout)
    acc = common.KeyAccounting(sd, what=f"{source} does not match the CLIP key map")
    params = common.apply_rules(rules, acc)
    for k in list(sd):
        if (k in IGNORED_KEYS or vision_cfg is None and _in_tower(k, layout, "vision")
                or text_cfg is None and _in_tower(k, layout, "text")):
            acc.ignore(k)
    acc.finish()
    if vision_cfg is not None:
        table = params["vision"]["position_embedding"]
        grid = vision_cfg["image_size"] // vision_cfg["patch_size"]
        table["embedding"] = resize_position_embedding(table["embedding"], grid)
    if text_cfg is not None:
        table = params["text"]["position_embedding"]
        table["embedding"] = np.ascontiguousarray(table["embedding"][:text_cfg["context_length"]])
    if check:
        common.check_against_abstract(params, abstract_params(vision_cfg, text_cfg),
                                      what=f"params imported from {source}")
    return params


def import_clip(path: str | os.PathLike, *, vision_cfg: Mapping[str, Any] | None,
                text_cfg: Mapping[str, Any] | None, trusted: bool = False,
                config_name: str = "model.clip") -> dict[str, Any]:
    """A HF CLIP directory or an OpenAI-layout file -> {'vision': params, 'text': params}
    (NumPy float32 leaves) for CLIPVision(**vision_cfg) and CLIPText(**text_cfg).

    `trusted` lets a .pt/.bin file pickle objects other than tensors (arbitrary code: only
    for files from a trusted source). `config_name` prefixes the fields named in errors."""
    sd, ckpt, layout, source = read_clip_checkpoint(path, trusted)
    return clip_to_params(sd, ckpt, layout, vision_cfg, text_cfg, source=source,
                          config_name=config_name)


__all__ = ["bicubic_resize", "bicubic_weights", "check_compatible", "clip_to_params",
           "config_from_hf", "config_from_openai", "import_clip", "read_clip_checkpoint",
           "resize_position_embedding", "text_rules", "vision_rules"]
