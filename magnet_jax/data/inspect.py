"""Print converted records as JSON lines, to check a conversion (a contract for external checks).

python -m magnet_jax.data.inspect OUT_DIR --split val
    one line per record, in record order:
    {"ref_id", "ann_id", "image_id", "height", "width",
     "sentences": [{"sent_id", "raw", "sent"}], "mask_sum", "mask_sha1"}
    mask = the H x W uint8 0/1 target mask under the conversion's convention (meta.json
    `mask_convention`, or --mask-convention); mask_sha1 = sha1 of its bytes in C order.
python -m magnet_jax.data.inspect OUT_DIR --summary
    one line per complete split: {"split", "refs", "images", "sentences", "skipped_refs", ...}
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from magnet_jax.data import records


def record_line(rec: dict[str, Any], convention: str) -> dict[str, Any]:
    """The JSON object printed for one decoded record."""
    mask = records.mask_from_count_png(rec["mask_count_png"], convention)
    if mask.shape != (rec["height"], rec["width"]):
        raise ValueError(
            f"ref_id={rec['ref_id']}: mask is {mask.shape[0]}x{mask.shape[1]}, "
            f"record says {rec['height']}x{rec['width']}"
        )
    return {
        "ref_id": int(rec["ref_id"]),
        "ann_id": int(rec["ann_id"]),
        "image_id": int(rec["image_id"]),
        "height": int(rec["height"]),
        "width": int(rec["width"]),
        "sentences": [
            {"sent_id": int(i), "raw": raw, "sent": sent}
            for i, raw, sent in zip(rec["sent_ids"], rec["raw"], rec["sent"])
        ],
        "mask_sum": int(mask.sum(dtype="int64")),
        "mask_sha1": hashlib.sha1(mask.astype("uint8").tobytes(order="C")).hexdigest(),
    }


def iter_lines(out_dir: str, split: str, convention: str | None = None) -> Iterator[dict[str, Any]]:
    source = records.RecordSource(out_dir, split)
    conv = convention or source.meta.get("mask_convention", "official")
    for i in range(len(source)):
        yield record_line(source[i], conv)


def summary(out_dir: str) -> list[dict[str, Any]]:
    """One dict per complete split of `out_dir`."""
    if not Path(out_dir).is_dir():
        raise FileNotFoundError(f"records directory not found: {out_dir}")
    lines = []
    for split in records.available_splits(out_dir):
        meta = records.read_meta(out_dir, split)
        counts = meta.get("counts", {})
        lines.append(
            {
                "split": split,
                "dataset": meta.get("dataset"),
                "split_by": meta.get("split_by"),
                "refs": meta["num_records"],
                "images": counts.get("images"),
                "sentences": counts.get("sentences", sum(meta.get("sentence_counts", []))),
                "shards": len(meta["shards"]),
                "skipped_refs": len(meta.get("skipped_refs", [])),
                "skipped_sentences": len(meta.get("skipped_sentences", [])),
                "mask_convention": meta.get("mask_convention"),
            }
        )
    if not lines:
        raise FileNotFoundError(f"no converted split in {out_dir}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m magnet_jax.data.inspect", description=__doc__.splitlines()[0]
    )
    p.add_argument("out_dir", help="directory written by magnet_jax.data.convert")
    p.add_argument("--split", help="split to print, one JSON line per record")
    p.add_argument("--summary", action="store_true", help="print counts per split")
    p.add_argument(
        "--mask-convention",
        choices=records.MASK_CONVENTIONS,
        default=None,
        help="override the conversion's convention",
    )
    args = p.parse_args(argv)
    if not args.summary and not args.split:
        p.error("give --split SPLIT or --summary")
    try:
        if args.summary:
            for line in summary(args.out_dir):
                print(json.dumps(line))
        if args.split:
            for line in iter_lines(args.out_dir, args.split, args.mask_convention):
                print(json.dumps(line, ensure_ascii=False))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head` closed the pipe: not an error
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
