"""Per-ref polygon count maps at native resolution (`data_formats.md` §2).

The count map is exactly `refer.getMask(ref)["mask"]`: every polygon of the annotation is
rasterised on its own with pycocotools (`frPyObjects` -> one RLE per polygon -> `decode`) and
the per-pixel sum is kept. Both conventions derive from it (`records.mask_from_count`):
official (LAVT/MagNet) = count == 1, union (pycocotools `annToMask`) = count >= 1.

RLE segmentations (which `refer.getMask` cannot read, §2.2) are decoded too: uncompressed
counts (a list of ints, as COCO stores crowd regions) through `frPyObjects`, compressed counts
(a string) directly. Their count map is the 0/1 mask; the result says which kind it was.

Bad input raises `MaskError` (one line): no polygon, an empty polygon, an odd number of
coordinates, non-finite coordinates, an RLE of another size, or a segmentation that covers no
pixel at all (e.g. only zero-area polygons). Polygons with fewer than 3 points are rasterised
as `refer.getMask` does and listed in `CountMask.degenerate_polygons` (the caller reports them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np


class MaskError(ValueError):
    """A segmentation that cannot give a mask (empty or degenerate)."""


@dataclasses.dataclass(frozen=True)
class CountMask:
    """count: uint8 (H, W) per-pixel polygon count; kind: 'polygons', 'rle' or 'rle_uncompressed'."""

    count: np.ndarray
    kind: str
    num_polygons: int
    degenerate_polygons: tuple[int, ...] = ()  # indices of polygons with fewer than 3 points

    @property
    def overlap_pixels(self) -> int:
        """Pixels where official and union differ (covered by two or more polygons)."""
        return int(np.count_nonzero(self.count >= 2))

    @property
    def is_rle(self) -> bool:
        return self.kind != "polygons"


def _check_polygon(poly: Any, i: int) -> list[float]:
    if not isinstance(poly, (list, tuple)):
        raise MaskError(f"polygon {i} is a {type(poly).__name__}, not a list of coordinates")
    if len(poly) == 0:
        raise MaskError(f"polygon {i} is empty")
    if len(poly) % 2:
        raise MaskError(f"polygon {i} has an odd number of coordinates ({len(poly)})")
    coords = [float(v) for v in poly]
    if not all(math.isfinite(v) for v in coords):
        raise MaskError(f"polygon {i} has non-finite coordinates")
    return coords


def count_map(segmentation: Any, height: int, width: int) -> CountMask:
    """Per-pixel polygon count (uint8, height x width) of a COCO segmentation."""
    from pycocotools import mask as mask_utils

    h, w = int(height), int(width)
    if h <= 0 or w <= 0:
        raise MaskError(f"image size {h}x{w} is not positive")
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise MaskError("RLE segmentation lacks 'counts' or 'size'")
        size = [int(v) for v in segmentation["size"]]
        if size != [h, w]:
            raise MaskError(f"RLE size {size[0]}x{size[1]} differs from the image size {h}x{w}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, h, w)
            kind = "rle_uncompressed"
        else:
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
            kind = "rle"
        count = np.asarray(mask_utils.decode(rle), dtype=np.uint8)
        count = (count > 0).astype(np.uint8)
        num_polygons = 0
        degenerate = ()
    elif isinstance(segmentation, (list, tuple)):
        if len(segmentation) == 0:
            raise MaskError("segmentation has no polygons")
        polys = [_check_polygon(p, i) for i, p in enumerate(segmentation)]
        degenerate = tuple(i for i, p in enumerate(polys) if len(p) < 6)
        valid = [p for p in polys if len(p) >= 6]
        if not valid:
            raise MaskError(f"no polygon has 3 or more points ({len(polys)} degenerate)")
        # One RLE per polygon, decoded to (h, w, n) and summed: refer.getMask semantics.
        # Polygons of fewer than 3 points rasterise to nothing there (when not first; first,
        # they crash getMask, as pycocotools reads a 4-number list as a box), so they are left
        # out here and reported.
        rles = mask_utils.frPyObjects(valid, h, w)
        decoded = np.asarray(mask_utils.decode(rles))
        total = decoded.reshape(h, w, -1).sum(axis=2, dtype=np.int64)
        if total.max(initial=0) > 255:
            raise MaskError(f"more than 255 polygons overlap ({int(total.max())})")
        count = total.astype(np.uint8)
        kind = "polygons"
        num_polygons = len(polys)
    else:
        raise MaskError(f"segmentation is a {type(segmentation).__name__}, not polygons or RLE")
    if count.shape != (h, w):
        raise MaskError(f"decoded mask has shape {count.shape}, expected {(h, w)}")
    if not count.any():
        raise MaskError("segmentation covers no pixel")
    return CountMask(
        count=np.ascontiguousarray(count),
        kind=kind,
        num_polygons=num_polygons,
        degenerate_polygons=degenerate,
    )
