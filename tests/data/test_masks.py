"""Count maps: refer.getMask semantics and pycocotools annToMask (magnet_jax/data/masks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from magnet_jax.data.masks import MaskError, count_map
from magnet_jax.data.records import mask_from_count
from tests.data.fixtures.refer_fixture import IMAGES, annotations, build_refer_fixture

GOOD = (101, 102, 103, 104, 106, 109)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    paths = build_refer_fixture(tmp_path_factory.mktemp("refer"))
    return COCO(f"{paths['refer_root']}/refcoco/instances.json")


def _anns():
    return {a["id"]: a for a in annotations()}


def test_count_equals_sum_of_per_polygon_decodes():
    ann = _anns()[101]
    h, w = IMAGES[1]
    expected = sum(
        mask_utils.decode(mask_utils.frPyObjects([poly], h, w))[:, :, 0].astype(np.int64)
        for poly in ann["segmentation"]
    )
    cm = count_map(ann["segmentation"], h, w)
    np.testing.assert_array_equal(cm.count, expected)
    assert cm.kind == "polygons" and cm.num_polygons == 2
    assert cm.overlap_pixels == int((expected >= 2).sum()) > 0
    official = mask_from_count(cm.count, "official")
    assert official[expected == 2].sum() == 0  # overlap is background under 'official'
    assert mask_from_count(cm.count, "union")[expected == 2].all()


def test_union_equals_ann_to_mask(coco):
    for ann_id in GOOD:
        ann = coco.anns[ann_id]
        img = coco.imgs[ann["image_id"]]
        cm = count_map(ann["segmentation"], img["height"], img["width"])
        np.testing.assert_array_equal(
            mask_from_count(cm.count, "union"), coco.annToMask(ann), err_msg=str(ann_id)
        )


def test_rle_kinds():
    anns = _anns()
    h, w = IMAGES[2]
    assert count_map(anns[103]["segmentation"], h, w).kind == "rle"
    crowd = count_map(anns[104]["segmentation"], h, w)
    assert crowd.kind == "rle_uncompressed" and crowd.num_polygons == 0
    assert set(np.unique(crowd.count)) == {0, 1}


@pytest.mark.parametrize(
    "seg, message",
    [
        ([], "no polygons"),
        ([[]], "polygon 0 is empty"),
        ([[10, 10, 20, 20]], "no polygon has 3 or more points"),
        ([[1, 1, 5, 1, 5]], "odd number"),
        ([[1, 1, 5, 1, 5, float("nan")]], "non-finite"),
        ({"counts": [0, 5], "size": [3, 3]}, "RLE size 3x3 differs"),
        ([[100, 100, 120, 100, 120, 120]], "covers no pixel"),
        ("polygon", "not polygons or RLE"),
    ],
)
def test_bad_segmentations(seg, message):
    with pytest.raises(MaskError, match=message):
        count_map(seg, 32, 40)


def test_degenerate_polygon_is_reported_and_adds_nothing():
    seg = _anns()[106]["segmentation"]
    h, w = IMAGES[2]
    cm = count_map(seg, h, w)
    assert cm.degenerate_polygons == (1,) and cm.num_polygons == 2
    # refer.getMask: the whole list through frPyObjects, decoded and summed.
    expected = mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).sum(axis=2)
    np.testing.assert_array_equal(cm.count, expected)
