"""Linen CLIP towers (models/clip.py) vs transformers' PyTorch CLIPModel, float32, with random
weights imported through magnet_jax.weights.clip from a `save_pretrained` directory; scanned vs
unrolled stacks; shapes of the ViT-B/16 preset at 416 pixels (jax.eval_shape, no compute).

Tolerance: max|Δ| <= 1e-5 · max|ref| (tests/numerics.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from magnet_jax import sharding
from magnet_jax.models.clip import CLIPText, CLIPVision, clip_config
from tests.numerics import check, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from magnet_jax.weights.clip import config_from_hf, import_clip  # noqa: E402

IMAGE = 32
CONTEXT = 16
VOCAB = 100
BOS, EOS = 98, 50   # EOS mid-vocabulary: argmax(ids) would pool elsewhere (HF's newer rule)
VISION_LAYERS = 3   # hidden_layers=(1,) leaves a 2-layer stretch that runs as a scan


def hf_clip_config(patch_size: int = 8, eos_token_id: int = EOS):
    return transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=CONTEXT, bos_token_id=BOS,
                         eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=192,
                           num_hidden_layers=VISION_LAYERS, num_attention_heads=4,
                           image_size=IMAGE, patch_size=patch_size),
        projection_dim=24, attn_implementation="eager")


def random_hf_clip(patch_size: int = 8, seed: int = 0):
    """A random CLIPModel whose every parameter is far from zero and from its init: weights
    ~ N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.2²), biases N(0, 0.2²), class embedding
    N(0, 0.5²)."""
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_clip_config(patch_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0:      # logit_scale
                continue
            if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape))
            elif p.ndim == 1:
                p.copy_((0.5 if "class_embedding" in name else 0.2) * torch.randn(p.shape))
            else:
                p.copy_(torch.randn(p.shape) * p[0].numel() ** -0.5)
    return model


def token_batch(seed: int = 0, eot: int = EOS):
    """ids/att (2, 16): a 7-token sentence right-padded with 0, and a full-length one; BOS
    first, `eot` last. The BOS id (98) is larger than every other, so argmax(ids) != EOT."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((2, CONTEXT), np.int32)
    att = np.zeros((2, CONTEXT), np.int32)
    for b, n in enumerate((7, CONTEXT)):
        words = rng.integers(3, 97, n - 2)
        words[words == EOS] = 51
        ids[b, :n] = [BOS, *words, eot]
        att[b, :n] = 1
    return ids, att


def pixel_batch(seed: int = 0):
    return np.random.default_rng(seed).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """patch size -> (HF model, {'vision', 'text'} kwargs, imported params), built once each."""
    cache = {}

    def get(patch_size: int):
        if patch_size not in cache:
            model = random_hf_clip(patch_size)
            path = tmp_path_factory.mktemp(f"hf_clip_p{patch_size}")
            model.save_pretrained(path, safe_serialization=True)
            cfg = config_from_hf(path)
            params = import_clip(path, vision_cfg=cfg["vision"], text_cfg=cfg["text"])
            cache[patch_size] = (model, cfg, params)
        return cache[patch_size]

    return get


def torch_vision(model, pixels):
    with torch.no_grad():
        out = model.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
                                 output_hidden_states=True)
        embeds = model.visual_projection(out.pooler_output)
    return dict(tokens=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
                embeds=embeds.numpy(), hidden_1=out.hidden_states[1].numpy())


def torch_text(model, ids, att):
    with torch.no_grad():
        out = model.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                               attention_mask=torch.from_numpy(att.astype(np.int64)))
        embeds = model.text_projection(out.pooler_output)
    return dict(tokens=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy(),
                embeds=embeds.numpy())


def run_vision(cfg, params, pixels, hidden_layers=(1,)):
    model = CLIPVision(**cfg)
    return jax.jit(lambda p, x: model.apply({"params": p}, x, hidden_layers=hidden_layers))(
        params, pixels)


def run_text(cfg, params, ids, att):
    model = CLIPText(**cfg)
    return jax.jit(lambda p, i, a: model.apply({"params": p}, i, a))(params, ids, att)


@pytest.mark.parametrize("patch_size", [8, 16])
def test_vision_tower_matches_transformers(hf_clip, patch_size):
    model, cfg, params = hf_clip(patch_size)
    assert model.config._attn_implementation == "eager" and not model.training
    pixels = pixel_batch()
    ref = torch_vision(model, pixels)
    got = run_vision(cfg["vision"], params["vision"], pixels)
    assert got["tokens"].shape == (2, 1 + (IMAGE // patch_size) ** 2, 48)
    check(f"[clip p{patch_size}] image embeds", got["embeds"], ref["embeds"])
    check(f"[clip p{patch_size}] pooled", got["pooled"], ref["pooled"])
    check(f"[clip p{patch_size}] last_hidden_state", got["tokens"], ref["tokens"])
    check(f"[clip p{patch_size}] hidden after layer 1", got["hidden"][0], ref["hidden_1"])
    # the intermediate state is not the output: a wrong layer index would fail above
    assert rel_err(got["hidden"][0], ref["tokens"]) > 1e-2


def test_text_tower_matches_transformers(hf_clip):
    model, cfg, params = hf_clip(8)
    assert cfg["text"]["eos_token_id"] == EOS
    ids, att = token_batch()
    assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).all()   # the two pooling rules differ
    ref = torch_text(model, ids, att)
    got = run_text(cfg["text"], params["text"], ids, att)
    check("[clip] text embeds", got["embeds"], ref["embeds"])
    check("[clip] text pooled", got["pooled"], ref["pooled"])
    # every position, padding included (it attends causally to the real tokens only)
    check("[clip] text last_hidden_state", got["tokens"], ref["tokens"])
    assert np.abs(np.asarray(got["tokens"])[0, 7:]).max() > 0.1


def test_text_tower_legacy_eos_rule_matches_transformers(hf_clip):
    """HF configs saved with eos_token_id 2 pool at argmax(ids) (OpenAI's rule), which the
    importer maps to eos_token_id=None."""
    model, cfg, params = hf_clip(8)
    ids, att = token_batch(seed=1, eot=VOCAB - 1)
    ids[0, 2] = EOS   # an EOS id that is not the end: the newer rule would pool here
    legacy = dict(cfg["text"], eos_token_id=None)
    model.text_model.eos_token_id = 2
    try:
        ref = torch_text(model, ids, att)
    finally:
        model.text_model.eos_token_id = EOS
    got = run_text(legacy, params["text"], ids, att)
    check("[clip] text embeds, legacy eos rule", got["embeds"], ref["embeds"])
    assert rel_err(got["embeds"], torch_text(model, ids, att)["embeds"]) > 1e-2


def test_scan_and_unrolled_stacks_agree(hf_clip):
    model, cfg, params = hf_clip(8)
    pixels, (ids, att) = pixel_batch(1), token_batch(2)
    outs = {}
    for scan in (True, False):
        v = CLIPVision(**dict(cfg["vision"], scan_layers=scan))
        t = CLIPText(**dict(cfg["text"], scan_layers=scan))

        def run(p, x, i, a, v=v, t=t):
            return (v.apply({"params": p["vision"]}, x, hidden_layers=(1,)),
                    t.apply({"params": p["text"]}, i, a))

        assert ("scan" in str(jax.make_jaxpr(run)(params, pixels, ids, att))) == scan
        outs[scan] = jax.jit(run)(params, pixels, ids, att)
    flat_scan, flat_loop = jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])
    assert len(flat_scan) == len(flat_loop) == 7
    for a, b in zip(flat_scan, flat_loop):
        assert rel_err(a, b) <= 1e-6


def test_vit_b16_at_416_shapes():
    """The ViT-B/16 preset at 416 pixels: a 26×26 grid (677 position rows), OpenAI's parameter
    counts for both towers (86.2M image at 224, 63.4M text), output shapes; no compute."""
    cfg = clip_config("ViT-B/16", image_size=416)
    vision, text = CLIPVision(**cfg["vision"]), CLIPText(**cfg["text"])
    key = jax.random.key(0)
    pixels = jax.ShapeDtypeStruct((2, 416, 416, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((2, 77), jnp.int32)
    vp = nn.unbox(jax.eval_shape(vision.init, key, pixels))
    tp = nn.unbox(jax.eval_shape(text.init, key, ids))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert vp["params"]["position_embedding"]["embedding"].shape == (26 * 26 + 1, 768)
    assert set(vp["params"]["encoder"]) == {f"layers_{i}" for i in range(12)}
    # 86,192,640 parameters at 224 (197 position rows); 480 more rows × 768 at 416
    assert count(vp) == 86_192_640 + (677 - 197) * 768
    assert count(tp) == 63_428_096
    out = jax.eval_shape(lambda p, x: vision.apply(p, x, hidden_layers=(8, 4)), vp, pixels)
    assert [h.shape for h in out["hidden"]] == [(2, 677, 768)] * 2
    assert out["tokens"].shape == (2, 677, 768)
    assert out["pooled"].shape == (2, 768) and out["embeds"].shape == (2, 512)
    tout = jax.eval_shape(lambda p, i: text.apply(p, i, jnp.ones(i.shape, jnp.int32)), tp, ids)
    assert tout["tokens"].shape == (2, 77, 512) and tout["embeds"].shape == (2, 512)
    patches = jax.eval_shape(lambda p, x: vision.apply(p, x, method="embed_patches"), vp, pixels)
    assert patches.shape == (2, 676, 768)
    # the large kernels shard their width over fsdp (magnet_jax/sharding.py), as BERT's do
    mesh = sharding.make_mesh(num_fsdp=2)
    vs = sharding.logical_shardings(jax.eval_shape(vision.init, key, pixels), mesh)["params"]
    ts = sharding.logical_shardings(jax.eval_shape(text.init, key, ids), mesh)["params"]
    assert vs["encoder"]["layers_11"]["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", None)
    assert vs["encoder"]["layers_0"]["mlp"]["fc2"]["kernel"].spec == P(None, "fsdp")
    assert vs["patch_embedding"]["kernel"].spec == P(None, None, None, "fsdp")
    assert ts["token_embedding"]["embedding"].spec == P(None, "fsdp")
    assert ts["projection"]["kernel"].spec == P("fsdp", None)


def test_input_size_and_layer_index_errors():
    cfg = clip_config("ViT-B/16", width=32, layers=2, heads=2, image_size=48, patch_size=16)
    vision = CLIPVision(**cfg["vision"])
    params = nn.unbox(jax.eval_shape(vision.init, jax.random.key(0),
                                     jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32)))
    with pytest.raises(ValueError, match="input 32x32 does not match image_size 48"):
        jax.eval_shape(vision.apply, params, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match="4 patch tokens, but .* 3x3 = 9"):
        jax.eval_shape(lambda p, t: vision.apply(p, t, method="encode"), params,
                       jax.ShapeDtypeStruct((1, 4, 32), jnp.float32))
    with pytest.raises(ValueError, match=r"hidden_layers \(3,\) must lie in 1..2"):
        jax.eval_shape(lambda p, x: vision.apply(p, x, hidden_layers=(3,)), params,
                       jax.ShapeDtypeStruct((1, 48, 48, 3), jnp.float32))
    text = CLIPText(**cfg["text"])
    tparams = nn.unbox(jax.eval_shape(text.init, jax.random.key(0),
                                      jax.ShapeDtypeStruct((1, 77), jnp.int32)))
    with pytest.raises(ValueError, match="78 tokens exceed context_length 77"):
        jax.eval_shape(text.apply, tparams, jax.ShapeDtypeStruct((1, 78), jnp.int32))


def test_clip_config_overrides():
    cfg = clip_config("ViT-B/32", width=64, layers=2, heads=4, image_size=64,
                      text_context_length=16, vision_output_dim=8, text_output_dim=8)
    assert cfg["vision"]["width"] == cfg["text"]["width"] == 64
    assert cfg["vision"]["patch_size"] == 32 and cfg["vision"]["image_size"] == 64
    assert cfg["text"]["context_length"] == 16 and "image_size" not in cfg["text"]
    assert clip_config("ViT-B/16")["vision"]["width"] == 768   # presets are not mutated
    with pytest.raises(ValueError, match="unknown override 'depth'"):
        clip_config("ViT-B/16", depth=3)
    with pytest.raises(ValueError, match="not a multiple of patch_size 16"):
        clip_config("ViT-B/16", image_size=40)
