"""gRefCOCO (GRES, generalised RIS) annotations + COCO images -> magnet_jax ArrayRecord shards.

    python -m magnet_jax.data.grefcoco --grefs DIR/grefcoco/'grefs(unc).json' \
        --instances DIR/grefcoco/instances.json --image-root DIR/images/train2014 \
        --out records/grefcoco_unc [--splits train val] [--workers N]

The source format, as ReLA (henghuiding/ReLA, `gres_model/data/datasets/grefer.py`,
`grefcoco.py`, `dataset_mappers/refcoco_mapper.py`) reads it:
- `grefs(unc).json`: a JSON list of refs. A ref has `ref_id`, `image_id`, `split` (train, val,
  testA, testB), `sentences` (dicts with `raw`, `sent`, `sent_id`, `tokens`), `ann_id` (an int
  or a list of COCO annotation ids; `[-1]` = no target), `category_id` (int or list) and a
  per-ref `file_name`. Some copies also carry a boolean `no_target`; when present it must agree
  with `ann_id`. ReLA also reads a pickled `grefs(unc).p`; a `--grefs` ending in `.p` is read so.
- `instances.json`: COCO `images`, `annotations`, `categories`, as in REFER.

One record per ref (all its sentences), as for REFER, with the extra fields of
`records.OPTIONAL_FIELDS` (`no_target`, `target_*`). Ground truth, as ReLA builds it: the union
of every polygon (or RLE) of every non-crowd target; crowd targets are left out of the mask and
listed; a no-target ref has an all-zero mask and `no_target` 1. The mask is stored as a 0/1
count PNG, so the `official` (count == 1) and `union` (count >= 1) conventions read the same
mask: the LAVT "polygon sum == 1" quirk would punch holes where targets overlap, which no GRES
code does. `overlap_pixels` is therefore 0; the pixels covered twice or more before the union
are counted in meta.json (`counts.merged_overlap_pixels`). Scalar REFER fields keep a meaning:
`ann_id` / `category_id` are the first target's (-1 for no target), `bbox` encloses the masked
targets' boxes, `area` sums their COCO areas, `iscrowd` is 1 if any target is a crowd region.

Why a module of its own and not `convert.py --dataset grefcoco`: the input is two explicit
files (JSON, not a pickle under a REFER root), refs have several or no targets, the splits and
published counts of REFER (`refer.py`) do not apply, and meta.json counts other things. The file
work, resume, atomic shards, sentence cleaning and tokenisation are `convert.py`'s
(`_SplitConverter` subclassed, `run_splits`), so both converters write alike.

Errors: a structure that is not gRefCOCO's (not a list of ref dicts, a missing key, an ann_id
that is not an int or list of ints, a ref with no annotation that is not flagged no-target, -1
mixed with annotation ids, a `no_target` flag that contradicts `ann_id`, an unknown split, a
duplicate ref_id) is fatal before anything is written: one line per file naming the problem and
up to 10 ref ids plus a count. Bad data of one ref (absent annotation or image, annotation on
another image, only crowd targets, missing or corrupt image, unusable segmentation, empty
sentences) is skipped and listed in meta.json as by `convert.py`, or fatal with --strict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magnet_jax.data import records
from magnet_jax.data.convert import (
    EVAL_SIZE,
    ConvertError,
    _SplitConverter,
    check_output_dir,
    instance_count_pngs,
    read_checked_image,
    records_sha,
    run_splits,
)
from magnet_jax.data.refer import ReferError, index_coco_instances, load_refs_pickle

CONVERTER_VERSION = "grefcoco-1"
DATASET = "grefcoco"
SPLIT_BY = "unc"
SPLITS = ("train", "val", "testA", "testB")  # ReLA register_refcoco.py: register_grefcoco
NO_TARGET_ANN_ID = -1
MAX_LISTED_IDS = 10
REQUIRED_REF_KEYS = ("ref_id", "image_id", "ann_id", "split", "sentences")
REQUIRED_SENTENCE_KEYS = ("raw", "sent", "sent_id")


class GRefError(ValueError):
    """gRefCOCO files whose structure is not the expected one; the message is one line."""


def _listed(ids: list[Any]) -> str:
    shown = ", ".join(str(i) for i in ids[:MAX_LISTED_IDS])
    more = len(ids) - MAX_LISTED_IDS
    return f"ref_id={shown}" + (f" (and {more} more)" if more > 0 else "")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _as_id_list(value: Any) -> list[int] | None:
    """ann_id as a list of ints (ReLA accepts a bare int); None if it is neither."""
    if _is_int(value):
        return [int(value)]
    if isinstance(value, list) and all(_is_int(v) for v in value):
        return [int(v) for v in value]
    return None


def _sentences_ok(sentences: Any) -> bool:
    return isinstance(sentences, list) and all(
        isinstance(s, dict)
        and all(k in s for k in REQUIRED_SENTENCE_KEYS)
        and _is_int(s["sent_id"])
        for s in sentences
    )


def normalise_refs(refs: Any, source: str | os.PathLike) -> list[dict[str, Any]]:
    """Check the structure of a grefs list; return refs with `target_ann_ids` (list of ints,
    empty for no target) and `no_target` (bool) added. Raises GRefError naming the ref ids."""
    if not isinstance(refs, list):
        raise GRefError(f"{source}: expected a JSON list of refs, got a {type(refs).__name__}")
    not_dicts = [i for i, r in enumerate(refs) if not isinstance(r, dict)]
    if not_dicts:
        raise GRefError(
            f"{source}: entries {', '.join(f'#{i}' for i in not_dicts[:MAX_LISTED_IDS])}"
            f" are not ref objects ({len(not_dicts)} in all)"
        )
    problems: dict[str, list[Any]] = {}

    def bad(problem: str, ref_id: Any) -> None:
        problems.setdefault(problem, []).append(ref_id)

    out, seen = [], set()
    for i, ref in enumerate(refs):
        rid = ref.get("ref_id", f"#{i}")
        missing = [k for k in REQUIRED_REF_KEYS if k not in ref]
        if missing:
            bad(f"refs lacking {', '.join(repr(k) for k in missing)}", rid)
            continue
        if not all(_is_int(ref[k]) for k in ("ref_id", "image_id")):
            bad("ref_id or image_id not an int", rid)
            continue
        if rid in seen:
            bad("duplicate ref_id", rid)
        seen.add(rid)
        if ref["split"] not in SPLITS:
            bad(f"split not one of {', '.join(SPLITS)}", rid)
        if not _sentences_ok(ref["sentences"]):
            bad(f"sentences not a list of dicts with {', '.join(REQUIRED_SENTENCE_KEYS)} "
                "(int sent_id)", rid)
        ann_ids = _as_id_list(ref["ann_id"])
        flag = ref.get("no_target")
        if flag is not None and not isinstance(flag, bool):
            bad("no_target not a boolean", rid)
            continue
        if ann_ids is None:
            bad("ann_id neither an int nor a list of ints", rid)
            continue
        if NO_TARGET_ANN_ID in ann_ids and len(ann_ids) > 1:
            bad("ann_id mixes -1 (no target) with annotation ids", rid)
            continue
        no_target = ann_ids == [NO_TARGET_ANN_ID] or (flag is True and not ann_ids)
        if not ann_ids and not no_target:
            bad("no annotation and not flagged no-target (ann_id [-1] or no_target true)", rid)
            continue
        if flag is not None and flag != no_target:
            bad(f"no_target {str(flag).lower()} contradicts ann_id {ann_ids}", rid)
            continue
        out.append({**ref, "target_ann_ids": [] if no_target else ann_ids, "no_target": no_target})
    if problems:
        raise GRefError(
            f"{source}: not gRefCOCO refs: "
            + "; ".join(f"{p}: {_listed(ids)}" for p, ids in problems.items())
        )
    return out


class GRefCocoAnnotations:
    """grefs + instances.json, with the lookup tables `convert._SplitConverter` uses.

    Attributes: refs (file order, normalised by `normalise_refs`), anns / images / categories
    (id -> dict), anns_by_image, splits (those present, in SPLITS order), refs_path,
    instances_path, dataset, split_by.
    """

    dataset, split_by = DATASET, SPLIT_BY

    def __init__(self, grefs_path: str | os.PathLike, instances_path: str | os.PathLike):
        self.refs_path, self.instances_path = Path(grefs_path), Path(instances_path)
        for what, path in (("grefs", self.refs_path), ("instances", self.instances_path)):
            if not path.is_file():
                raise GRefError(f"{what} file not found: {path}")
        if self.refs_path.suffix == ".p":
            try:
                raw_refs = load_refs_pickle(self.refs_path)
            except ReferError as e:
                raise GRefError(str(e)) from None
        else:
            raw_refs = self._read_json(self.refs_path)
        self.refs = normalise_refs(raw_refs, self.refs_path)
        inst = self._read_json(self.instances_path)
        (self.images, self.anns, self.categories,
         self.anns_by_image) = index_coco_instances(inst, self.instances_path, GRefError)
        present = {r["split"] for r in self.refs}
        self.splits = tuple(s for s in SPLITS if s in present)

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GRefError(f"cannot read {path}: {e}") from None

    def refs_of_split(self, split: str) -> list[dict[str, Any]]:
        """Refs whose split is exactly `split`, in file order."""
        if split not in self.splits:
            raise GRefError(
                f"split {split!r} has no refs in {self.refs_path.name} "
                f"(present: {', '.join(self.splits) or 'none'})"
            )
        return [r for r in self.refs if r["split"] == split]

    def split_counts(self, split: str) -> dict[str, int]:
        """Refs, images, sentences and refs by kind of a split, as the source file has them."""
        refs = self.refs_of_split(split)
        return {
            "refs": len(refs),
            "images": len({int(r["image_id"]) for r in refs}),
            "sentences": sum(len(r["sentences"]) for r in refs),
            **_kind_counts(refs),
        }


def _kind_counts(refs: list[dict[str, Any]]) -> dict[str, int]:
    """no_target / single_target / multi_target refs (by the ref's ann_id list)."""
    kinds = [_kind(r) for r in refs]
    return {f"{k}_refs": kinds.count(k) for k in ("single_target", "multi_target", "no_target")}


def _kind(ref: dict[str, Any]) -> str:
    if ref["no_target"]:
        return "no_target"
    return "single_target" if len(ref["target_ann_ids"]) == 1 else "multi_target"


# ------------------------------------------------------------------------------------------
# Per-ref work that touches files (worker processes with --workers > 1).
# ------------------------------------------------------------------------------------------


def _process_gref(task: dict[str, Any]) -> dict[str, Any]:
    """Image bytes and the union mask of the masked targets; {'bad': (kind, msg)} on a problem."""
    from PIL import Image

    from magnet_jax.data.masks import MaskError, count_map

    h, w = task["height"], task["width"]
    image_bytes, bad = read_checked_image(Path(task["image_path"]), h, w)
    if bad is not None:
        return {"bad": bad}
    covered = np.zeros((h, w), np.int32)  # polygons (or RLE masks) over each pixel
    num_polygons, kinds, degenerate = 0, [], []
    for ann_id, seg in task["segmentations"]:
        try:
            cm = count_map(seg, h, w)
        except MaskError as e:
            return {"bad": ("bad_segmentation", f"annotation {ann_id}: {e}")}
        covered += cm.count
        num_polygons += cm.num_polygons
        kinds.append((ann_id, cm.kind))
        if cm.degenerate_polygons:
            degenerate.append({"ann_id": ann_id, "polygons": list(cm.degenerate_polygons)})
    union = (covered > 0).astype(np.uint8)
    small = np.asarray(Image.fromarray(union).resize((EVAL_SIZE, EVAL_SIZE), Image.NEAREST))
    out: dict[str, Any] = {
        "image_jpeg": image_bytes,
        "mask_count_png": records.count_png(union),
        "num_polygons": num_polygons,
        "merged_overlap_pixels": int(np.count_nonzero(covered >= 2)),
        "kinds": kinds,
        "degenerate": degenerate,
        "empty_480": bool(union.any()) and not small.any(),
    }
    if task.get("instances") is not None:
        out["instance_count_pngs"], out["bad_instances"] = instance_count_pngs(
            task["instances"], h, w
        )
    return out


# ------------------------------------------------------------------------------------------
# One split.
# ------------------------------------------------------------------------------------------


def _enclosing_box(boxes: list[list[float]]) -> np.ndarray:
    """[x, y, w, h] around COCO boxes; zeros when there are none."""
    if not boxes:
        return np.zeros(4, np.float32)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0, y0 = b[:, 0].min(), b[:, 1].min()
    x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
    return np.asarray([x0, y0, x1 - x0, y1 - y0], np.float32)


class _GRefSplitConverter(_SplitConverter):
    worker = staticmethod(_process_gref)

    @staticmethod
    def _ids(ref: dict[str, Any]) -> dict[str, Any]:
        ann = ref["target_ann_ids"] or [NO_TARGET_ANN_ID]
        return {"ref_id": int(ref["ref_id"]), "ann_id": ann, "image_id": int(ref["image_id"])}

    def _prepare(self, split: str) -> tuple[list, list[dict[str, Any]]]:
        """Checks that need no file reads; returns (prepared refs, worker tasks) in file order."""
        refer, args = self.refer, self.args
        self.skipped: list[dict[str, Any]] = []
        self.skipped_sentences: list[dict[str, Any]] = []
        prepared, tasks = [], []
        name = refer.instances_path.name
        for ref in refer.refs_of_split(split):
            ids = self._ids(ref)
            img = refer.images.get(ids["image_id"])
            if img is None:
                self._bad("absent_image", f"image_id not in {name}", ids)
                continue
            absent = [a for a in ref["target_ann_ids"] if a not in refer.anns]
            if absent:
                self._bad("absent_ann", f"annotations {absent} not in {name}", ids)
                continue
            anns = [refer.anns[a] for a in ref["target_ann_ids"]]
            elsewhere = [int(a["id"]) for a in anns if int(a["image_id"]) != ids["image_id"]]
            if elsewhere:
                self._bad("ann_image_mismatch", f"annotations {elsewhere} are on other images", ids)
                continue
            masked = [a for a in anns if not a.get("iscrowd", 0)]
            if anns and not masked:
                # ReLA leaves crowd targets out of the mask; with nothing left its loader fails.
                self._bad("crowd_only", "every target is a crowd region (no mask left)", ids)
                continue
            sents = self._clean_sentences(ref["sentences"], ids)
            if not sents:
                self._bad("no_sentences", "no non-empty sentence", ids)
                continue
            instances = None
            if args.with_instances:
                instances = [
                    (int(a["id"]), a["segmentation"])
                    for a in refer.anns_by_image.get(ids["image_id"], [])
                ]
            prepared.append((ref, anns, masked, img, sents))
            tasks.append(
                {
                    "image_path": str(Path(args.image_root) / img["file_name"]),
                    "height": int(img["height"]),
                    "width": int(img["width"]),
                    "segmentations": [(int(a["id"]), a["segmentation"]) for a in masked],
                    "instances": instances,
                }
            )
        self._reset_stats()
        return prepared, tasks

    def _reset_stats(self) -> None:
        super()._reset_stats()
        self.stats.update(
            merged_overlap_pixels=0,
            rle_targets=[],
            crowd_targets=[],
            empty_480=[],
            written_kinds=[],
            sentences_by_kind={"single_target": 0, "multi_target": 0, "no_target": 0},
        )

    def _records(self, prepared, results, bar, split) -> Iterator[dict[str, Any]]:
        refer, args, st = self.refer, self.args, self.stats
        for (ref, anns, masked, img, sents), parts in zip(prepared, results):
            if bar is not None:
                bar.update(1)
            ids = self._ids(ref)
            if "bad" in parts:
                self._bad(parts["bad"][0], parts["bad"][1], ids)
                continue
            if parts["degenerate"]:
                # Kept (they add no pixel; ReLA drops them too) but reported; fatal if --strict.
                msg = f"polygons of fewer than 3 points (ignored): {parts['degenerate']}"
                if args.strict:
                    raise ConvertError(f"degenerate_polygon: ref_id={ids['ref_id']}: {msg}")
                print(f"warning: ref_id={ids['ref_id']}: {msg}", file=sys.stderr)
                st["degenerate_polygon_refs"].append({**ids, "targets": parts["degenerate"]})
            first = anns[0] if anns else None
            cat_id = int(first["category_id"]) if first else NO_TARGET_ANN_ID
            n = len(anns)
            rec: dict[str, Any] = {
                "schema_version": records.SCHEMA_VERSION,
                "dataset": refer.dataset,
                "split_by": refer.split_by,
                "split": split,
                "ref_id": ids["ref_id"],
                "ann_id": int(first["id"]) if first else NO_TARGET_ANN_ID,
                "image_id": ids["image_id"],
                "category_id": cat_id,
                "category_name": str(refer.categories.get(cat_id, {}).get("name", "")),
                "image_file": str(img["file_name"]),
                "image_jpeg": parts["image_jpeg"],
                "height": int(img["height"]),
                "width": int(img["width"]),
                "bbox": _enclosing_box([a["bbox"] for a in masked]),
                "area": float(sum(float(a.get("area", 0.0)) for a in masked)),
                "iscrowd": int(len(masked) < n),
                "mask_count_png": parts["mask_count_png"],
                "num_polygons": parts["num_polygons"],
                "overlap_pixels": 0,  # stored mask is 0/1: both conventions read the same
                **self._text_fields(sents),
                "no_target": int(ref["no_target"]),
                "target_ann_ids": np.asarray([a["id"] for a in anns], np.int64),
                "target_category_ids": np.asarray([a["category_id"] for a in anns], np.int32),
                "target_iscrowd": np.asarray([a.get("iscrowd", 0) for a in anns], np.int8),
                "target_bboxes": np.asarray(
                    [a["bbox"] for a in anns], np.float32
                ).reshape(n, 4),
            }
            if args.with_instances:
                rec.update(self._instance_fields(ids["image_id"], parts, ids))
            kind = _kind(ref)
            st["written_kinds"].append(kind)
            st["sentences_by_kind"][kind] += len(sents)
            st["multi_polygon_refs"] += int(parts["num_polygons"] > 1)
            st["merged_overlap_pixels"] += parts["merged_overlap_pixels"]
            st["rle_targets"] += [
                {**ids, "target": a, "kind": k} for a, k in parts["kinds"] if k != "polygons"
            ]
            st["crowd_targets"] += [
                {**ids, "target": int(a["id"])} for a in anns if a.get("iscrowd", 0)
            ]
            if parts["empty_480"]:
                st["empty_480"].append(ids["ref_id"])
            self.image_ids.add(ids["image_id"])
            self.sentences += len(sents)
            self.refs_written += 1
            yield rec

    def _meta(self, split: str, refs: list[dict[str, Any]]) -> dict[str, Any]:
        st, kinds = self.stats, self.stats["written_kinds"]
        return {
            "converter_version": CONVERTER_VERSION,
            "dataset": DATASET,
            "split_by": SPLIT_BY,
            "mask_convention": self.args.mask_convention,
            "mask_storage": "0/1 PNG: union of the non-crowd targets' masks (all zero for no "
            "target); official and union conventions agree",
            "with_instances": bool(self.args.with_instances),
            "sources": self.sources,
            "tokenizer": self._tokenizer_meta(),
            "max_tokens": records.MAX_TOKENS,
            "split_rule": "exact match of ref['split']",
            "no_target_rule": "ann_id == [-1] (or an empty ann_id with no_target true)",
            "source_counts": self.refer.split_counts(split),
            "counts": {
                "refs": self.refs_written,
                "images": len(self.image_ids),
                "sentences": self.sentences,
                "single_target_refs": kinds.count("single_target"),
                "multi_target_refs": kinds.count("multi_target"),
                "no_target_refs": kinds.count("no_target"),
                "single_target_sentences": st["sentences_by_kind"]["single_target"],
                "multi_target_sentences": st["sentences_by_kind"]["multi_target"],
                "no_target_sentences": st["sentences_by_kind"]["no_target"],
                "truncated_sentences": st["truncated_sentences"],
                "multi_polygon_refs": st["multi_polygon_refs"],
                "merged_overlap_pixels": st["merged_overlap_pixels"],
                "empty_after_resize_480": len(st["empty_480"]),
                "rle_targets": len(st["rle_targets"]),
                "crowd_targets": len(st["crowd_targets"]),
                "degenerate_polygon_refs": len(st["degenerate_polygon_refs"]),
                "skipped_refs": len(self.skipped),
                "skipped_sentences": len(self.skipped_sentences),
            },
            "empty_after_resize_480_ref_ids": st["empty_480"],
            "rle_targets": st["rle_targets"],
            "crowd_targets": st["crowd_targets"],
            "bad_instances": st["bad_instances"],
            "degenerate_polygon_refs": st["degenerate_polygon_refs"],
            "skipped_refs": self.skipped,
            "skipped_sentences": self.skipped_sentences,
        }


# ------------------------------------------------------------------------------------------
# Entry point.
# ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magnet_jax.data.grefcoco",
        description="Convert gRefCOCO annotations and COCO images to magnet_jax ArrayRecords.",
    )
    p.add_argument("--grefs", required=True, help="grefs(unc).json (or a pickled grefs(unc).p)")
    p.add_argument("--instances", required=True, help="gRefCOCO's instances.json")
    p.add_argument("--image-root", required=True, help="directory of the COCO train2014 images")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--splits", nargs="+", choices=SPLITS, help="splits to convert (default: all present)"
    )
    p.add_argument("--workers", type=int, default=1, help="processes for image reading and masks")
    p.add_argument(
        "--with-instances", action="store_true", help="also store every instance mask of the image"
    )
    p.add_argument("--strict", action="store_true", help="make any bad input fatal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def convert(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Convert the requested splits; returns split -> meta. Raises ConvertError / GRefError."""
    if args.workers < 1:
        raise ConvertError(f"--workers must be at least 1, got {args.workers}")
    if not Path(args.image_root).is_dir():
        raise ConvertError(f"image root not found: {args.image_root}")
    # Fixed: the stored mask reads the same under both conventions (module docstring).
    args.mask_convention = "union"
    grefs = GRefCocoAnnotations(args.grefs, args.instances)
    splits = list(args.splits or grefs.splits)
    for split in splits:
        grefs.refs_of_split(split)  # a requested split with no refs is an error
    check_output_dir(args.out, DATASET, SPLIT_BY)
    sources = {
        "refs": {"file": grefs.refs_path.name, "sha256": records_sha(grefs.refs_path)},
        "instances": {
            "file": grefs.instances_path.name,
            "sha256": records_sha(grefs.instances_path),
        },
        "image_root": str(Path(args.image_root).resolve()),
    }
    converter = _GRefSplitConverter(grefs, args, sources)
    return run_splits(converter, splits, args, sources, CONVERTER_VERSION)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        convert(args)
    except (ConvertError, GRefError, FileNotFoundError, records.RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
