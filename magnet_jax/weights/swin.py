"""Import ImageNet Swin checkpoints into params/image_model/{patch_embed, layers_s/...}.

Two layouts of the same weights (`jax_stack.md` §10):
- Microsoft release (`{'model': sd}`): PatchMerging of stage s stored at the END of stage s as
  `layers.{s}.downsample.*` (s < last); `relative_position_index` and `attn_mask` buffers stored.
- timm: flat dict, PatchMerging stored at the START of the next stage as
  `layers.{s+1}.downsample.*`; no buffers; classifier `head.fc.*`.
Both map to magnet_jax's `layers_{s}/downsample` (end of stage s). The classifier (`norm.*`,
`head.*`) and the `attn_mask` buffers are ignored; `relative_position_index` buffers are
recomputed and compared.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from magnet_jax.weights import common
from magnet_jax.weights.common import WeightConversionError

MICROSOFT = "microsoft"
TIMM = "timm"


def add_swin_rules(b: common.RuleBuilder, src: str, dst: str, swin: Mapping[str, Any],
                   layout: str = MICROSOFT) -> None:
    """Rules for the Swin trunk (patch embed, blocks, patch merging) without the classifier.

    `src`/`dst` are prefixes without separator ('' for a bare Swin checkpoint). `layout` picks
    where the source stores PatchMerging (MICROSOFT: end of stage s; TIMM: start of stage s+1).
    """
    s_ = f"{src}." if src else ""
    d_ = f"{dst}/" if dst else ""
    e, p = swin["embed_dim"], swin["patch_size"]
    depths, heads = swin["depths"], swin["num_heads"]
    b.param(f"{s_}patch_embed.proj.weight", f"{d_}patch_embed/proj/kernel", (e, 3, p, p), "hwio")
    b.param(f"{s_}patch_embed.proj.bias", f"{d_}patch_embed/proj/bias", (e,))
    b.norm(f"{s_}patch_embed.norm", f"{d_}patch_embed/norm", e)
    rows = (2 * swin["window_size"] - 1) ** 2
    for s, depth in enumerate(depths):
        c = e * 2**s
        hidden = int(c * swin["mlp_ratio"])
        for j in range(depth):
            bs, bd = f"{s_}layers.{s}.blocks.{j}", f"{d_}layers_{s}/blocks_{j}"
            b.norm(f"{bs}.norm1", f"{bd}/norm1", c)
            b.param(f"{bs}.attn.relative_position_bias_table", f"{bd}/attn/relative_position_bias_table",
                    (rows, heads[s]))
            b.linear(f"{bs}.attn.qkv", f"{bd}/attn/qkv", 3 * c, c)
            b.linear(f"{bs}.attn.proj", f"{bd}/attn/proj", c, c)
            b.norm(f"{bs}.norm2", f"{bd}/norm2", c)
            b.linear(f"{bs}.mlp.fc1", f"{bd}/mlp/fc1", hidden, c)
            b.linear(f"{bs}.mlp.fc2", f"{bd}/mlp/fc2", c, hidden)
        if s < len(depths) - 1:
            at = s if layout == MICROSOFT else s + 1
            ds = f"{s_}layers.{at}.downsample"
            b.norm(f"{ds}.norm", f"{d_}layers_{s}/downsample/norm", 4 * c)
            b.linear(f"{ds}.reduction", f"{d_}layers_{s}/downsample/reduction", 2 * c, 4 * c, bias=False)


def swin_buffer_keys(swin: Mapping[str, Any], src: str = "") -> list[str]:
    s_ = f"{src}." if src else ""
    return [f"{s_}layers.{s}.blocks.{j}.attn.relative_position_index"
            for s, depth in enumerate(swin["depths"]) for j in range(depth)]


def check_relative_position_index(acc: common.KeyAccounting, swin: Mapping[str, Any],
                                  src: str = "") -> None:
    """Mark the index buffers ignored, recording an error for any that differs from the formula."""
    expected = common.relative_position_index(int(swin["window_size"]))
    for key in swin_buffer_keys(swin, src):
        value = acc.ignore(key)
        if value is not None and (value.shape != expected.shape or not np.array_equal(value, expected)):
            acc.error(f"{key} differs from the recomputed relative position index "
                      f"(window {swin['window_size']}, magnet_architecture.md §2.3)")


def normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _count(sd, fmt):
    n = 0
    while fmt.format(n) in sd:
        n += 1
    return n


def detect_layout(sd: Mapping[str, Any]) -> str:
    if "layers.0.downsample.reduction.weight" in sd:
        return MICROSOFT
    if "layers.1.downsample.reduction.weight" in sd:
        return TIMM
    like = ", ".join(sorted(sd)[:5]) or "(no keys)"
    raise WeightConversionError(
        f"not a Swin checkpoint (no layers.0/1.downsample.reduction.weight): found keys like {like}")


def infer_swin_config(sd: Mapping[str, Any]) -> dict[str, Any]:
    if "patch_embed.proj.weight" not in sd:
        like = ", ".join(sorted(sd)[:5]) or "(no keys)"
        raise WeightConversionError(
            f"not a Swin checkpoint (no patch_embed.proj.weight): found keys like {like}")
    e, cin, ph, pw = (int(x) for x in np.shape(sd["patch_embed.proj.weight"]))
    if cin != 3 or ph != pw:
        raise WeightConversionError(
            f"patch_embed.proj.weight has shape {(e, cin, ph, pw)}; expected (C, 3, p, p)")
    stages = _count(sd, "layers.{}.blocks.0.norm1.weight")
    if stages == 0:
        raise WeightConversionError("not a Swin checkpoint: no layers.0.blocks.0.* keys")
    depths = tuple(_count(sd, f"layers.{s}.blocks.{{}}.norm1.weight") for s in range(stages))
    heads, windows = [], set()
    for s in range(stages):
        key = f"layers.{s}.blocks.0.attn.relative_position_bias_table"
        if key not in sd:
            raise WeightConversionError(f"cannot infer the Swin config: key {key} is missing")
        rows, nh = (int(x) for x in np.shape(sd[key]))
        heads.append(nh)
        windows.add(common.window_from_bias_table(rows, key))
    if len(windows) != 1:
        raise WeightConversionError(
            f"relative_position_bias_table sizes disagree across stages: {sorted(windows)}")
    hidden = int(np.shape(sd["layers.0.blocks.0.mlp.fc1.weight"])[0])
    return dict(patch_size=ph, embed_dim=e, depths=depths, num_heads=tuple(heads),
                window_size=windows.pop(), mlp_ratio=hidden / e)


def swin_to_params(state_dict: Mapping[str, Any], what: str = "Swin checkpoint"):
    """Swin state dict (either layout) -> (subtree for params/image_model, swin config, report).

    The report is the KeyAccounting (consumed/ignored key lists) with `.layout` set.
    """
    sd = normalise_keys(state_dict)
    swin = infer_swin_config(sd)
    layout = detect_layout(sd)
    b = common.RuleBuilder()
    add_swin_rules(b, "", "", swin, layout)
    acc = common.KeyAccounting(sd, what=f"{what} ({layout} layout) does not match the Swin key map")
    params = common.apply_rules(b.rules, acc)
    check_relative_position_index(acc, swin)
    for k in list(sd):
        if k.startswith(("norm.", "head.")) or k.endswith(".attn_mask"):
            acc.ignore(k)
    acc.finish()
    acc.layout = layout
    return params, swin, acc


def import_swin(path: str, *, trusted: bool = False, return_report: bool = False):
    """Swin checkpoint file (.pth / .bin / .safetensors) -> (params subtree, swin config)."""
    path = os.fspath(path)
    sd = common.load_state_dict(path, trusted=trusted)
    params, swin, acc = swin_to_params(sd, what=path)
    if return_report:
        return params, swin, acc
    return params, swin
