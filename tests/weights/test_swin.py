"""Swin import: Microsoft layout (downsample at the end of stage s, buffers stored) and timm
layout (downsample at the start of stage s+1, no buffers) give identical params that fit the
Linen image model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from magnet_jax.weights import common, swin

TINY = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
            window_size=7, mlp_ratio=4.0)
SMALL = dict(patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
             window_size=3, mlp_ratio=4.0)


def synthetic_microsoft(cfg, seed=0):
    """A Microsoft-release-style state dict (random values) for `cfg`."""
    rng = np.random.default_rng(seed)
    b = common.RuleBuilder()
    swin.add_swin_rules(b, "", "", cfg, swin.MICROSOFT)
    sd = {r.src: rng.standard_normal(r.src_shape).astype(np.float32) for r in b.rules}
    w2 = cfg["window_size"] ** 2
    for s, depth in enumerate(cfg["depths"]):
        for j in range(depth):
            sd[f"layers.{s}.blocks.{j}.attn.relative_position_index"] = common.relative_position_index(cfg["window_size"])
            if j % 2:
                sd[f"layers.{s}.blocks.{j}.attn_mask"] = np.zeros((4, w2, w2), np.float32)
    c = cfg["embed_dim"] * 2 ** (len(cfg["depths"]) - 1)
    sd.update({"norm.weight": np.ones(c, np.float32), "norm.bias": np.zeros(c, np.float32),
               "head.weight": np.zeros((10, c), np.float32), "head.bias": np.zeros(10, np.float32)})
    return sd


def microsoft_to_timm(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        elif k.startswith("head."):
            k = "head.fc." + k[len("head."):]
        out[k] = v
    return out


def timm_to_microsoft(sd, window):
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[k] = v
        m = re.match(r"(layers\.\d+\.blocks\.\d+)\.attn\.qkv\.weight", k)
        if m:
            out[f"{m.group(1)}.attn.relative_position_index"] = common.relative_position_index(window)
    return {"model": out}


def _assert_same_tree(a, b):
    fa, fb = common.flatten_tree(a), common.flatten_tree(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_both_layouts_give_identical_params():
    ms = synthetic_microsoft(SMALL)
    p_ms, cfg_ms, acc_ms = swin.swin_to_params(ms)
    p_timm, cfg_timm, acc_timm = swin.swin_to_params(microsoft_to_timm(ms))
    assert acc_ms.layout == swin.MICROSOFT and acc_timm.layout == swin.TIMM
    assert cfg_ms == cfg_timm == SMALL
    _assert_same_tree(p_ms, p_timm)
    assert "layers_3" in p_ms and "downsample" not in p_ms["layers_3"]
    np.testing.assert_array_equal(p_ms["layers_1"]["downsample"]["reduction"]["kernel"],
                                  ms["layers.1.downsample.reduction.weight"].T)
    assert any(k.endswith("attn_mask") for k in acc_ms.ignored)
    assert "head.fc.weight" in acc_timm.ignored


def test_swin_tree_fits_the_linen_image_model(tiny_cfg, tiny_abstract):
    """The imported trunk has exactly the patch-embed / block / downsample leaves of the Linen
    image model with the same Swin config (the fusion leaves are MagNet's own)."""
    swin_cfg = {k: tiny_cfg.swin[k] for k in SMALL}
    params, cfg, _ = swin.swin_to_params(synthetic_microsoft(swin_cfg))
    assert cfg == {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in swin_cfg.items()}
    image = tiny_abstract["image_model"]
    trunk = {"patch_embed": image["patch_embed"]}
    for s in range(4):
        layer = image[f"layers_{s}"]
        trunk[f"layers_{s}"] = {k: v for k, v in layer.items() if k.startswith("blocks_") or k == "downsample"}
    common.check_against_abstract(params, trunk)


def test_errors_name_keys():
    ms = synthetic_microsoft(SMALL)
    key = "layers.2.blocks.1.attn.relative_position_index"
    ms[key] = ms[key][::-1].copy()
    del ms["layers.0.blocks.1.mlp.fc2.bias"]
    ms["layers.0.blocks.0.attn.rope.weight"] = np.zeros(3, np.float32)
    with pytest.raises(common.WeightConversionError) as e:
        swin.swin_to_params(ms)
    msg = str(e.value)
    assert key + " differs" in msg
    assert "missing keys: layers.0.blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys: layers.0.blocks.0.attn.rope.weight" in msg


def test_not_a_swin_checkpoint():
    with pytest.raises(common.WeightConversionError, match="not a Swin checkpoint.*found keys like embeddings"):
        swin.swin_to_params({"embeddings.word_embeddings.weight": np.zeros((3, 4))})


def test_convert_cli_swin(tmp_path):
    from safetensors.numpy import save_file
    from magnet_jax import checkpoint_io, convert
    src = tmp_path / "swin_timm.safetensors"
    save_file(microsoft_to_timm(synthetic_microsoft(SMALL)), str(src))
    out = tmp_path / "swin_out"
    assert convert.main(["swin", str(src), str(out)]) == 0
    cfg, params = checkpoint_io.load_params(str(out), expect_model="swin")
    assert tuple(cfg.swin.depths) == SMALL["depths"]
    ref, _, _ = swin.swin_to_params(synthetic_microsoft(SMALL))
    _assert_same_tree(params["image_model"], ref)


# --- real timm module (skipped when timm is not importable next to the pinned torch)


@pytest.fixture(scope="module")
def timm_swin():
    torch = pytest.importorskip("torch")
    try:
        from timm.models.swin_transformer import SwinTransformer
    except Exception as e:  # pylint: disable=broad-except
        pytest.skip(f"timm not importable: {e}")
    torch.manual_seed(0)
    model = SwinTransformer(img_size=224, patch_size=4, window_size=7, embed_dim=96,
                            depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), num_classes=10)
    return model.eval()


@pytest.mark.parity
def test_timm_swin_both_layouts(tmp_path, timm_swin):
    torch = pytest.importorskip("torch")
    path = tmp_path / "timm_swin_t.pth"
    torch.save(timm_swin.state_dict(), path)
    params, cfg, acc = swin.import_swin(str(path), return_report=True)
    assert acc.layout == swin.TIMM
    assert cfg == TINY
    sd = {k: v.detach().numpy() for k, v in timm_swin.state_dict().items()}
    np.testing.assert_array_equal(params["layers_2"]["blocks_5"]["attn"]["qkv"]["kernel"],
                                  sd["layers.2.blocks.5.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["layers_0"]["downsample"]["reduction"]["kernel"],
                                  sd["layers.1.downsample.reduction.weight"].T)
    # the same weights in the Microsoft layout give the same params
    ms_path = tmp_path / "ms_swin_t.pth"
    ms = timm_to_microsoft(sd, 7)["model"]
    torch.save({"model": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ms.items()}}, ms_path)
    params_ms, cfg_ms, acc_ms = swin.import_swin(str(ms_path), return_report=True)
    assert acc_ms.layout == swin.MICROSOFT and cfg_ms == cfg
    _assert_same_tree(params, params_ms)


@pytest.mark.parity
def test_timm_patch_merging_order_matches_spec(timm_swin):
    """timm's PatchMerging == the Microsoft concat order (0,0),(1,0),(0,1),(1,1) of §2.4 with the
    converted kernel, so the layout move is all a timm checkpoint needs."""
    torch = pytest.importorskip("torch")
    merge = timm_swin.layers[1].downsample
    params, _, _ = swin.swin_to_params({k: v.detach().numpy() for k, v in timm_swin.state_dict().items()})
    p = params["layers_0"]["downsample"]
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 96)).astype(np.float32)
    ref = merge(torch.from_numpy(x)).detach().numpy()
    cat = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    mu = cat.mean(-1, keepdims=True)
    var = ((cat - mu) ** 2).mean(-1, keepdims=True)
    y = (cat - mu) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
    np.testing.assert_allclose(y @ p["reduction"]["kernel"], ref, rtol=1e-4, atol=1e-4)
