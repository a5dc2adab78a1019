"""Record schema v1, shard files and meta.json (magnet_jax/data/records.py)."""

from __future__ import annotations

import pickle

import grain
import numpy as np
import pytest

from magnet_jax.data import records as R


def make_record(ref_id: int, num_sents: int = 2) -> dict:
    count = np.zeros((4, 5), np.uint8)
    count[1:3, 1:4] = 1
    count[2, 2] = 2
    return {
        "schema_version": 1,
        "dataset": "refcoco",
        "split_by": "unc",
        "split": "val",
        "ref_id": ref_id,
        "ann_id": 100 + ref_id,
        "image_id": 7,
        "category_id": 3,
        "image_file": "x.jpg",
        "image_jpeg": b"\xff\xd8jpeg",
        "height": 4,
        "width": 5,
        "bbox": [1.0, 1.0, 3.0, 2.0],
        "area": 6.0,
        "iscrowd": 0,
        "mask_count_png": R.count_png(count),
        "num_polygons": 2,
        "overlap_pixels": 1,
        "sent_ids": list(range(num_sents)),
        "raw": [f"Raw {i}" for i in range(num_sents)],
        "sent": [f"raw {i}" for i in range(num_sents)],
        "input_ids": np.arange(num_sents * 20, dtype=np.int32).reshape(num_sents, 20),
        "attention_mask": np.ones((num_sents, 20), np.int8),
        "num_wordpieces": np.full((num_sents,), 5, np.int32),
    }


def test_round_trip_keeps_values_and_types():
    rec = make_record(3)
    out = R.decode_record(R.encode_record(rec))
    assert set(out) == set(rec)
    assert out["ref_id"] == 3 and isinstance(out["ref_id"], int)
    assert isinstance(out["area"], float) and out["raw"] == rec["raw"]
    assert out["image_jpeg"] == rec["image_jpeg"]
    assert out["bbox"].dtype == np.float32 and out["sent_ids"].dtype == np.int64
    assert out["attention_mask"].dtype == np.int8
    np.testing.assert_array_equal(out["input_ids"], rec["input_ids"])


def test_validation_errors_name_field_and_ref():
    rec = make_record(4)
    del rec["bbox"]
    with pytest.raises(R.RecordError, match=r"ref_id=4 lacks required fields: bbox"):
        R.encode_record(rec)
    rec = make_record(5)
    rec["raw"] = ["only one"]
    with pytest.raises(R.RecordError, match=r"ref_id=5: field 'raw' has 1 entries"):
        R.encode_record(rec)
    rec = make_record(6)
    rec["input_ids"] = np.zeros((2, 19), np.int32)
    with pytest.raises(R.RecordError, match="'input_ids' has 19 tokens"):
        R.encode_record(rec)
    with pytest.raises(R.RecordError, match="not a msgpack record|not a record"):
        R.decode_record(b"\x01garbage")


def test_mask_conventions_from_count_png():
    count = np.array([[0, 1, 2], [3, 1, 0]], np.uint8)
    png = R.count_png(count)
    np.testing.assert_array_equal(R.count_from_png(png), count)
    np.testing.assert_array_equal(R.mask_from_count_png(png, "official"), [[0, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(R.mask_from_count_png(png, "union"), [[0, 1, 1], [1, 1, 0]])
    assert R.mask_from_count_png(png).dtype == np.uint8
    with pytest.raises(ValueError, match="unknown mask convention 'max'"):
        R.mask_from_count_png(png, "max")


def test_shard_name():
    assert R.shard_name("train", 0, 16) == "train.array_record-00000-of-00016"
    assert R.shard_name("testA", 7, 8) == "testA.array_record-00007-of-00008"


def test_write_shards_round_robin_and_grain_source(tmp_path):
    recs = [make_record(i, 1 + i % 3) for i in range(7)]
    meta = R.write_shards(iter(recs), tmp_path, "val", 3, lambda: {"note": "x"})
    assert meta["note"] == "x" and meta["num_records"] == 7
    assert meta["shard_sizes"] == [3, 2, 2]
    # Shard-major record order: round-robin i -> shard i % 3.
    assert meta["ref_ids"] == [0, 3, 6, 1, 4, 2, 5]
    assert meta["sentence_counts"] == [1 + r % 3 for r in meta["ref_ids"]]
    assert not list(tmp_path.glob("*.partial"))
    src = R.RecordSource(tmp_path, "val")
    ds = grain.MapDataset.source(src)
    assert len(ds) == 7
    assert [ds[i]["ref_id"] for i in range(7)] == meta["ref_ids"]
    clone = pickle.loads(pickle.dumps(src))  # grain workers pickle the source
    assert clone[2]["ref_id"] == 6
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(R.shard_paths(tmp_path, "val")[0])
    assert "group_size:1" in reader.writer_options_string()
    reader.close()


def test_read_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="records directory not found"):
        R.read_meta(tmp_path / "nope", "val")
    R.write_shards([make_record(1)], tmp_path, "val", 1)
    with pytest.raises(FileNotFoundError, match=r"split 'train' not found .*available: val"):
        R.read_meta(tmp_path, "train")
    # A shard without meta.json (a killed run) is never complete.
    (tmp_path / (R.shard_name("train", 0, 2) + R.PARTIAL_SUFFIX)).write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="'train' .* is incomplete"):
        R.read_meta(tmp_path, "train")
    assert not R.is_complete(tmp_path, "train")
    # meta.json listing a shard that is gone: incomplete.
    (tmp_path / R.shard_name("val", 0, 1)).unlink()
    with pytest.raises(
        FileNotFoundError, match="incomplete: missing shard val.array_record-00000-of-00001"
    ):
        R.shard_paths(tmp_path, "val")


def test_write_shards_replaces_previous_output(tmp_path):
    R.write_shards([make_record(i) for i in range(4)], tmp_path, "val", 4)
    (tmp_path / "val.array_record-00000-of-00002.partial").write_bytes(b"junk")
    R.write_shards([make_record(9)], tmp_path, "val", 1)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["val.array_record-00000-of-00001", "val.meta.json"]
    assert R.RecordSource(tmp_path, "val")[0]["ref_id"] == 9
