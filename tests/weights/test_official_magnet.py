"""Official MagNet key map: inventory, round trip through a synthetic official state dict,
strict key accounting, architecture inference and the convert CLI (no official code used)."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from magnet_jax.weights import common
from magnet_jax.weights import official_magnet as om


def _official_cfg():
    from magnet_jax.models.presets import official_model_config
    return official_model_config()


# --- inventory of §9 (pure bookkeeping, no model)


def test_official_inventory_matches_spec():
    shapes = om.official_key_shapes(_official_cfg())
    floats = {k: v for k, v in shapes.items() if not k.endswith("relative_position_index")}
    assert len(shapes) == 1310 and len(floats) == 1286
    count = lambda keys: sum(int(np.prod(floats[k])) for k in keys if k in floats)
    assert count(shapes) == 296_984_954
    by_prefix = {p: [k for k in shapes if k.startswith(p + ".")] for p in
                 ("image_model", "language_model", "classifier.pixel_decoder",
                  "classifier.predictor", "lang_proj")}
    assert {p: len(v) for p, v in by_prefix.items()} == {
        "image_model": 789, "language_model": 261, "classifier.pixel_decoder": 83,
        "classifier.predictor": 175, "lang_proj": 2}
    assert count(by_prefix["image_model"]) == 152_769_656
    assert count(by_prefix["language_model"]) == 126_021_120
    assert count(by_prefix["classifier.pixel_decoder"]) == 3_588_864
    assert count(by_prefix["classifier.predictor"]) == 14_408_450
    trunk = [k for k in shapes if re.match(r"image_model\.(patch_embed|norm\d|layers\.\d\.(blocks|downsample))", k)]
    assert count(trunk) == 86_880_376
    # Dead entries of §9.6: 34 keys (36 listed there minus class_embed, which is built).
    dead = {k for k in om.ignored_official_keys(_official_cfg()) if not k.endswith("relative_position_index")}
    assert len(dead) == 34 and count(dead) == 7_420_930 - 514
    assert om.IGNORED_OFFICIAL_KEYS == set(om.ignored_official_keys(_official_cfg()))


@pytest.mark.slow
def test_official_rules_match_the_linen_model_full_size():
    """Every Linen leaf of the official-size model is produced by exactly one rule, same shape."""
    from magnet_jax.convert import model_abstract_params
    abstract = common.flatten_tree(model_abstract_params(_official_cfg()))
    produced = {}
    for rule in om.official_rules(_official_cfg()):
        tree = {}
        common.apply_rule(rule, np.zeros(rule.src_shape, np.float32), tree)
        for path, leaf in common.flatten_tree(tree).items():
            assert path not in produced, path
            produced[path] = leaf.shape
    assert set(produced) == set(abstract)
    assert all(produced[p] == tuple(abstract[p].shape) for p in produced)


# --- (b) round trip


def test_round_trip_tiny(tiny_cfg, tiny_params, tiny_abstract):
    sd = om.params_to_official(tiny_params, tiny_cfg)
    assert set(sd) == set(om.official_key_shapes(tiny_cfg))
    params, cfg = om.official_to_params(sd, image_size=tiny_cfg.image_size)
    common.check_against_abstract(params, tiny_abstract)
    flat, ref = common.flatten_tree(params), common.flatten_tree(tiny_params)
    assert set(flat) == set(ref)
    for path in ref:
        np.testing.assert_array_equal(flat[path], ref[path], err_msg=path)
    assert cfg.to_dict() == tiny_cfg.to_dict()
    # and back again, bit-exact
    sd2 = om.params_to_official(params, cfg)
    for k in sd:
        np.testing.assert_array_equal(sd2[k], sd[k], err_msg=k)


def test_conversion_report_counts(tiny_cfg, tiny_params):
    sd = om.params_to_official(tiny_params, tiny_cfg)
    result = om.convert_official(sd, image_size=tiny_cfg.image_size)
    assert len(result.consumed) + len(result.ignored) == len(sd) == result.num_source_keys
    assert len(result.ignored) == len(om.ignored_official_keys(tiny_cfg))


def test_dead_keys_may_be_absent(tiny_cfg, tiny_params):
    sd = om.params_to_official(tiny_params, tiny_cfg, include_dead=False)
    params, _ = om.official_to_params(sd, image_size=tiny_cfg.image_size)
    assert common.count_params(params) == common.count_params(tiny_params)


def test_vis_project_trap_and_mha_split(tiny_cfg, tiny_params):
    """Image-side vis_project is a Conv1d (out, in, 1), language-side a Linear (out, in); the
    decoder in_proj is split q|k|v in that order."""
    sd = om.params_to_official(tiny_params, tiny_cfg)
    img = sd["image_model.layers.0.fusion.vis_project.0.weight"]
    lang = sd["language_model.pwams.0.vis_project.0.weight"]
    assert img.ndim == 3 and lang.ndim == 2
    p = tiny_params
    np.testing.assert_array_equal(img[:, :, 0].T, p["image_model"]["layers_0"]["fusion"]["vis_project"]["kernel"])
    np.testing.assert_array_equal(lang.T, p["language_model"]["pwams_0"]["vis_project"]["kernel"])
    w = sd["classifier.predictor.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight"]
    d = w.shape[1]
    att = p["predictor"]["cross_attn_1"]
    for i, name in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(w[i * d:(i + 1) * d].T, att[name]["kernel"])


def test_mha_split_matches_torch_multihead_attention():
    """One query, one key: softmax weight is 1, so MHA(x) = out_proj(v_proj(x)); this pins the
    third block of in_proj as the value projection."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    d = 16
    mha = torch.nn.MultiheadAttention(d, 4)
    b = common.RuleBuilder()
    b.mha("attn", "attn", d)
    sd = {"attn." + k: v.detach().numpy() for k, v in mha.state_dict().items()}
    acc = common.KeyAccounting(sd)
    params = common.apply_rules(b.rules, acc)
    acc.finish()
    x = torch.randn(1, 1, d)
    ref = mha(x, x, x, need_weights=False)[0].detach().numpy()[0, 0]
    xn = x.numpy()[0, 0]
    v = xn @ params["attn"]["value"]["kernel"] + params["attn"]["value"]["bias"]
    out = v @ params["attn"]["out"]["kernel"] + params["attn"]["out"]["bias"]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    q = xn @ params["attn"]["query"]["kernel"] + params["attn"]["query"]["bias"]
    wq, bq = mha.in_proj_weight[:d].detach().numpy(), mha.in_proj_bias[:d].detach().numpy()
    np.testing.assert_allclose(q, xn @ wq.T + bq, rtol=1e-5, atol=1e-6)


# --- key accounting errors name the key


@pytest.fixture()
def tiny_sd(tiny_cfg, tiny_params):
    return om.params_to_official(tiny_params, tiny_cfg)


def _convert(sd, cfg):
    return om.official_to_params(sd, image_size=cfg.image_size)


def test_missing_key_is_named(tiny_sd, tiny_cfg):
    key = "image_model.layers.1.blocks.1.attn.qkv.weight"
    del tiny_sd[key]
    with pytest.raises(common.WeightConversionError, match=r"1 missing keys: " + re.escape(key)):
        _convert(tiny_sd, tiny_cfg)


def test_extra_key_is_named(tiny_sd, tiny_cfg):
    tiny_sd["classifier.predictor.something_new.weight"] = np.zeros(3, np.float32)
    with pytest.raises(common.WeightConversionError,
                       match=r"1 unexpected keys: classifier\.predictor\.something_new\.weight"):
        _convert(tiny_sd, tiny_cfg)


def test_wrong_shape_is_named(tiny_sd, tiny_cfg):
    key = "language_model.pwams.1.image_lang_att.f_key.0.weight"
    tiny_sd[key] = tiny_sd[key][:, :-1]
    with pytest.raises(common.WeightConversionError, match=re.escape(key) + r" \(got \(64, 63, 1\)"):
        _convert(tiny_sd, tiny_cfg)


def test_bad_relative_position_index_is_named(tiny_sd, tiny_cfg):
    key = "image_model.layers.2.blocks.1.attn.relative_position_index"
    tiny_sd[key] = tiny_sd[key].T.copy() + 1
    with pytest.raises(common.WeightConversionError, match=re.escape(key) + " differs"):
        _convert(tiny_sd, tiny_cfg)


def test_all_problems_in_one_error(tiny_sd, tiny_cfg):
    del tiny_sd["classifier.pixel_decoder.mask_features.bias"]
    tiny_sd["extra.key"] = np.zeros(1, np.float32)
    tiny_sd["classifier.predictor.decoder_norm.weight"] = np.zeros(5, np.float32)
    with pytest.raises(common.WeightConversionError) as e:
        _convert(tiny_sd, tiny_cfg)
    msg = str(e.value)
    assert "mask_features.bias" in msg and "extra.key" in msg and "decoder_norm.weight" in msg


# --- detection and inference


def test_plain_swin_or_bert_is_not_magnet():
    swin_sd = {"patch_embed.proj.weight": np.zeros((8, 3, 4, 4)), "layers.0.blocks.0.norm1.weight": np.zeros(8)}
    bert_sd = {"bert.embeddings.word_embeddings.weight": np.zeros((10, 8))}
    for sd in (swin_sd, bert_sd):
        assert not om.is_official_checkpoint(sd)
        with pytest.raises(common.WeightConversionError, match="not a MagNet checkpoint: found keys like"):
            om.official_to_params(sd)


def test_inference_reads_shapes(tiny_sd, tiny_cfg):
    cfg = om.infer_official_config(tiny_sd, image_size=448)
    assert cfg.image_size == 448
    assert tuple(cfg.swin.depths) == tuple(tiny_cfg.swin.depths)
    assert tuple(cfg.swin.num_heads) == tuple(tiny_cfg.swin.num_heads)
    assert cfg.swin.window_size == tiny_cfg.swin.window_size
    assert cfg.bert.num_layers == 4 and tuple(cfg.bert.stage_ends) == (1, 2, 3, 4)
    assert cfg.decoder.num_layers == tiny_cfg.decoder.num_layers
    assert om.infer_official_config(tiny_sd, bert_num_heads=4).bert.num_heads == 4
    with pytest.raises(common.WeightConversionError, match="pyramid_pools"):
        om.infer_official_config(tiny_sd, pyramid_pools=(1, 2))


def test_module_prefix_is_stripped(tiny_sd, tiny_cfg):
    sd = {"module." + k: v for k, v in tiny_sd.items()}
    params, _ = _convert(sd, tiny_cfg)
    assert "image_model" in params


# --- the CLI


def test_convert_cli_official(tmp_path, tiny_sd, tiny_cfg, tiny_abstract, tiny_params):
    torch = pytest.importorskip("torch")
    from magnet_jax import checkpoint_io, convert
    src = tmp_path / "magnet_tiny.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in tiny_sd.items()}}, src)
    dst = tmp_path / "converted"
    assert convert.main(["official", str(src), str(dst), "--image-size", str(tiny_cfg.image_size)]) == 0
    cfg, params = checkpoint_io.load_params(str(dst), abstract=tiny_abstract)
    assert cfg.to_dict() == tiny_cfg.to_dict()
    flat, ref = common.flatten_tree(params), common.flatten_tree(tiny_params)
    for path in ref:
        np.testing.assert_array_equal(np.asarray(flat[path]), ref[path], err_msg=path)
    # refuses to overwrite, with a one-line error and exit status 2
    assert convert.main(["official", str(src), str(dst), "--image-size", str(tiny_cfg.image_size)]) == 2


def test_convert_cli_errors_are_one_line(tmp_path):
    missing = tmp_path / "nope.pth"
    proc = subprocess.run([sys.executable, "-m", "magnet_jax.convert", "official", str(missing),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: no such file: {missing}"]


def test_forensics(tiny_sd):
    facts = om.forensics(tiny_sd)
    assert facts["image_model.norm* untouched (ones/zeros)"] is True
    assert facts["language_model.res_gates.3 all zero"] is False     # params_to_official fills noise
    for k in ("language_model.res_gates.3.0.weight", "language_model.res_gates.3.2.weight"):
        tiny_sd[k] = np.zeros_like(tiny_sd[k])
    tiny_sd["image_model.norm1.bias"] = tiny_sd["image_model.norm1.bias"] + 1
    facts = om.forensics(tiny_sd)
    assert facts["language_model.res_gates.3 all zero"] is True
    assert facts["image_model.norm* untouched (ones/zeros)"] is False
