"""Per-image instance masks, the third input modality of MaIL (`training_objectives.md` §7.1).

A record can carry instance masks from two sources (`docs/data.md`):

- `"gt"`: the converter's `--with-instances` fields (`instance_count_pngs`, `instance_iscrowd`,
  ...), every annotation of the image. Ground-truth instances have no score, so when an image
  has more than K of them the K largest by area (foreground pixels at native size) are kept,
  largest first, ties in stored order. Crowd regions and empty masks are skipped. Note that the
  ground-truth instances include the referent itself: an oracle, for ablations only.
- `"detector"`: the `det_*` fields written by `python -m magnet_jax.data.add_detections` from an
  offline detector's COCO-format results, already the top entries by score (the first K valid
  ones are kept, highest score first). The detector must not have seen the evaluation images
  (RefCOCO val/test are COCO train2014 images; see the leak warning of §7.1).

`instance_masks` returns exactly K masks (uint8 0/1, the record's native size) and a validity
bit per slot; missing slots are empty masks with valid 0.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from magnet_jax.data import records

INSTANCE_SOURCES = ("gt", "detector")
GT_FIELDS = ("instance_count_pngs", "instance_iscrowd")
DETECTOR_FIELDS = ("det_mask_pngs", "det_scores", "det_category_ids", "det_valid")
CONVERT_HINT = "python -m magnet_jax.data.convert ... --with-instances"
DETECTIONS_TOOL = "python -m magnet_jax.data.add_detections"


class MissingInstancesError(ValueError):
    """A split or record without the instance masks an InstanceSpec asks for."""


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """K instance masks per example (`num`), from ground truth ("gt") or a detector."""

    num: int
    source: str = "gt"

    def __post_init__(self):
        if isinstance(self.num, bool) or not isinstance(self.num, (int, np.integer)) \
                or self.num < 1:
            raise ValueError(f"InstanceSpec.num must be an int >= 1, got {self.num!r}")
        if self.source not in INSTANCE_SOURCES:
            raise ValueError(f"unknown instance source {self.source!r} "
                             f"(expected one of {', '.join(INSTANCE_SOURCES)})")


def _ids(record: Mapping[str, Any]) -> str:
    return f"ref_id={record.get('ref_id', '?')} image_id={record.get('image_id', '?')}"


def _missing(record: Mapping[str, Any], fields: tuple[str, ...]) -> list[str]:
    return [f for f in fields if f not in record]


def _decode(record: Mapping[str, Any], png: bytes, field: str, index: int) -> np.ndarray:
    count = records.count_from_png(png)
    h, w = int(record["height"]), int(record["width"])
    if count.shape != (h, w):
        raise records.RecordError(
            f"record {_ids(record)}: {field}[{index}] is {count.shape[0]}x{count.shape[1]} "
            f"(HxW), the record's image is {h}x{w}")
    return count


def _gt(record: Mapping[str, Any], k: int, convention: str) -> tuple[list[np.ndarray], list[int]]:
    missing = _missing(record, GT_FIELDS)
    if missing:
        raise MissingInstancesError(
            f"record {_ids(record)} has no ground-truth instance masks (missing "
            f"{', '.join(missing)}): convert with --with-instances ({CONVERT_HINT})")
    pngs, crowd = record["instance_count_pngs"], np.asarray(record["instance_iscrowd"])
    if len(crowd) != len(pngs):
        raise records.RecordError(f"record {_ids(record)}: {len(pngs)} instance_count_pngs but "
                                  f"{len(crowd)} instance_iscrowd entries")
    masks, areas = [], []
    for i, png in enumerate(pngs):
        if crowd[i]:
            continue
        m = records.mask_from_count(_decode(record, png, "instance_count_pngs", i), convention)
        area = int(m.sum())
        if area:
            masks.append(m)
            areas.append(area)
    order = sorted(range(len(masks)), key=lambda i: -areas[i])[:k]  # stable: ties in stored order
    return [masks[i] for i in order], [1] * len(order)


def _detector(record: Mapping[str, Any], k: int) -> tuple[list[np.ndarray], list[int]]:
    missing = _missing(record, DETECTOR_FIELDS)
    if missing:
        raise MissingInstancesError(
            f"record {_ids(record)} has no detector instance masks (missing "
            f"{', '.join(missing)}): add them with {DETECTIONS_TOOL}")
    pngs = record["det_mask_pngs"]
    valid = np.asarray(record["det_valid"])
    scores = np.asarray(record["det_scores"], np.float32)
    if not len(valid) == len(scores) == len(pngs):
        raise records.RecordError(f"record {_ids(record)}: det_mask_pngs, det_scores and "
                                  f"det_valid differ in length ({len(pngs)}, {len(scores)}, "
                                  f"{len(valid)})")
    live = [i for i in range(len(pngs)) if valid[i]]
    live = sorted(live, key=lambda i: -float(scores[i]))[:k]  # stored sorted already; stable
    masks = [(_decode(record, pngs[i], "det_mask_pngs", i) > 0).astype(np.uint8) for i in live]
    return masks, [1] * len(masks)


def instance_masks(record: Mapping[str, Any], spec: InstanceSpec,
                   convention: str = "union") -> tuple[np.ndarray, np.ndarray]:
    """(masks uint8 (K, H, W) 0/1 at native size, valid int32 (K,)), padded with zeros / 0.

    `convention` reads the ground-truth count PNGs: "union" (default, count > 0 is foreground)
    or "official" (count == 1). Detector masks are 0/1 already.
    """
    h, w = int(record["height"]), int(record["width"])
    if spec.source == "gt":
        masks, valid = _gt(record, spec.num, convention)
    else:
        masks, valid = _detector(record, spec.num)
    out = np.zeros((spec.num, h, w), np.uint8)
    for i, m in enumerate(masks):
        out[i] = m
    v = np.zeros((spec.num,), np.int32)
    v[:len(valid)] = valid
    return out, v


def check_split_has_instances(out_dir: str | os.PathLike, split: str,
                              spec: InstanceSpec) -> dict[str, Any]:
    """The split's meta.json; MissingInstancesError (one line) when it lacks `spec`'s masks."""
    meta = records.read_meta(out_dir, split)
    if spec.source == "gt" and meta.get("with_instances") is not True:
        raise MissingInstancesError(
            f"records in {out_dir} (split {split}) have no instance masks: convert with "
            f"--with-instances ({CONVERT_HINT}) or, for detector masks, run {DETECTIONS_TOOL} "
            "and use source 'detector'")
    if spec.source == "detector" and not isinstance(meta.get("detections"), dict):
        raise MissingInstancesError(
            f"records in {out_dir} (split {split}) have no detector instance masks: run "
            f"{DETECTIONS_TOOL} --data {out_dir} --split {split} --results DETS.json "
            "--detector NAME --out OUT_DIR")
    return meta
