"""Evaluation during training: every sentence of a split once, oIoU / mIoU / precision@t.

Protocol "magnet" (data_formats.md §5): the prediction at input resolution (bilinear,
align_corners=True), foreground where sigmoid > 0.5, against the ground truth resized with
nearest neighbour to the input size. I and U are computed per example on device; the host sums
them (metrics.MetricAccumulator), and with several processes the sums are reduced across hosts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from magnet_jax import sharding
from magnet_jax.data import pipeline
from magnet_jax.evaluation.metrics import MetricAccumulator, intersection_union
from magnet_jax.models.magnet import MagNet, mask_logits_at

EVAL_KEYS = ("image", "mask", "ids", "att", "weight")


def make_eval_step(model: MagNet, params_sharding: Any, mesh) -> Callable:
    """jit (params, batch) -> (I, U, logits) with per-example I/U and (B, H, W) logits."""
    def eval_step(params, batch):
        out = model.apply({"params": params}, batch["image"], batch["ids"], batch["att"],
                          train=False)
        logits = mask_logits_at(out, batch["mask"].shape[1:])
        inter, union = intersection_union(logits, batch["mask"])
        return inter, union, logits

    return jax.jit(eval_step, in_shardings=(params_sharding, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))


def evaluate_split(eval_step: Callable, params: Any, data_dir: str, split: str, *,
                   image_size: int, global_batch: int, mesh, convention: str = "official",
                   num_overlays: int = 0, overlay_dir: str | Path | None = None,
                   read_threads: int = 2) -> dict[str, float]:
    """Metrics of one split; the first `num_overlays` examples saved as PNG overlays."""
    ds = pipeline.eval_dataset(data_dir, split, image_size=image_size,
                               global_batch=global_batch, convention=convention)
    acc = MetricAccumulator()
    saved = 0
    for host_batch in pipeline.make_iterator(ds, read_threads=read_threads):
        batch = pipeline.to_global({k: host_batch[k] for k in EVAL_KEYS}, mesh)
        inter, union, logits = eval_step(params, batch)
        inter, union = np.asarray(inter), np.asarray(union)
        weight = np.asarray(batch["weight"])
        acc.update(inter, union, weight)
        if saved < num_overlays and overlay_dir is not None and jax.process_index() == 0:
            saved += _save_overlays(host_batch, np.asarray(logits), weight,
                                    num_overlays - saved, Path(overlay_dir), split)
    return acc.all_processes().result()


def _save_overlays(host_batch, logits, weight, limit: int, out_dir: Path, split: str) -> int:
    """Overlay PNGs (prediction and ground truth) of this host's first examples."""
    from magnet_jax.visualize import overlay_prediction

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _caption_tokenizer()
    n = 0
    # Process 0's rows are the first rows of the global batch (make_array_from_process_local_data).
    for i in range(min(len(host_batch["image"]), len(logits))):
        if n >= limit or weight[i] == 0:
            continue
        path = out_dir / f"{split}_{int(host_batch['ref_id'][i])}_{int(host_batch['sent_id'][i])}.png"
        caption = _sentence(tokenizer, host_batch["ids"][i], host_batch["att"][i])
        overlay_prediction(host_batch["image"][i], logits[i] > 0, host_batch["mask"][i], path,
                           caption=caption)
        n += 1
    return n


def _caption_tokenizer():
    from magnet_jax.data.tokenizer import load_tokenizer
    try:
        return load_tokenizer(None)
    except Exception:  # noqa: BLE001: a caption is optional
        return None


def _sentence(tokenizer, ids, att) -> str:
    """The stored token ids back to text (WordPieces joined), for captions."""
    if tokenizer is None:
        return ""
    tokens = tokenizer.convert_ids_to_tokens([int(t) for t, a in zip(ids, att) if a])
    words: list[str] = []
    for t in tokens:
        if t in ("[CLS]", "[SEP]", "[PAD]"):
            continue
        if t.startswith("##") and words:
            words[-1] += t[2:]
        else:
            words.append(t)
    return " ".join(words)
