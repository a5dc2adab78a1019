"""Per-example transforms: output contract, mask conventions, the no-mirror rule, pickling."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from magnet_jax.data import records, synthetic
from magnet_jax.data.images import preprocess_image
from magnet_jax.data.tokenizer import load_tokenizer
from magnet_jax.data.transforms import Augment, PickSentence, Preprocess, has_left_right

SIZE = 48


@pytest.fixture(scope="module")
def record():
    rec = synthetic.make_example(0, "train", 5, 64, load_tokenizer(None))
    rec.pop("synthetic")
    return records.decode_record(records.encode_record(rec))


def _item(rec, j=0, weight=1.0):
    return {"record": rec, "sent_index": j, "weight": weight}


def _with_sentence(rec, raw: str) -> dict:
    tok = load_tokenizer(None).batch_encode([raw])
    return dict(rec, raw=[raw], sent=[raw.lower()], sent_ids=np.asarray([7], np.int64),
                input_ids=tok.ids, attention_mask=tok.attention_mask.astype(np.int8))


@pytest.mark.parametrize("text,expected", [
    ("the man on the left", True), ("Rightmost cup", True), ("left-hand chair", True),
    ("guy to the RIGHT", True), ("the bright red car", False), ("the small blue star", False),
    ("second from the top", False),
])
def test_has_left_right(text, expected):
    assert has_left_right(text) is expected


def test_preprocess_contract(record):
    out = Preprocess(SIZE)(_item(record, 0))
    assert out["image"].shape == (SIZE, SIZE, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (SIZE, SIZE) and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 1} and out["mask"].sum() > 0
    assert out["ids"].dtype == np.int32 and out["att"].dtype == np.int32
    assert out["ids"].shape == out["att"].shape == (20,)
    np.testing.assert_array_equal(out["ids"], record["input_ids"][0])
    assert out["ref_id"] == record["ref_id"] and out["sent_id"] == record["sent_ids"][0]
    assert out["weight"] == 1.0 and not out["flipped"]
    img = Image.open(io.BytesIO(record["image_jpeg"])).convert("RGB")
    np.testing.assert_array_equal(out["image"], preprocess_image(img, SIZE))
    mask = records.mask_from_count_png(record["mask_count_png"])
    np.testing.assert_array_equal(
        out["mask"], np.asarray(Image.fromarray(mask).resize((SIZE, SIZE), Image.NEAREST)))
    assert Preprocess(SIZE)(_item(record, 0, 0.0))["weight"] == 0.0


def test_mask_conventions(record):
    count = np.zeros((64, 64), np.uint8)
    count[10:30, 10:30] = 1
    count[20:30, 20:30] = 2  # overlapping polygons
    rec = dict(record, mask_count_png=records.count_png(count))
    official = Preprocess(64, "official")(_item(rec))["mask"]
    union = Preprocess(64, "union")(_item(rec))["mask"]
    assert official.sum() == 400 - 100 and union.sum() == 400
    with pytest.raises(ValueError, match="convention"):
        Preprocess(64, "bogus")


def test_pick_sentence_is_seeded_and_covers_all(record):
    rec = dict(record, sent_ids=np.arange(3, dtype=np.int64))
    picks = [PickSentence()(rec, np.random.default_rng(i))["sent_index"] for i in range(40)]
    assert set(picks) == {0, 1, 2}
    assert picks == [PickSentence()(rec, np.random.default_rng(i))["sent_index"] for i in range(40)]


def test_never_mirrors_left_right_sentences(record):
    flip_only = Augment(min_scale=1.0, brightness=0, contrast=0, saturation=0, flip_prob=1.0)
    plain = Preprocess(SIZE)
    for raw in ("the leftmost star", "the red circle to the right of the square"):
        rec = _with_sentence(record, raw)
        for seed in range(5):
            out = Preprocess(SIZE, augment=flip_only)(_item(rec), np.random.default_rng(seed))
            assert not out["flipped"]
            np.testing.assert_array_equal(out["mask"], plain(_item(rec))["mask"])
            np.testing.assert_allclose(out["image"], plain(_item(rec))["image"], atol=1e-5)
    rec = _with_sentence(record, "the large green star")
    out = Preprocess(SIZE, augment=flip_only)(_item(rec), np.random.default_rng(0))
    assert out["flipped"]  # mirrored at native resolution, then resized
    mirror = Image.FLIP_LEFT_RIGHT
    img = Image.open(io.BytesIO(rec["image_jpeg"])).convert("RGB").transpose(mirror)
    mask = Image.fromarray(records.mask_from_count_png(rec["mask_count_png"])).transpose(mirror)
    np.testing.assert_array_equal(out["mask"], np.asarray(mask.resize((SIZE, SIZE), 0)))
    np.testing.assert_allclose(out["image"], preprocess_image(img, SIZE), atol=1e-5)


def test_augmentation_is_seeded_and_keeps_shapes(record):
    prep = Preprocess(SIZE, augment=Augment())
    a = prep(_item(record), np.random.default_rng(1))
    b = prep(_item(record), np.random.default_rng(1))
    c = prep(_item(record), np.random.default_rng(2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (SIZE, SIZE, 3) and a["mask"].shape == (SIZE, SIZE)
    with pytest.raises(ValueError, match="min_scale"):
        Augment(min_scale=0)


def test_transforms_pickle(record):
    for t in (PickSentence(), Preprocess(SIZE), Preprocess(SIZE, "union", Augment())):
        clone = pickle.loads(pickle.dumps(t))
        assert type(clone) is type(t)
    prep = pickle.loads(pickle.dumps(Preprocess(SIZE)))
    np.testing.assert_array_equal(prep(_item(record))["image"],
                                  Preprocess(SIZE)(_item(record))["image"])
