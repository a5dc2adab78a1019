"""Add an offline detector's instance masks to converted records (MaIL, `docs/data.md`).

    python -m magnet_jax.data.add_detections --data DIR --split val [--split testA ...] \\
        --results dets.json --detector NAME [--top-k 16] [--score-threshold 0.0] \\
        --out OUT_DIR [--overwrite] [--ignore-unknown-images]

`--results` is a COCO-format results file: a JSON list of {image_id, category_id,
segmentation: RLE {size: [h, w], counts: str | list}, score}. For every record, the
detections of its image with a score of at least `--score-threshold` are sorted by score
(ties in file order) and the top `--top-k` kept; the record is copied to OUT_DIR with the
`det_*` fields (`records.OPTIONAL_FIELDS`), padded to exactly top-k entries with empty masks
and valid 0. Shards keep the input's count and record order. Output goes through
`records.write_shards` (shards as .partial, renamed after close, meta.json last): a failed run
never leaves a split that reads as complete. meta.json is the input's, plus `detections`.

Checks (one-line errors, before anything is written): a missing or malformed results file; an
image id not in the given splits (unless `--ignore-unknown-images`); an RLE whose size is not
its image's size. OUT_DIR must differ from DIR.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magnet_jax.data import records

TOOL_VERSION = 1
_CACHE_IMAGES = 512  # decoded PNGs of this many recent images (an image has several refs)


class DetectionsError(ValueError):
    """Bad input to add_detections (one line)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_results(path: str | Path) -> list[dict[str, Any]]:
    """The results list, each entry checked; errors name the file (and the entry index)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DetectionsError(f"results file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DetectionsError(f"cannot read results file {path}: {e}") from None
    if not isinstance(data, list):
        raise DetectionsError(f"results file {path} is not a JSON list of detections "
                              f"(got a {type(data).__name__})")
    out = []
    for i, d in enumerate(data):
        where = f"results file {path}: detection {i}"
        if not isinstance(d, dict):
            raise DetectionsError(f"{where} is not an object")
        missing = [k for k in ("image_id", "category_id", "segmentation", "score") if k not in d]
        if missing:
            raise DetectionsError(f"{where} lacks {', '.join(missing)}")
        seg = d["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise DetectionsError(f"{where}: segmentation is not an RLE {{size, counts}}")
        try:
            size = [int(v) for v in seg["size"]]
            score = float(d["score"])
            image_id, category_id = int(d["image_id"]), int(d["category_id"])
        except (TypeError, ValueError):
            raise DetectionsError(f"{where}: non-numeric image_id, category_id, score or "
                                  "size") from None
        if len(size) != 2 or not math.isfinite(score):
            raise DetectionsError(f"{where}: bad size {seg['size']!r} or score {d['score']!r}")
        if not isinstance(seg["counts"], (str, list)):
            raise DetectionsError(f"{where}: RLE counts must be a string or a list")
        out.append({"index": i, "image_id": image_id, "category_id": category_id,
                    "score": score, "size": size, "counts": seg["counts"]})
    return out


def _decode_rle(det: dict[str, Any]) -> np.ndarray:
    from pycocotools import mask as mask_utils

    h, w = det["size"]
    counts = det["counts"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts.encode()}
    m = np.asarray(mask_utils.decode(rle), np.uint8)
    if m.shape != (h, w):
        raise DetectionsError(f"image_id={det['image_id']} detection {det['index']}: RLE "
                              f"decodes to {m.shape}, expected {(h, w)}")
    return (m > 0).astype(np.uint8)


def _record_order(meta: dict[str, Any]) -> list[int]:
    """Read order (RecordSource index) that reproduces the original round-robin write order."""
    n = int(meta["num_records"])
    sizes = [int(x) for x in meta.get("shard_sizes", [])]
    k = len(sizes)
    if not k or sizes != [len(range(s, n, k)) for s in range(k)]:
        return list(range(n))  # not write_shards' round-robin layout: keep the read order
    starts = np.cumsum([0] + sizes)[:-1]
    return [int(starts[i % k]) + i // k for i in range(n)]


class _Detections:
    """Per image: the kept detections (top-k by score above the threshold)."""

    def __init__(self, dets: list[dict[str, Any]], top_k: int, threshold: float):
        by_image: dict[int, list[dict[str, Any]]] = {}
        self.below = 0
        for d in dets:
            if d["score"] < threshold:
                self.below += 1
                continue
            by_image.setdefault(d["image_id"], []).append(d)
        self.over_k = 0
        self.kept: dict[int, list[dict[str, Any]]] = {}
        for image_id, ds in by_image.items():
            ds = sorted(ds, key=lambda d: -d["score"])  # stable: ties in file order
            self.over_k += max(0, len(ds) - top_k)
            self.kept[image_id] = ds[:top_k]
        self.top_k = top_k
        self._cache: OrderedDict[int, list[bytes]] = OrderedDict()

    def pngs(self, image_id: int, h: int, w: int) -> list[bytes]:
        if image_id in self._cache:
            self._cache.move_to_end(image_id)
            return self._cache[image_id]
        out = [records.count_png(_decode_rle(d)) for d in self.kept.get(image_id, [])]
        empty = records.count_png(np.zeros((h, w), np.uint8))
        out += [empty] * (self.top_k - len(out))
        self._cache[image_id] = out
        if len(self._cache) > _CACHE_IMAGES:
            self._cache.popitem(last=False)
        return out

    def fields(self, rec: dict[str, Any]) -> dict[str, Any]:
        image_id, h, w = int(rec["image_id"]), int(rec["height"]), int(rec["width"])
        ds = self.kept.get(image_id, [])
        pad = self.top_k - len(ds)
        return {
            "det_mask_pngs": self.pngs(image_id, h, w),
            "det_scores": np.asarray([d["score"] for d in ds] + [0.0] * pad, np.float32),
            "det_category_ids": np.asarray([d["category_id"] for d in ds] + [0] * pad, np.int32),
            "det_valid": np.asarray([1] * len(ds) + [0] * pad, np.int8),
        }


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, mininterval=2.0,
                disable=None)


def add_detections(data: str | Path, splits: Sequence[str], results: str | Path,
                   detector: str, out: str | Path, *, top_k: int = 16,
                   score_threshold: float = 0.0, overwrite: bool = False,
                   ignore_unknown_images: bool = False,
                   verbose: bool = False) -> dict[str, dict[str, Any]]:
    """Write each split of `data` with the det_* fields to `out`; returns each split's meta."""
    data, out, results = Path(data), Path(out), Path(results)
    if top_k < 1:
        raise DetectionsError(f"--top-k must be at least 1, got {top_k}")
    if not detector:
        raise DetectionsError("--detector must name the detector")
    if not splits:
        raise DetectionsError("give at least one --split")
    if out.resolve() == data.resolve():
        raise DetectionsError(f"--out {out} is the input directory: write to another directory")
    metas = {s: records.read_meta(data, s) for s in dict.fromkeys(splits)}
    if not overwrite:
        done = [s for s in metas if records.is_complete(out, s)]
        if done:
            raise DetectionsError(f"split(s) {', '.join(done)} already exist in {out} "
                                  "(use --overwrite)")
    dets = load_results(results)
    # Image sizes of the splits (one pass over the records, no image decoding).
    sizes: dict[int, tuple[int, int]] = {}
    images: dict[str, set[int]] = {}
    for s in metas:
        src = records.RecordSource(data, s)
        images[s] = set()
        for i in range(len(src)):
            rec = src[i]
            sizes[int(rec["image_id"])] = (int(rec["height"]), int(rec["width"]))
            images[s].add(int(rec["image_id"]))
    unknown = sorted({d["image_id"] for d in dets} - set(sizes))
    if unknown and not ignore_unknown_images:
        shown = ", ".join(map(str, unknown[:10])) + (", ..." if len(unknown) > 10 else "")
        raise DetectionsError(
            f"results file {results}: {len(unknown)} image id(s) not in split(s) "
            f"{', '.join(metas)} of {data}: {shown} (use --ignore-unknown-images to skip them)")
    n_unknown = sum(d["image_id"] not in sizes for d in dets)
    dets = [d for d in dets if d["image_id"] in sizes]
    for d in dets:
        h, w = sizes[d["image_id"]]
        if d["size"] != [h, w]:
            raise DetectionsError(
                f"results file {results}: image_id={d['image_id']} detection {d['index']} has "
                f"RLE size {d['size'][0]}x{d['size'][1]}, the image is {h}x{w} (HxW)")
    kept = _Detections(dets, top_k, score_threshold)
    source = {"detector": detector, "results_file": results.name,
              "results_sha256": _sha256(results), "top_k": top_k,
              "score_threshold": score_threshold, "tool_version": TOOL_VERSION,
              "source_dir": str(data)}
    written = {}
    for s, meta in metas.items():
        src = records.RecordSource(data, s)
        split_images = images[s]
        counts = {"records": len(src), "images": len(split_images),
                  "images_with_detections": sum(i in kept.kept for i in split_images),
                  "detections_kept": sum(len(kept.kept.get(i, [])) for i in split_images)}
        counts_all = {"detections_in_file": len(dets) + n_unknown,
                      "detections_unknown_image": n_unknown,
                      "detections_below_threshold": kept.below,
                      "detections_over_top_k": kept.over_k}
        base = {k: v for k, v in meta.items() if k not in (
            "schema_version", "split", "shards", "num_records", "shard_sizes", "ref_ids",
            "sentence_counts")}
        base["detections"] = {**source, "counts": {**counts, **counts_all}}
        bar = _progress(len(src), s) if verbose else None

        def recs(src=src, order=_record_order(meta), bar=bar) -> Iterator[dict[str, Any]]:
            for i in order:
                rec = src[i]
                rec.update(kept.fields(rec))
                if bar is not None:
                    bar.update(1)
                yield rec

        try:
            written[s] = records.write_shards(recs(), out, s, len(meta["shards"]), meta=base)
        except BaseException:
            records.remove_split(out, s)  # no partial files left behind
            raise
        finally:
            if bar is not None:
                bar.close()
        if verbose:
            c = written[s]["detections"]["counts"]
            print(f"{s}: {c['records']} records, {c['images_with_detections']}/{c['images']} "
                  f"images with detections, {c['detections_kept']} kept -> {out}",
                  file=sys.stderr)
    return written


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_jax.data.add_detections",
                                description="Add detector instance masks (det_* fields) to "
                                            "converted records, for MaIL.")
    p.add_argument("--data", required=True, help="records directory (input)")
    p.add_argument("--split", action="append", required=True, help="split (repeatable)")
    p.add_argument("--results", required=True, help="COCO-format detection results JSON")
    p.add_argument("--detector", required=True, help="detector name (stored in meta.json)")
    p.add_argument("--top-k", type=int, default=16, help="instances kept per image (default 16)")
    p.add_argument("--score-threshold", type=float, default=0.0,
                   help="drop detections scoring below this (default 0.0)")
    p.add_argument("--out", required=True, help="output directory (not --data)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output splits")
    p.add_argument("--ignore-unknown-images", action="store_true",
                   help="skip detections of images not in the given splits")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        add_detections(args.data, args.split, args.results, args.detector, args.out,
                       top_k=args.top_k, score_threshold=args.score_threshold,
                       overwrite=args.overwrite,
                       ignore_unknown_images=args.ignore_unknown_images, verbose=True)
    except (DetectionsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
