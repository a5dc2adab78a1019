"""Render converted records as a grid of mask overlays with their sentences.

    python -m tools.show_records RECORDS_DIR --split val --out grid.png [--num 12] [--start 0]
        [--cell 256] [--mask-convention official|union]

Each cell: the image with the referred object's mask (red) and its outline, the ref id, and
the first sentences underneath. For checking a conversion by eye.
"""

from __future__ import annotations

import argparse
import io
import sys
import textwrap

from PIL import Image, ImageDraw

from magnet_jax.data import images as image_io
from magnet_jax.data import records


def render_cell(record: dict, convention: str, cell: int, lines: int = 3) -> Image.Image:
    img = Image.open(io.BytesIO(record["image_jpeg"])).convert("RGB")
    mask = records.mask_from_count_png(record["mask_count_png"], convention).astype(bool)
    overlay = image_io.overlay_mask(img, mask)
    scale = cell / max(overlay.size)
    overlay = overlay.resize((max(1, round(overlay.width * scale)), max(1, round(overlay.height * scale))),
                             Image.BILINEAR)
    text_h = 12 * lines + 16
    out = Image.new("RGB", (cell, cell + text_h), "white")
    out.paste(overlay, ((cell - overlay.width) // 2, 0))
    draw = ImageDraw.Draw(out)
    caption = [f"ref {record['ref_id']}"] + [f"- {s}" for s in record["raw"]]
    wrapped = [w for line in caption for w in textwrap.wrap(line, width=cell // 6)][:lines + 1]
    for i, line in enumerate(wrapped):
        draw.text((4, cell + 2 + 12 * i), line, fill="black")
    return out


def render_grid(out_dir: str, split: str, num: int, start: int, cell: int,
                convention: str | None) -> Image.Image:
    source = records.RecordSource(out_dir, split)
    convention = convention or source.meta.get("mask_convention", "official")
    indices = range(start, min(start + num, len(source)))
    if not indices:
        raise ValueError(f"no records in {split} from index {start} (the split has {len(source)})")
    cells = [render_cell(source[i], convention, cell) for i in indices]
    cols = min(4, len(cells))
    rows = -(-len(cells) // cols)
    w, h = cells[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, c in enumerate(cells):
        grid.paste(c, ((k % cols) * w, (k // cols) * h))
    return grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records_dir")
    p.add_argument("--split", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=12)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--cell", type=int, default=256)
    p.add_argument("--mask-convention", choices=records.MASK_CONVENTIONS)
    args = p.parse_args(argv)
    try:
        grid = render_grid(args.records_dir, args.split, args.num, args.start, args.cell,
                           args.mask_convention)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    grid.save(args.out)
    print(f"{args.out}: {grid.width}×{grid.height}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
