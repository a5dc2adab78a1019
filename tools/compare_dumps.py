"""Compare magnet_jax with reference tensors saved as .npz, tensor by tensor.

    python -m tools.compare_dumps --checkpoint CONVERTED_DIR --reference ref.npz [--json out.json]

The reference file holds the inputs (`image` (B, H, W, 3) normalised, `ids`, `att`) and the
reference outputs: `logits_full` (B, H, W) pre-sigmoid logits at input resolution,
`pred_masks` (B, 1, h, w), optionally `aux_pred_masks` (B, 9, 1, h, w) and NHWC dumps
`dump_feat{1..4}`, `dump_mask_features`, `dump_ms{0..2}`. How such a file was produced from
the official code is described in docs/parity.md; this tool never runs that code.

Each sample runs alone (B = 1), in float32 with matmul precision "highest", like the official
evaluation. Printed per tensor: max |Δ|, max |Δ| / max |ref|; for the logits also the agreement
of the thresholded masks (sigmoid > 0.5).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from magnet_jax import checkpoint_io  # noqa: E402
from magnet_jax.models import MagNet, binary_mask, build_model, mask_logits_at  # noqa: E402


def _forward(model, size):
    def run(params, image, ids, att):
        variables = {"params": params}
        feats = model.apply(variables, image, ids, att, method=MagNet.encode)
        mask_features, memories = model.apply(
            variables, feats, method=lambda m, f: m.pixel_decoder(f))
        preds = model.apply(variables, memories, mask_features,
                            method=lambda m, ms, mf: m.predictor(ms, mf))
        final = dict(pred_masks=preds[-1]["pred_masks"])
        return dict(feats=feats, mask_features=mask_features, memories=memories,
                    pred_masks=final["pred_masks"],
                    aux_pred_masks=jnp.stack([p["pred_masks"] for p in preds[:-1]], 1),
                    logits_full=mask_logits_at(final, size))
    return jax.jit(run)


def _stats(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape} vs reference {ref.shape}")
    diff = np.abs(ours - ref).max()
    return dict(max_abs=float(diff), rel=float(diff / max(np.abs(ref).max(), 1e-30)))


def compare(checkpoint: str, reference: str) -> dict:
    cfg, params = checkpoint_io.load_params(checkpoint)
    ref = np.load(reference)
    size = tuple(ref["image"].shape[1:3])
    model = build_model(cfg)
    forward = _forward(model, size)
    report: dict = {"samples": []}
    for b in range(ref["image"].shape[0]):
        out = forward(params, jnp.asarray(ref["image"][b:b + 1]),
                      jnp.asarray(ref["ids"][b:b + 1], jnp.int32),
                      jnp.asarray(ref["att"][b:b + 1], jnp.int32))
        row = {"real_tokens": int(ref["att"][b].sum())}
        pairs = {"logits_full": (out["logits_full"][0], ref["logits_full"][b]),
                 "pred_masks": (out["pred_masks"][0], ref["pred_masks"][b])}
        if "aux_pred_masks" in ref.files:
            pairs["aux_pred_masks"] = (out["aux_pred_masks"][0], ref["aux_pred_masks"][b])
        for s in range(4):
            if f"dump_feat{s + 1}" in ref.files:
                pairs[f"feat{s + 1}"] = (out["feats"][s][0], ref[f"dump_feat{s + 1}"][b])
        if "dump_mask_features" in ref.files:
            pairs["mask_features"] = (out["mask_features"][0], ref["dump_mask_features"][b])
        for i in range(3):
            if f"dump_ms{i}" in ref.files:
                pairs[f"ms{i}"] = (out["memories"][i][0], ref[f"dump_ms{i}"][b])
        for name, (ours, theirs) in pairs.items():
            row[name] = _stats(ours, theirs)
        ours_mask = np.asarray(binary_mask(out["logits_full"][0]))
        ref_mask = np.asarray(binary_mask(jnp.asarray(ref["logits_full"][b])))
        row["mask_agreement"] = float((ours_mask == ref_mask).mean())
        row["foreground_fraction"] = float(ref_mask.mean())
        report["samples"].append(row)
        print(json.dumps({"sample": b, **{k: (v["max_abs"] if isinstance(v, dict) else v)
                                          for k, v in row.items()}}), flush=True)
    samples = report["samples"]
    report["max_abs_logit"] = max(s["logits_full"]["max_abs"] for s in samples)
    report["min_mask_agreement"] = min(s["mask_agreement"] for s in samples)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--json", help="write the full report here")
    args = p.parse_args(argv)
    try:
        report = compare(args.checkpoint, args.reference)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"max |Δlogit| = {report['max_abs_logit']:.3g}; "
          f"min mask agreement = {100 * report['min_mask_agreement']:.4f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
