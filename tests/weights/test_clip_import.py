"""CLIP import (magnet_jax/weights/clip.py): OpenAI's original layout (fused q, k, v; x @ proj)
as .pt and safetensors against the Hugging Face import of the same random model; position
table resizing against torch's bicubic F.interpolate; context truncation; one-line errors."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from magnet_jax.weights import clip as clip_weights
from magnet_jax.weights.common import WeightConversionError, WeightFileError, flatten_tree

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.models import test_clip as parity  # noqa: E402  (its helpers; not re-collected)

GRID = parity.IMAGE // 8   # the HF model's patch grid (image 32, patch 8)


def openai_state_dict(hf_sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The HF CLIPModel state dict in OpenAI's original naming: in_proj = [q; k; v], ln_1/ln_2,
    c_fc/c_proj, projections stored (width, out)."""
    out = {}
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
    for src, dst in (("vision_model.encoder.layers.", "visual.transformer.resblocks."),
                     ("text_model.encoder.layers.", "transformer.resblocks.")):
        layers = {int(k[len(src):].split(".")[0]) for k in hf_sd if k.startswith(src)}
        for n in layers:
            s, d = f"{src}{n}.", f"{dst}{n}."
            for kind in ("weight", "bias"):
                out[f"{d}attn.in_proj_{kind}"] = np.concatenate(
                    [hf_sd[f"{s}self_attn.{q}_proj.{kind}"] for q in ("q", "k", "v")])
                for hf_name, oa_name in layer_names.items():
                    out[f"{d}{oa_name}.{kind}"] = hf_sd[f"{s}{hf_name}.{kind}"]
    renames = {
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for hf_name, oa_name in renames.items():
        out[oa_name] = hf_sd[hf_name]
    out["visual.proj"] = np.ascontiguousarray(hf_sd["visual_projection.weight"].T)
    out["text_projection"] = np.ascontiguousarray(hf_sd["text_projection.weight"].T)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = parity.random_hf_clip(8)
    path = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


@pytest.fixture(scope="module")
def hf_sd(hf_dir):
    return {k: v.detach().numpy().copy() for k, v in hf_dir[0].state_dict().items()}


@pytest.fixture(scope="module")
def cfg(hf_dir):
    return clip_weights.config_from_hf(hf_dir[1])


@pytest.fixture(scope="module")
def hf_params(hf_dir, cfg):
    return clip_weights.import_clip(hf_dir[1], vision_cfg=cfg["vision"], text_cfg=cfg["text"])


def assert_same_tree(got, ref):
    flat, flat_ref = flatten_tree(got), flatten_tree(ref)
    assert set(flat) == set(flat_ref)
    for k in flat_ref:
        np.testing.assert_array_equal(flat[k], flat_ref[k], err_msg=k)


def test_openai_layout_imports_like_hugging_face(tmp_path, hf_dir, hf_sd, cfg, hf_params):
    from safetensors.numpy import save_file
    oa = openai_state_dict(hf_sd)
    pt_path, st_path = tmp_path / "clip.pt", tmp_path / "clip.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in oa.items()}, pt_path)
    save_file(oa, str(st_path))
    inferred = clip_weights.config_from_openai(oa)
    for tower in ("vision", "text"):   # everything the shapes tell
        for field in ("width", "layers", "output_dim", "mlp_ratio"):
            assert inferred[tower][field] == cfg[tower][field], (tower, field)
    assert (inferred["vision"]["patch_size"], inferred["vision"]["image_size"]) == (8, 32)
    assert (inferred["text"]["vocab_size"], inferred["text"]["context_length"]) == (100, 16)
    for path in (pt_path, st_path):
        params = clip_weights.import_clip(path, vision_cfg=cfg["vision"], text_cfg=cfg["text"])
        assert_same_tree(params, hf_params)
    # ... hence the same outputs; checked once end to end against transformers
    pixels, (ids, att) = parity.pixel_batch(3), parity.token_batch(3)
    got_v = parity.run_vision(cfg["vision"], params["vision"], pixels)
    got_t = parity.run_text(cfg["text"], params["text"], ids, att)
    parity.check("[clip openai layout] image embeds", got_v["embeds"],
                 parity.torch_vision(hf_dir[0], pixels)["embeds"])
    parity.check("[clip openai layout] text embeds", got_t["embeds"],
                 parity.torch_text(hf_dir[0], ids, att)["embeds"])


@pytest.mark.parametrize("grid_in,grid_out", [(4, 7), (5, 3), (7, 26), (4, 4)])
def test_bicubic_resize_matches_torch_interpolate(grid_in, grid_out):
    table = np.random.default_rng(grid_in * grid_out).standard_normal(
        (1 + grid_in ** 2, 6)).astype(np.float64)
    got = clip_weights.resize_position_embedding(table, grid_out)
    patches = torch.from_numpy(table[1:].reshape(1, grid_in, grid_in, 6)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(patches, size=(grid_out, grid_out), mode="bicubic",
                                          align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(grid_out ** 2, 6).numpy()
    assert got.shape == (1 + grid_out ** 2, 6) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], table[0].astype(np.float32))
    # float64 on both sides: the same weights, up to float32 rounding of the result
    assert np.abs(got[1:] - ref).max() <= 1e-6 * np.abs(ref).max()
    # align_corners=True differs, so the comparison can tell the variants apart
    if grid_in != grid_out:
        other = torch.nn.functional.interpolate(patches, size=(grid_out, grid_out),
                                                mode="bicubic", align_corners=True)
        other = other.permute(0, 2, 3, 1).reshape(grid_out ** 2, 6).numpy()
        assert np.abs(got[1:] - other).max() > 1e-3


def test_image_size_and_context_length_are_fitted(hf_dir, hf_sd, cfg):
    vision = dict(cfg["vision"], image_size=48)       # grid 4 -> 6
    text = dict(cfg["text"], context_length=8)
    params = clip_weights.import_clip(hf_dir[1], vision_cfg=vision, text_cfg=text)
    pos = params["vision"]["position_embedding"]["embedding"]
    src = hf_sd["vision_model.embeddings.position_embedding.weight"]
    assert pos.shape == (37, 48)
    np.testing.assert_array_equal(pos[0], src[0])
    grid = torch.from_numpy(src[1:].reshape(1, GRID, GRID, 48)).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(36, 48).numpy()
    assert np.abs(pos[1:] - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_array_equal(params["text"]["position_embedding"]["embedding"],
                                  hf_sd["text_model.embeddings.position_embedding.weight"][:8])
    # the fitted towers run at the new sizes
    out = parity.run_vision(vision, params["vision"],
                            np.zeros((1, 48, 48, 3), np.float32), hidden_layers=())
    assert out["tokens"].shape == (1, 37, 48)
    with pytest.raises(ValueError, match="CLIP checkpoint text context_length 16 is shorter than "
                                         "model.clip.text.context_length 20$"):
        clip_weights.import_clip(hf_dir[1], vision_cfg=None,
                                 text_cfg=dict(cfg["text"], context_length=20))


def test_one_tower_only(hf_dir, cfg, hf_params):
    params = clip_weights.import_clip(hf_dir[1], vision_cfg=cfg["vision"], text_cfg=None)
    assert set(params) == {"vision"}
    assert_same_tree(params["vision"], hf_params["vision"])


@pytest.mark.parametrize("field,value,message", [
    ("width", 32, "CLIP checkpoint vision width 48 does not match model.clip.vision.width 32"),
    ("patch_size", 16,
     "CLIP checkpoint vision patch_size 8 does not match model.clip.vision.patch_size 16"),
])
def test_architecture_mismatch_is_one_line(tmp_path, hf_dir, hf_sd, cfg, field, value, message):
    vision = dict(cfg["vision"], **{field: value})
    oa_path = tmp_path / "clip.safetensors"
    from safetensors.numpy import save_file
    save_file(openai_state_dict(hf_sd), str(oa_path))
    for path in (hf_dir[1], oa_path):
        with pytest.raises(ValueError) as e:
            clip_weights.import_clip(path, vision_cfg=vision, text_cfg=cfg["text"])
        assert str(e.value) == message   # only this field differs, one line
    with pytest.raises(ValueError, match="text width 32 does not match model.clip.text.width 64"):
        clip_weights.import_clip(hf_dir[1], vision_cfg=None, text_cfg=dict(cfg["text"], width=64))


def test_missing_files_name_the_path(tmp_path, hf_dir):
    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(FileNotFoundError, match=f"no such CLIP checkpoint: {missing}"):
        clip_weights.import_clip(missing, vision_cfg=None, text_cfg=None)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no config.json in {empty}"):
        clip_weights.import_clip(empty, vision_cfg=None, text_cfg=None)
    with open(os.path.join(hf_dir[1], "config.json")) as f:
        (empty / "config.json").write_text(f.read())
    with pytest.raises(FileNotFoundError,
                       match=f"{empty} holds neither model.safetensors nor pytorch_model.bin"):
        clip_weights.import_clip(empty, vision_cfg=None, text_cfg=None)


def test_key_accounting_and_refused_files(tmp_path, hf_dir, hf_sd, cfg):
    oa = openai_state_dict(hf_sd)
    oa.pop("visual.transformer.resblocks.1.ln_2.bias")
    oa["visual.extra_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightConversionError,
                       match=r"1 missing keys: visual.transformer.resblocks.1.ln_2.bias; "
                             r"1 unexpected keys: visual.extra_head.weight"):
        clip_weights.clip_to_params(oa, clip_weights.config_from_openai(oa), "openai",
                                    cfg["vision"], cfg["text"])
    # an HF state dict passed as a lone file: its directory (config.json) is needed
    with pytest.raises(WeightConversionError, match="pass its directory"):
        clip_weights.import_clip(os.path.join(hf_dir[1], "model.safetensors"),
                                 vision_cfg=cfg["vision"], text_cfg=cfg["text"])
    script = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():   # torch.jit is deprecated; OpenAI's archives are not gone
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(script))
    with pytest.raises(WeightFileError, match="is a TorchScript archive"):
        clip_weights.import_clip(script, vision_cfg=cfg["vision"], text_cfg=cfg["text"])


def test_hf_eos_rule_and_config_fields(hf_dir):
    with open(os.path.join(hf_dir[1], "config.json")) as f:
        hf = json.load(f)
    assert clip_weights.config_from_hf(hf)["text"]["eos_token_id"] == parity.EOS
    hf["text_config"]["eos_token_id"] = 2          # before transformers PR #24773: argmax(ids)
    assert clip_weights.config_from_hf(hf)["text"]["eos_token_id"] is None
    del hf["text_config"]["eos_token_id"]          # HF's default since then
    assert clip_weights.config_from_hf(hf)["text"]["eos_token_id"] == 49407
    cfg = clip_weights.config_from_hf(hf)
    assert cfg["vision"] == dict(width=48, layers=3, heads=4, patch_size=8, image_size=32,
                                 output_dim=24, mlp_ratio=4.0, act="quick_gelu",
                                 layer_norm_eps=1e-5)
    assert cfg["text"]["mlp_ratio"] == 2.5 and cfg["text"]["context_length"] == 16
    hf["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(WeightConversionError, match="hidden_act 'relu' is not supported"):
        clip_weights.config_from_hf(hf)
