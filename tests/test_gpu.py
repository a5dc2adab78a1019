"""GPU against CPU, in one process: the MagNet forward pass on the accelerator and on the host.

Run on a GPU machine with both backends: `JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu -s
-p no:xdist -o addopts= tests/test_gpu.py` (JAX_PLATFORMS=cuda alone hides the CPU backend;
tools/accelerator_check.sh runs it so). Skipped unless JAX's default backend is a GPU
(tests/conftest.py).

Weights: random_params with every kernel rescaled to N(0, 1/fan_in). random_params alone
(N(0, 0.02²)) gives near-constant logits (about -0.0175 everywhere on the tiny model: no mask
to compare); at unit gain the logits span about -13..4 and the masks are non-trivial.

Each comparison prints `GPU_PARITY {json}` (before asserting) for the check script to collect.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from magnet_jax.models import build_model, mask_logits_at, presets, random_params

pytestmark = [pytest.mark.gpu]

MAX_TOKENS = 20


def _devices():
    accel = jax.devices()[0]
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as err:
        pytest.fail(f"no CPU backend next to {accel.platform}: run with JAX_PLATFORMS="
                    f"cuda,cpu ({err})")
    return accel, cpu


def _unit_gain_params(model, image_size: int, seed: int = 0):
    """random_params on the host, each kernel scaled from N(0, 0.02²) to N(0, 1/fan_in)."""
    params = jax.device_get(random_params(model, image_size, seed, MAX_TOKENS))

    def rescale(path, leaf):
        leaf = np.asarray(leaf)
        if jax.tree_util.keystr(path).endswith("['kernel']") and leaf.ndim >= 2:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (leaf * (1.0 / (0.02 * np.sqrt(fan_in)))).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(rescale, params)


def _inputs(image_size: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    ids = rng.integers(1000, 2000, (batch, MAX_TOKENS)).astype(np.int32)
    ids[:, 0] = 101
    lengths = np.linspace(5, MAX_TOKENS, batch).astype(int)[:, None]
    att = (np.arange(MAX_TOKENS)[None] < lengths).astype(np.int32)
    return image, ids * att, att


def _logits(model, image_size, params, inputs, device, precision: str) -> np.ndarray:
    """Logits at input resolution, computed on `device` (inputs committed there)."""
    params, inputs = jax.device_put((params, inputs), device)

    def forward(p, image, ids, att):
        return mask_logits_at(model.apply({"params": p}, image, ids, att),
                              (image_size, image_size))

    with jax.default_matmul_precision(precision):
        out = jax.jit(forward)(params, *inputs)
        out.block_until_ready()
    assert out.devices() == {device}, (out.devices(), device)
    return np.asarray(jax.device_get(out), np.float32)


def _report(name: str, ref: np.ndarray, out: np.ndarray, device, **extra) -> dict:
    """Figures of `out` (accelerator) against `ref` (CPU, float32, highest precision)."""
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    mask_ref, mask_out = ref > 0, out > 0          # sigmoid(x) > 0.5 <=> x > 0
    union = np.logical_or(mask_ref, mask_out).sum()
    figures = dict(
        test=name, device_kind=getattr(device, "device_kind", device.platform),
        shape=list(ref.shape), finite=bool(np.isfinite(out).all()),
        max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()), max_abs_ref=scale,
        rel_diff=float(diff.max() / scale) if scale else float("inf"),
        mask_agreement=float((mask_ref == mask_out).mean()),
        mask_iou=float(np.logical_and(mask_ref, mask_out).sum() / union) if union else 1.0,
        fg_fraction_ref=float(mask_ref.mean()), **extra)
    print("GPU_PARITY " + json.dumps(figures), flush=True)
    return figures


def _model_and_inputs(cfg, size: int, batch: int):
    model = build_model(cfg)
    return model, _unit_gain_params(model, size), _inputs(size, batch)


@pytest.fixture(scope="module")
def tiny():
    """The CI-sized model at 64×64, batch 2, and its CPU logits at highest precision."""
    accel, cpu = _devices()
    cfg = presets.tiny_model_config(64)
    model, params, inputs = _model_and_inputs(cfg, 64, 2)
    ref = _logits(model, 64, params, inputs, cpu, "highest")
    return dict(cfg=cfg, model=model, params=params, inputs=inputs, ref=ref, accel=accel)


def test_tiny_highest_precision_matches_cpu(tiny):
    accel = tiny["accel"]
    out = _logits(tiny["model"], 64, tiny["params"], tiny["inputs"], accel, "highest")
    f = _report("tiny_f32_highest", tiny["ref"], out, accel, precision="highest",
                dtype="float32")
    assert f["finite"]
    assert f["rel_diff"] <= 1e-4, f
    assert f["mask_agreement"] >= 0.999, f


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_default_precision_masks_agree(tiny, dtype):
    """Default matmul precision (TF32 on recent GPUs) and bfloat16 compute against the CPU's
    float32 at highest precision: the masks, not the logits, must agree on ≥ 99 % of pixels.

    bfloat16 on these unit-gain weights moves masks on the CPU too (98.4 % agreement with
    float32 there), so its bound is the CPU's own bfloat16 agreement less one point, capped
    at 99 %."""
    accel, cpu = _devices()
    cfg = tiny["cfg"].copy_and_resolve_references()
    cfg.dtype = dtype
    model = build_model(cfg)
    out = _logits(model, 64, tiny["params"], tiny["inputs"], accel, "default")
    extra, bound = {}, 0.99
    if dtype != "float32":
        cpu_out = _logits(model, 64, tiny["params"], tiny["inputs"], cpu, "default")
        cpu_agreement = float(((cpu_out > 0) == (tiny["ref"] > 0)).mean())
        bound = min(0.99, cpu_agreement - 0.01)
        extra = dict(cpu_same_dtype_mask_agreement=cpu_agreement,
                     vs_cpu_same_dtype_mask_agreement=float(((cpu_out > 0) == (out > 0)).mean()),
                     vs_cpu_same_dtype_max_abs_diff=float(np.abs(cpu_out - out).max()))
    f = _report(f"tiny_{dtype}_default", tiny["ref"], out, accel, precision="default",
                dtype=dtype, mask_bound=bound, **extra)
    assert f["finite"]
    assert f["mask_agreement"] >= bound, f


def test_official_swin_b_bert_base_highest_precision_matches_cpu():
    """Swin-B + BERT-base at 480×480, batch 1 (the CPU side takes seconds)."""
    accel, cpu = _devices()
    model, params, inputs = _model_and_inputs(presets.official_model_config(480), 480, 1)
    out = _logits(model, 480, params, inputs, accel, "highest")
    ref = _logits(model, 480, params, inputs, cpu, "highest")
    f = _report("official_480_f32_highest", ref, out, accel, precision="highest",
                dtype="float32")
    assert f["finite"]
    assert f["rel_diff"] <= 1e-4, f
    assert f["mask_agreement"] >= 0.999, f
