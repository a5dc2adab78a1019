"""Evaluate a model on one split: every sentence once, oIoU / mIoU / precision@t.

Used by the training loop (periodic evaluation) and by `python -m magnet_jax.evaluate`.
The jitted step returns, per example, I and U of protocol "magnet" (protocols.py) and the
stride-4 mask logits; protocol "original" counts I and U on the host at each image's original
size. Each process sums its own rows; the sums are then reduced across processes
(metrics.MetricAccumulator), so several hosts give the numbers of one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from magnet_jax import sharding
from magnet_jax.data import pipeline, records
from magnet_jax.evaluation import protocols
from magnet_jax.evaluation.gres_metrics import GresAccumulator, no_target_from_area
from magnet_jax.evaluation.metrics import MetricAccumulator, intersection_union
from magnet_jax.methods.base import Method

EVAL_KEYS = ("image", "mask", "ids", "att", "weight")
ROW_FIELDS = ("index", "ref_id", "sent_id", "intersection", "union")


def make_eval_step(method: Method, model: nn.Module, params_sharding: Any, mesh,
                   extra_keys: tuple[str, ...] = (),
                   params_view: Callable[[Any], Any] | None = None) -> Callable:
    """jit (params, batch) -> (I, U, coarse logits): per-example I and U at the input size and
    the (B, h, w) stride-4 mask logits (the method's inference function), all sharded like the
    batch. `extra_keys`: the method's extra model inputs the batch carries
    (Method.extra_input_specs). `params_view`: maps the given parameters to the model's
    per-layer tree inside the step (the training loop passes its stacked train-state
    parameters and the layout's `unstack`, training/layout.py)."""
    def eval_step(params, batch):
        if params_view is not None:
            params = params_view(params)
        extra = {k: batch[k] for k in extra_keys}
        logits, coarse = method.infer(model, params, batch["image"], batch["ids"], batch["att"],
                                      batch["mask"].shape[1:], **extra)
        inter, union = intersection_union(logits, batch["mask"])
        return inter, union, coarse

    rows = sharding.batch_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(params_sharding, rows), out_shardings=rows)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order of its host batch
    (the inverse of `jax.make_array_from_process_local_data`)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


@dataclasses.dataclass
class SplitResult:
    metrics: dict[str, float]
    # ROW_FIELDS over every process in dataset order (collect_rows=True); index = position of
    # the (ref, sentence) pair in the split's evaluation order.
    rows: dict[str, np.ndarray] | None


def has_no_target_field(data_dir: str, split: str) -> bool:
    """Whether the split is a generalised-RIS one (gRefCOCO, the synthetic gres_* splits): its
    records carry `no_target`, so sentences may refer to nothing or to several objects."""
    source = records.RecordSource(data_dir, split)
    return len(source) > 0 and "no_target" in source[0]


class RecordsByRef:
    """The records of a split looked up by ref_id (meta.json lists them in record order)."""

    def __init__(self, data_dir: str, split: str):
        self.source = records.RecordSource(data_dir, split)
        self.index = {int(r): i for i, r in enumerate(self.source.meta["ref_ids"])}

    def __call__(self, ref_id: int) -> dict:
        return self.source[self.index[int(ref_id)]]


def evaluate_split(eval_step: Callable, params: Any, data_dir: str, split: str, *,
                   image_size: int, global_batch: int, mesh, convention: str = "official",
                   protocol: str = "magnet", num_overlays: int = 0,
                   overlay_dir: str | Path | None = None, read_threads: int = 2,
                   collect_rows: bool = False, progress: bool = False,
                   tokenizer: Any = None, data_kwargs: dict | None = None,
                   extra_keys: tuple[str, ...] = ()) -> SplitResult:
    """Metrics of one split; the first `num_overlays` examples saved as PNG overlays.

    A generalised-RIS split (`has_no_target_field`) adds the GRES metrics (gres_metrics.py)
    under "gres/": an empty predicted mask is the answer "no target" (a model with a
    no-target head empties its mask when the head says so, methods.base).

    tokenizer: the method's own text tokenizer (Method.text_tokenizer); None = stored BERT ids.
    data_kwargs / extra_keys: the method's dataset options and the extra model inputs they add
    to each batch (Method.data_kwargs, Method.extra_input_specs).
    """
    protocols.check_protocol(protocol)
    ds = pipeline.eval_dataset(data_dir, split, image_size=image_size,
                               global_batch=global_batch, convention=convention,
                               tokenizer=tokenizer, **(data_kwargs or {}))
    keys = EVAL_KEYS + tuple(extra_keys)
    by_ref = RecordsByRef(data_dir, split) if protocol == "original" else None
    acc = MetricAccumulator()
    gres = GresAccumulator() if has_no_target_field(data_dir, split) else None
    kept: list[np.ndarray] = []
    saved = 0
    pi, pc = jax.process_index(), jax.process_count()
    per_process = global_batch // pc
    batches = pipeline.make_iterator(ds, read_threads=read_threads)
    if progress and jax.process_index() == 0:
        from tqdm import tqdm
        batches = tqdm(batches, total=len(ds), desc=f"{split} ({protocol})", unit="batch",
                       dynamic_ncols=True)
    for j, host_batch in enumerate(batches):
        batch = pipeline.to_global({k: host_batch[k] for k in keys}, mesh)
        inter, union, coarse = (local_rows(a) for a in eval_step(params, batch))
        weight = host_batch["weight"]
        gt_area = host_batch["mask"].reshape(len(weight), -1).sum(axis=1, dtype=np.int64)
        if by_ref is not None:
            inter, union, gt_area = _original_iu(coarse, host_batch["ref_id"], weight, by_ref,
                                                 convention)
        acc.update(inter, union, weight)
        if gres is not None:
            pred_area = np.asarray(union, np.int64) - gt_area + np.asarray(inter, np.int64)
            gres.update(inter, union, no_target_from_area(pred_area),
                        host_batch["no_target"], weight)
        if collect_rows:
            # eval_dataset gives process pi the items pi, pi + pc, pi + 2 pc, ...
            index = pi + pc * (j * per_process + np.arange(len(weight)))
            kept.append(np.stack([index, host_batch["ref_id"], host_batch["sent_id"], inter,
                                  union, weight != 0], axis=1).astype(np.int32))
        if saved < num_overlays and overlay_dir is not None and jax.process_index() == 0:
            saved += _save_overlays(host_batch, coarse, weight, num_overlays - saved,
                                    Path(overlay_dir), split, tokenizer)
    rows = _gather_rows(kept) if collect_rows else None
    metrics = acc.all_processes().result()
    if gres is not None:
        metrics.update({f"gres/{k}": v for k, v in gres.all_processes().result().items()})
    return SplitResult(metrics, rows)


def _original_iu(coarse, ref_ids, weight, by_ref: RecordsByRef,
                 convention: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """I, U and the GT's area against each record's mask at its native resolution (protocol
    original)."""
    inter = np.zeros(len(coarse), np.int64)
    union = np.zeros(len(coarse), np.int64)
    gt_area = np.zeros(len(coarse), np.int64)
    for i in np.flatnonzero(weight != 0):
        gt = records.mask_from_count_png(by_ref(ref_ids[i])["mask_count_png"], convention)
        inter[i], union[i] = protocols.intersection_union_np(
            protocols.resize_logits(coarse[i], gt.shape), gt)
        gt_area[i] = int(np.count_nonzero(gt))
    return inter, union, gt_area


def _gather_rows(kept: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's rows in dataset order, padding dropped, on every process."""
    table = np.concatenate(kept) if kept else np.zeros((0, len(ROW_FIELDS) + 1), np.int32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        table = np.asarray(multihost_utils.process_allgather(table, tiled=True))
    table = table[table[:, -1] != 0]
    table = table[np.argsort(table[:, 0], kind="stable")]
    return {name: table[:, k] for k, name in enumerate(ROW_FIELDS)}


def _save_overlays(host_batch, coarse, weight, limit: int, out_dir: Path, split: str,
                   text_tokenizer: Any = None) -> int:
    """Overlay PNGs (prediction and ground truth, at the input size) of this host's examples."""
    from magnet_jax.visualize import overlay_prediction

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = text_tokenizer if text_tokenizer is not None else _caption_tokenizer()
    size = host_batch["mask"].shape[1:]
    n = 0
    for i in range(len(coarse)):
        if n >= limit or weight[i] == 0:
            continue
        path = out_dir / f"{split}_{int(host_batch['ref_id'][i])}_{int(host_batch['sent_id'][i])}.png"
        caption = _sentence(tokenizer, host_batch["ids"][i], host_batch["att"][i])
        pred = protocols.resize_logits(coarse[i], size) > 0
        overlay_prediction(host_batch["image"][i], pred, host_batch["mask"][i], path,
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
    """The batch's token ids back to text, for captions ("" without a tokenizer)."""
    return "" if tokenizer is None else tokenizer.decode(ids, att)
