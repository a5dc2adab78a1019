"""Decoder attention layer vs torch.nn.MultiheadAttention and MSDeformAttn vs a pure-torch
transcription of multi-scale deformable attention (magnet_architecture.md §5.4, §6.4,
§12 risks 14, 15, 18).

Tolerance: max|Δ| <= 1e-5 · max|ref| (float32, matmul precision 'highest').
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.models.mask_decoder import AttentionLayer
from magnet_jax.models.msdeform import MSDeformAttn, reference_points
from tests.numerics import check, rel_err, torch_to_numpy as _np

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch")
F = torch.nn.functional


def linear(m):
    return {"kernel": _np(m.weight).T, "bias": _np(m.bias)}


# --------------------------------------------------------------------------------------------
# masked cross-attention layer
# --------------------------------------------------------------------------------------------


def test_attention_layer_vs_torch_mha():
    dim, heads, b, nq, hk, wk = 32, 4, 2, 3, 3, 4
    nk = hk * wk
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(dim, heads, dropout=0.0)
    norm = torch.nn.LayerNorm(dim)
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.3)
        mha.out_proj.bias.normal_(0, 0.3)
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0, 0.2)
    mha.eval()
    rng = np.random.default_rng(0)
    x, qpos = (rng.standard_normal((b, nq, dim)).astype(np.float32) for _ in range(2))
    mem, pos = (rng.standard_normal((b, nk, dim)).astype(np.float32) for _ in range(2))
    block = rng.random((b, nq, nk)) < 0.5  # True = may not attend
    block[:, :, 0] = False  # never a fully blocked row
    block[0, 1] = False  # one row fully open
    block[1, 2, 1:] = True  # one row with a single key
    assert block.any() and not block.all(-1).any()

    def t(a):  # (B, L, C) -> sequence-first (L, B, C)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2)))

    mask_t = torch.from_numpy(np.repeat(block, heads, axis=0))  # (B·heads, Q, K), batch-major
    with torch.no_grad():
        attn_out = mha(t(x + qpos), t(mem + pos), t(mem), attn_mask=mask_t, need_weights=False)[0]
        ref = _np(norm(t(x) + attn_out)).transpose(1, 0, 2)

    w, bias = _np(mha.in_proj_weight), _np(mha.in_proj_bias)
    params = {
        "params": {
            "query": {"kernel": w[:dim].T, "bias": bias[:dim]},
            "key": {"kernel": w[dim : 2 * dim].T, "bias": bias[dim : 2 * dim]},
            "value": {"kernel": w[2 * dim :].T, "bias": bias[2 * dim :]},
            "out": linear(mha.out_proj),
            "norm": {"scale": _np(norm.weight), "bias": _np(norm.bias)},
        }
    }
    layer = AttentionLayer(dim, heads)
    got = jax.jit(layer.apply)(params, x, qpos, mem, pos, block)
    check("AttentionLayer vs nn.MultiheadAttention (bool mask)", got, ref)
    # the mask is effective: without it the result is different
    assert rel_err(layer.apply(params, x, qpos, mem, pos, None), ref) > 1e-2

    # without a mask (the self-attention use)
    with torch.no_grad():
        attn_out = mha(t(x + qpos), t(x + qpos), t(x), need_weights=False)[0]
        ref_self = _np(norm(t(x) + attn_out)).transpose(1, 0, 2)
    check("AttentionLayer self-attention, no mask", layer.apply(params, x, qpos, x, qpos), ref_self)


# --------------------------------------------------------------------------------------------
# multi-scale deformable attention
# --------------------------------------------------------------------------------------------


class TorchMSDeformAttn(torch.nn.Module):
    """Own pure-torch transcription of §5.4 (channel layout (h, l, p, xy), joint softmax over
    levels·points, grid_sample bilinear/zeros/align_corners=False on 2·loc − 1)."""

    def __init__(self, dim, levels, heads, points):
        super().__init__()
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = torch.nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = torch.nn.Linear(dim, heads * levels * points)
        self.value_proj = torch.nn.Linear(dim, dim)
        self.output_proj = torch.nn.Linear(dim, dim)

    def forward(self, query, ref, value_input, shapes):
        b, nq, _ = query.shape
        h, nl, npt, hd = self.heads, self.levels, self.points, self.dim // self.heads
        value = self.value_proj(value_input).view(b, -1, h, hd)
        off = self.sampling_offsets(query).view(b, nq, h, nl, npt, 2)
        aw = (
            self.attention_weights(query)
            .view(b, nq, h, nl * npt)
            .softmax(-1)
            .view(b, nq, h, nl, npt)
        )
        normaliser = torch.tensor([[w, hh] for hh, w in shapes], dtype=torch.float32)  # (x, y)
        loc = ref[:, :, None, :, None, :] + off / normaliser[None, None, None, :, None, :]
        grids = 2 * loc - 1
        sizes = [hh * w for hh, w in shapes]
        sampled = []
        for lvl, (v, (hh, w)) in enumerate(zip(value.split(sizes, dim=1), shapes)):
            v = v.flatten(2).transpose(1, 2).reshape(b * h, hd, hh, w)
            g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B·h, Q, P, 2)
            sampled.append(
                F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            )  # (B·h, hd, Q, P)
        aw = aw.transpose(1, 2).reshape(b * h, 1, nq, nl * npt)
        out = (torch.stack(sampled, dim=-2).flatten(-2) * aw).sum(-1).view(b, h * hd, nq)
        return self.output_proj(out.transpose(1, 2)), loc


def test_msdeform_attn_vs_torch_transcription():
    dim, heads, points = 32, 4, 3
    shapes = ((6, 5), (3, 3))
    levels = len(shapes)
    s = sum(h * w for h, w in shapes)
    b = 2
    torch.manual_seed(1)
    ref_mod = TorchMSDeformAttn(dim, levels, heads, points)
    with torch.no_grad():
        for lin in (ref_mod.value_proj, ref_mod.output_proj, ref_mod.attention_weights):
            lin.weight.normal_(0, 1.0 / dim**0.5)
            lin.bias.normal_(0, 0.3)
        # offsets of a few pixels: many samples land near or beyond the map borders
        ref_mod.sampling_offsets.weight.normal_(0, 1.5 / dim**0.5)
        ref_mod.sampling_offsets.bias.normal_(0, 1.0)
    rng = np.random.default_rng(4)
    src = rng.standard_normal((b, s, dim)).astype(np.float32)
    pos = rng.standard_normal((b, s, dim)).astype(np.float32)
    refs = reference_points(shapes)  # (S, 2)
    ref_t = torch.from_numpy(np.broadcast_to(refs[None, :, None, :], (b, s, levels, 2)).copy())
    with torch.no_grad():
        ref, loc = ref_mod(torch.from_numpy(src + pos), ref_t, torch.from_numpy(src), shapes)
    ref = _np(ref)
    loc = loc.numpy()
    outside = ((loc < 0) | (loc > 1)).any(-1).mean()
    print(f"[decoder] MSDeformAttn: {outside:.0%} of samples outside the maps")
    assert 0.1 < outside < 0.9

    params = {
        "params": {
            n: linear(getattr(ref_mod, n))
            for n in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        }
    }
    module = MSDeformAttn(dim, levels, heads, points)
    got = jax.jit(lambda p, q, v: module.apply(p, q, jnp.asarray(refs), v, shapes))(
        params, src + pos, src
    )
    check("MSDeformAttn vs torch transcription (levels (6,5),(3,3))", got, ref)


def test_reference_points_formula():
    shapes = ((3, 4), (2, 2))
    refs = reference_points(shapes)
    assert refs.shape == (16, 2) and refs.dtype == np.float32
    # level 0 token (row 2, col 1): x = 1.5/4, y = 2.5/3
    np.testing.assert_allclose(refs[2 * 4 + 1], [1.5 / 4, 2.5 / 3], rtol=1e-7)
    np.testing.assert_allclose(refs[12 + 3], [0.75, 0.75], rtol=1e-7)
