"""REFER annotations + COCO images -> magnet_jax ArrayRecord shards (`data_formats.md` §7).

    python -m magnet_jax.data.convert --refer-root DIR --dataset refcoco --split-by unc \
        --image-root DIR/images/mscoco/images/train2014 --out records/refcoco_unc

One `--out` directory holds one (dataset, split_by): per split `<split>.array_record-*` shards
(one record per ref, round-robin in pickle order: train 64 shards, other splits 8, fewer when
a split has fewer refs) and `<split>.meta.json` (written last; `records.py`).

Resume: a split whose meta.json exists, lists the same sources and options, and whose shards
all exist is skipped. Anything else of that split (shards without meta.json, `.partial` files
of a killed run) is deleted and converted again.

Bad input (missing/corrupt image, image of another size, an annotation with no usable
polygon or an empty mask, absent ann_id or image record, empty sentence) is reported with its
ids and skipped (listed in meta.json), or is fatal with --strict. A sentence that is empty is
dropped from its ref; a ref left without sentences is skipped. Polygons of fewer than 3 points
next to valid ones add no pixel (as in refer.getMask): the ref is kept and listed in
`degenerate_polygon_refs` (fatal with --strict).

Published counts (§1.4) are checked when the refs file looks like the real dataset, i.e. holds
at least FULL_DATASET_MIN_REFS refs (hand-built fixtures are far smaller): a mismatch is a
warning, or fatal with --strict.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magnet_jax.data import records
from magnet_jax.data.refer import ReferDataset, ReferError

CONVERTER_VERSION = "1"
FULL_DATASET_MIN_REFS = 1000
TRAIN_SHARDS = 64
EVAL_SHARDS = 8
EVAL_SIZE = 480  # MagNet's input size: empty-after-resize masks are counted at this size
TOKENIZER_NAME = "bert-base-uncased"


class ConvertError(Exception):
    """A fatal problem; the message is one line."""


def _ids(ref_id: Any, ann_id: Any, image_id: Any) -> str:
    return f"ref_id={ref_id} ann_id={ann_id} image_id={image_id}"


# ------------------------------------------------------------------------------------------
# Per-ref work that touches files (runs in worker processes with --workers > 1).
# ------------------------------------------------------------------------------------------


def read_checked_image(
    path: Path, height: int, width: int
) -> tuple[bytes, None] | tuple[None, tuple[str, str]]:
    """(the file's original bytes, None), or (None, (kind, message)) for a missing, unreadable or
    corrupt image or one whose size is not instances.json's (height, width)."""
    from magnet_jax.data.images import ImageReadError, load_image_rgb

    try:
        image_bytes = path.read_bytes()
    except FileNotFoundError:
        return None, ("missing_image", f"image file not found: {path}")
    except OSError as e:
        return None, ("unreadable_image", f"cannot read image {path}: {e}")
    try:
        img = load_image_rgb(path)
    except (ImageReadError, FileNotFoundError) as e:
        return None, ("corrupt_image", str(e))
    if img.size != (width, height):
        return None, (
            "image_size",
            f"image {path} is {img.size[0]}x{img.size[1]} (WxH), "
            f"instances.json says {width}x{height}",
        )
    return image_bytes, None


def instance_count_pngs(
    instances: list[tuple[int, Any]], height: int, width: int
) -> tuple[list[bytes], list[dict[str, Any]]]:
    """Count PNGs of every (ann_id, segmentation) of an image, and the unreadable ones."""
    from magnet_jax.data.masks import MaskError, count_map

    pngs, bad = [], []
    for ann_id, seg in instances:
        try:
            pngs.append(records.count_png(count_map(seg, height, width).count))
        except MaskError as e:
            # Instance masks are an auxiliary input: store an empty mask and report it.
            pngs.append(records.count_png(np.zeros((height, width), np.uint8)))
            bad.append({"ann_id": int(ann_id), "reason": str(e)})
    return pngs, bad


def _process_ref(task: dict[str, Any]) -> dict[str, Any]:
    """Read and check the image, build the count mask(s). Returns {'bad': (kind, msg)} or parts."""
    from PIL import Image

    from magnet_jax.data.masks import MaskError, count_map

    h, w = task["height"], task["width"]
    image_bytes, bad = read_checked_image(Path(task["image_path"]), h, w)
    if bad is not None:
        return {"bad": bad}
    try:
        cm = count_map(task["segmentation"], h, w)
    except MaskError as e:
        return {"bad": ("bad_segmentation", f"annotation {task['ann_id']}: {e}")}
    eq1 = (cm.count == 1).astype(np.uint8)
    small = np.asarray(Image.fromarray(eq1).resize((EVAL_SIZE, EVAL_SIZE), Image.NEAREST))
    out: dict[str, Any] = {
        "image_jpeg": image_bytes,
        "mask_count_png": records.count_png(cm.count),
        "num_polygons": cm.num_polygons,
        "overlap_pixels": cm.overlap_pixels,
        "kind": cm.kind,
        "degenerate_polygons": list(cm.degenerate_polygons),
        "eq1_empty": not eq1.any(),
        "eq1_empty_480": not small.any(),
    }
    if task.get("instances") is not None:
        out["instance_count_pngs"], out["bad_instances"] = instance_count_pngs(
            task["instances"], h, w
        )
    return out


# ------------------------------------------------------------------------------------------
# One split.
# ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from magnet_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(None)


def _sha256_bytes_of(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _SplitConverter:
    """One (dataset, split_by) -> per-split shards. Subclasses (gRefCOCO) replace `worker` (the
    per-ref file work, a module-level function so spawned workers can import it), `_prepare`,
    `_records` and `_meta`; `run` (atomic output) and the sentence/text helpers are shared."""

    worker = staticmethod(_process_ref)

    def __init__(self, refer: ReferDataset, args: argparse.Namespace, sources: dict[str, Any]):
        self.refer, self.args, self.sources = refer, args, sources
        self.tok = _tokenizer()

    def _bad(self, kind: str, message: str, ids: dict[str, Any]) -> None:
        text = f"{_ids(ids.get('ref_id'), ids.get('ann_id'), ids.get('image_id'))}: {message}"
        if self.args.strict:
            raise ConvertError(f"{kind}: {text}")
        print(f"warning: skipped {text}", file=sys.stderr)
        self.skipped.append({**ids, "kind": kind, "reason": message})

    def _has_pieces(self, raw: str) -> bool:
        try:
            self.tok.encode(raw, warn=False)
        except ValueError:
            return False
        return True

    def _clean_sentences(
        self, sentences: list[dict[str, Any]], ids: dict[str, Any]
    ) -> list[tuple[int, str, str]]:
        """(sent_id, raw, sent) of the non-empty sentences; empty ones are dropped and listed."""
        sents = []
        for s in sentences:
            raw, sent = str(s.get("raw", "")), str(s.get("sent", ""))
            # Empty after normalisation: blank raw or sent, or no word piece at all
            # (e.g. only control or zero-width characters).
            if raw.strip() and sent.strip() and self._has_pieces(raw):
                sents.append((int(s["sent_id"]), raw, sent))
                continue
            msg = f"sent_id={s.get('sent_id')}: empty sentence (raw={raw!r}, sent={sent!r})"
            if self.args.strict:
                raise ConvertError(f"empty_sentence: {_ids(**ids)}: {msg}")
            print(f"warning: dropped sentence of {_ids(**ids)}: {msg}", file=sys.stderr)
            self.skipped_sentences.append(
                {**ids, "sent_id": int(s.get("sent_id", -1)), "reason": "empty sentence"}
            )
        return sents

    def _text_fields(self, sents: list[tuple[int, str, str]]) -> dict[str, Any]:
        """The record's sentence and token fields (ids of `raw`, data_formats.md §3)."""
        tok = self.tok.batch_encode([raw for _, raw, _ in sents], warn=False)
        self.stats["truncated_sentences"] += int(tok.truncated.sum())
        return {
            "sent_ids": np.asarray([i for i, _, _ in sents], np.int64),
            "raw": [raw for _, raw, _ in sents],
            "sent": [sent for _, _, sent in sents],
            "input_ids": tok.ids.astype(np.int32),
            "attention_mask": tok.attention_mask.astype(np.int8),
            "num_wordpieces": (tok.num_pieces + 2).astype(np.int32),
        }

    def _instance_fields(
        self, image_id: int, parts: dict[str, Any], ids: dict[str, Any]
    ) -> dict[str, Any]:
        """--with-instances: every annotation of the image (fields of records.OPTIONAL_FIELDS)."""
        refer = self.refer
        inst = refer.anns_by_image.get(image_id, [])
        self.stats["bad_instances"] += [{**ids, **b} for b in parts["bad_instances"]]
        return {
            "instance_ann_ids": np.asarray([a["id"] for a in inst], np.int64),
            "instance_category_ids": np.asarray([a["category_id"] for a in inst], np.int32),
            "instance_category_names": [
                str(refer.categories.get(int(a["category_id"]), {}).get("name", "")) for a in inst
            ],
            "instance_iscrowd": np.asarray([a.get("iscrowd", 0) for a in inst], np.int8),
            "instance_count_pngs": parts["instance_count_pngs"],
        }

    def _tokenizer_meta(self) -> dict[str, Any]:
        return {
            "name": TOKENIZER_NAME,
            "vocab": Path(self.tok.source).name,
            "vocab_sha256": _sha256_bytes_of(self.tok.source),
            "text_field": "raw",
        }

    def _prepare(self, split: str) -> tuple[list, list[dict[str, Any]]]:
        """Checks that need no file reads; returns (prepared refs, worker tasks) in pickle order."""
        refer, args = self.refer, self.args
        refs = refer.refs_of_split(split)
        self.skipped: list[dict[str, Any]] = []
        self.skipped_sentences: list[dict[str, Any]] = []
        prepared, tasks = [], []
        for ref in refs:
            ids = {
                "ref_id": int(ref["ref_id"]),
                "ann_id": int(ref["ann_id"]),
                "image_id": int(ref["image_id"]),
            }
            ann = refer.anns.get(ids["ann_id"])
            if ann is None:
                self._bad("absent_ann", f"ann_id not in {refer.instances_path.name}", ids)
                continue
            img = refer.images.get(ids["image_id"])
            if img is None:
                self._bad("absent_image", f"image_id not in {refer.instances_path.name}", ids)
                continue
            if int(ann["image_id"]) != ids["image_id"]:
                self._bad("ann_image_mismatch", f"annotation is on image {ann['image_id']}", ids)
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
            prepared.append((ref, ann, img, sents))
            tasks.append(
                {
                    "ann_id": ids["ann_id"],
                    "image_path": str(Path(args.image_root) / img["file_name"]),
                    "height": int(img["height"]),
                    "width": int(img["width"]),
                    "segmentation": ann["segmentation"],
                    "instances": instances,
                }
            )
        self._reset_stats()
        return prepared, tasks

    def _reset_stats(self) -> None:
        self.stats = {
            "truncated_sentences": 0,
            "multi_polygon_refs": 0,
            "overlap_pixels": 0,
            "empty_eq1_native": [],
            "empty_eq1_480": [],
            "rle_refs": [],
            "crowd_refs": [],
            "bad_instances": [],
            "degenerate_polygon_refs": [],
        }
        self.image_ids: set[int] = set()
        self.sentences = 0
        self.refs_written = 0

    def iter_records(self, split: str) -> Iterator[dict[str, Any]]:
        """The split's records in pickle order, in this process (for the TFDS builder)."""
        prepared, tasks = self._prepare(split)
        yield from self._records(prepared, map(self.worker, tasks), None, split)

    def run(self, split: str, pool=None) -> dict[str, Any]:
        """Convert one split into shards + meta.json under args.out (files read in `pool`)."""
        refer, args = self.refer, self.args
        refs = refer.refs_of_split(split)
        prepared, tasks = self._prepare(split)
        default = TRAIN_SHARDS if split == "train" else EVAL_SHARDS
        num_shards = max(1, min(default, len(tasks)))
        if pool is not None and len(tasks) > 1:
            # imap keeps the input order: the output does not depend on --workers.
            results: Iterator = pool.imap(self.worker, tasks, chunksize=4)
        else:
            results = map(self.worker, tasks)
        try:
            from tqdm import tqdm

            bar = tqdm(
                total=len(tasks),
                desc=f"{refer.dataset} {refer.split_by} {split}",
                unit="ref",
                file=sys.stderr,
                disable=args.quiet,
            )
            with bar:
                meta = records.write_shards(
                    self._records(prepared, results, bar, split),
                    args.out,
                    split,
                    num_shards,
                    lambda: self._meta(split, refs),
                )
        except BaseException:
            records.remove_split(args.out, split)  # never leave a half-written split behind
            raise
        return meta

    def _records(self, prepared, results, bar, split) -> Iterator[dict[str, Any]]:
        refer, args, st = self.refer, self.args, self.stats
        for (ref, ann, img, sents), parts in zip(prepared, results):
            if bar is not None:
                bar.update(1)
            ids = {
                "ref_id": int(ref["ref_id"]),
                "ann_id": int(ref["ann_id"]),
                "image_id": int(ref["image_id"]),
            }
            if "bad" in parts:
                self._bad(parts["bad"][0], parts["bad"][1], ids)
                continue
            if parts["degenerate_polygons"]:
                # Kept (they add no pixel, as in refer.getMask) but reported; fatal if --strict.
                msg = (
                    f"annotation {ids['ann_id']}: polygons {parts['degenerate_polygons']} have "
                    "fewer than 3 points (ignored)"
                )
                if args.strict:
                    raise ConvertError(f"degenerate_polygon: {_ids(**ids)}: {msg}")
                print(f"warning: {_ids(**ids)}: {msg}", file=sys.stderr)
                st["degenerate_polygon_refs"].append(
                    {**ids, "polygons": parts["degenerate_polygons"]}
                )
            cat_id = int(ref.get("category_id", ann.get("category_id")))
            rec: dict[str, Any] = {
                "schema_version": records.SCHEMA_VERSION,
                "dataset": refer.dataset,
                "split_by": refer.split_by,
                "split": split,
                **ids,
                "category_id": cat_id,
                "category_name": str(refer.categories.get(cat_id, {}).get("name", "")),
                "image_file": str(img["file_name"]),
                "image_jpeg": parts["image_jpeg"],
                "height": int(img["height"]),
                "width": int(img["width"]),
                "bbox": np.asarray(ann["bbox"], np.float32),
                "area": float(ann.get("area", 0.0)),
                "iscrowd": int(ann.get("iscrowd", 0)),
                "mask_count_png": parts["mask_count_png"],
                "num_polygons": parts["num_polygons"],
                "overlap_pixels": parts["overlap_pixels"],
                **self._text_fields(sents),
            }
            if args.with_instances:
                rec.update(self._instance_fields(ids["image_id"], parts, ids))
            st["multi_polygon_refs"] += int(parts["num_polygons"] > 1)
            st["overlap_pixels"] += int(parts["overlap_pixels"])
            if parts["eq1_empty"]:
                st["empty_eq1_native"].append(ids["ref_id"])
            if parts["eq1_empty_480"]:
                st["empty_eq1_480"].append(ids["ref_id"])
            if parts["kind"] != "polygons":
                st["rle_refs"].append({**ids, "kind": parts["kind"]})
            if rec["iscrowd"]:
                st["crowd_refs"].append(ids["ref_id"])
            self.image_ids.add(ids["image_id"])
            self.sentences += len(sents)
            self.refs_written += 1
            yield rec

    def _meta(self, split: str, refs: list[dict[str, Any]]) -> dict[str, Any]:
        refer, args = self.refer, self.args
        n_refs, n_images, n_sents = refer.split_counts(split)
        return {
            "converter_version": CONVERTER_VERSION,
            "dataset": refer.dataset,
            "split_by": refer.split_by,
            "mask_convention": args.mask_convention,
            "mask_storage": "per-pixel polygon count (uint8 PNG); official = count == 1, union = count >= 1",
            "with_instances": bool(args.with_instances),
            "sources": self.sources,
            "tokenizer": self._tokenizer_meta(),
            "max_tokens": records.MAX_TOKENS,
            "split_rule": "exact match of ref['split']",
            "source_counts": {"refs": n_refs, "images": n_images, "sentences": n_sents},
            "counts": {
                "refs": self.refs_written,
                "images": len(self.image_ids),
                "sentences": self.sentences,
                "truncated_sentences": self.stats["truncated_sentences"],
                "multi_polygon_refs": self.stats["multi_polygon_refs"],
                "overlap_pixels": self.stats["overlap_pixels"],
                "empty_eq1_native": len(self.stats["empty_eq1_native"]),
                "empty_eq1_480": len(self.stats["empty_eq1_480"]),
                "rle_refs": len(self.stats["rle_refs"]),
                "crowd_refs": len(self.stats["crowd_refs"]),
                "degenerate_polygon_refs": len(self.stats["degenerate_polygon_refs"]),
                "skipped_refs": len(self.skipped),
                "skipped_sentences": len(self.skipped_sentences),
            },
            "empty_eq1_native_ref_ids": self.stats["empty_eq1_native"],
            "empty_eq1_480_ref_ids": self.stats["empty_eq1_480"],
            "rle_refs": self.stats["rle_refs"],
            "crowd_ref_ids": self.stats["crowd_refs"],
            "bad_instances": self.stats["bad_instances"],
            "degenerate_polygon_refs": self.stats["degenerate_polygon_refs"],
            "skipped_refs": self.skipped,
            "skipped_sentences": self.skipped_sentences,
            "count_check": self.sources.get("count_check"),
        }


# ------------------------------------------------------------------------------------------
# Entry point.
# ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m magnet_jax.data.convert",
        description="Convert REFER annotations and COCO images to magnet_jax ArrayRecord shards.",
    )
    p.add_argument(
        "--refer-root", required=True, help="directory holding refcoco/, refcoco+/, refcocog/"
    )
    p.add_argument("--dataset", required=True, choices=("refcoco", "refcoco+", "refcocog"))
    p.add_argument("--split-by", required=True, choices=("unc", "google", "umd"))
    p.add_argument("--image-root", required=True, help="directory of the COCO train2014 images")
    p.add_argument("--out", required=True, help="output directory (one per dataset and split_by)")
    p.add_argument("--splits", nargs="+", help="splits to convert (default: all of the partition)")
    p.add_argument("--workers", type=int, default=1, help="processes for image reading and masks")
    p.add_argument("--mask-convention", choices=records.MASK_CONVENTIONS, default="official")
    p.add_argument(
        "--with-instances", action="store_true", help="also store every instance mask of the image"
    )
    p.add_argument("--strict", action="store_true", help="make any bad input fatal")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _same_conversion(
    meta: dict[str, Any],
    args: argparse.Namespace,
    sources: dict[str, Any],
    version: str = CONVERTER_VERSION,
) -> bool:
    return (
        meta.get("converter_version") == version
        and meta.get("mask_convention") == args.mask_convention
        and meta.get("with_instances") == bool(args.with_instances)
        and all(
            (meta.get("sources") or {}).get(k, {}).get("sha256") == sources[k]["sha256"]
            for k in ("refs", "instances")
        )
    )


def convert(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Convert the requested splits; returns split -> meta. Raises ConvertError / ReferError."""
    if args.workers < 1:
        raise ConvertError(f"--workers must be at least 1, got {args.workers}")
    if not Path(args.image_root).is_dir():
        raise ConvertError(f"image root not found: {args.image_root}")
    refer = ReferDataset(args.refer_root, args.dataset, args.split_by)
    splits = list(args.splits or refer.splits)
    unknown = [s for s in splits if s not in refer.splits]
    if unknown:
        raise ConvertError(
            f"split {unknown[0]!r} is not a split of {args.dataset} {args.split_by} "
            f"(splits: {', '.join(refer.splits)})"
        )
    check_output_dir(args.out, args.dataset, args.split_by)
    if len(refer.refs) >= FULL_DATASET_MIN_REFS:
        problems = refer.check_counts()
        if problems and args.strict:
            raise ConvertError("counts differ from the published ones: " + "; ".join(problems))
        for msg in problems:
            print(f"warning: counts differ from the published ones: {msg}", file=sys.stderr)
        count_check = {"checked": True, "mismatches": problems}
    else:
        count_check = {
            "checked": False,
            "reason": f"fewer than {FULL_DATASET_MIN_REFS} refs: not the full dataset",
        }
    sources = {
        "refs": {"file": refer.refs_path.name, "sha256": records_sha(refer.refs_path)},
        "instances": {
            "file": refer.instances_path.name,
            "sha256": records_sha(refer.instances_path),
        },
        "image_root": str(Path(args.image_root).resolve()),
        "count_check": count_check,
    }
    return run_splits(_SplitConverter(refer, args, sources), splits, args, sources)


def check_output_dir(out: str | os.PathLike, dataset: str, split_by: str) -> None:
    """Create `out`; refuse one that already holds records of another (dataset, split_by)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for other in records.available_splits(out):
        try:
            m = records.read_meta(out, other)
        except (FileNotFoundError, ValueError):
            continue
        if (m.get("dataset"), m.get("split_by")) != (dataset, split_by):
            raise ConvertError(
                f"{out} holds {m.get('dataset')} {m.get('split_by')} records ({other}); "
                "use one --out directory per dataset and split_by"
            )


def run_splits(
    converter: _SplitConverter,
    splits: Sequence[str],
    args: argparse.Namespace,
    sources: dict[str, Any],
    version: str = CONVERTER_VERSION,
) -> dict[str, dict[str, Any]]:
    """Convert each split into args.out unless it is complete with the same sources and options
    (resume); returns split -> meta. `version` is the converter's, stored in meta.json."""
    out = Path(args.out)
    metas = {}
    # Spawned (not forked) workers: the parent holds a multi-threaded Rust tokenizer.
    pool = multiprocessing.get_context("spawn").Pool(args.workers) if args.workers > 1 else None
    try:
        for split in splits:
            if records.is_complete(out, split):
                meta = records.read_meta(out, split)
                if _same_conversion(meta, args, sources, version):
                    print(
                        f"{split}: already converted ({meta['num_records']} records), skipped",
                        file=sys.stderr,
                    )
                    metas[split] = meta
                    continue
                print(
                    f"{split}: existing output has other sources or options; converting again",
                    file=sys.stderr,
                )
            meta = converter.run(split, pool)
            print(
                f"{split}: {meta['num_records']} refs, {meta['counts']['sentences']} sentences, "
                f"{len(meta['shards'])} shards, {len(meta['skipped_refs'])} skipped",
                file=sys.stderr,
            )
            metas[split] = meta
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return metas


def iter_split_records(
    refer_root: str | os.PathLike,
    dataset: str,
    split_by: str,
    image_root: str | os.PathLike,
    split: str,
    *,
    with_instances: bool = False,
    strict: bool = False,
) -> Iterator[dict[str, Any]]:
    """Records of one split in pickle order, built as the converter builds them (no files written).

    Bad input is skipped with a warning on stderr, or raises ConvertError with `strict`.
    """
    refer = ReferDataset(refer_root, dataset, split_by)
    args = argparse.Namespace(
        image_root=str(image_root),
        with_instances=with_instances,
        strict=strict,
        mask_convention="official",
        workers=1,
        quiet=True,
    )
    yield from _SplitConverter(refer, args, sources={}).iter_records(split)


def records_sha(path: Path) -> str:
    from magnet_jax.data.refer import sha256_file

    return sha256_file(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        convert(args)
    except (ConvertError, ReferError, FileNotFoundError, records.RecordError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
