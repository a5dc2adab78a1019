"""REFER -> ArrayRecord converter (magnet_jax/data/convert.py) on the hand-built fixture."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import grain
import numpy as np
import pytest

from magnet_jax.data import convert, records
from magnet_jax.data.tokenizer import load_tokenizer
from tests.data.fixtures.refer_fixture import BAD_CASES, build_refer_fixture


def run_convert(paths, out, *extra, dataset="refcoco", split_by="unc") -> int:
    return convert.main(
        [
            "--refer-root",
            paths["refer_root"],
            "--dataset",
            dataset,
            "--split-by",
            split_by,
            "--image-root",
            paths["image_root"],
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def fixture_paths(tmp_path_factory):
    return build_refer_fixture(tmp_path_factory.mktemp("refer"))


@pytest.fixture(scope="module")
def converted(fixture_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "refcoco_unc"
    assert run_convert(fixture_paths, out, "--with-instances") == 0
    return out


def _pickle(paths, dataset="refcoco", split_by="unc"):
    with open(Path(paths["refer_root"]) / dataset / f"refs({split_by}).p", "rb") as f:
        return pickle.load(f)


def _all_records(out, split):
    src = records.RecordSource(out, split)
    return [src[i] for i in range(len(src))]


def test_split_membership_and_skipped_refs(converted, fixture_paths):
    refs = _pickle(fixture_paths)
    kept = ("empty_sentence", "degenerate_polygon")
    bad_refs = {case[1]: name for name, case in BAD_CASES.items() if name not in kept}
    for split in ("train", "val", "testA", "testB"):
        meta = records.read_meta(converted, split)
        want = [r["ref_id"] for r in refs if r["split"] == split and r["ref_id"] not in bad_refs]
        recs = _all_records(converted, split)
        assert sorted(r["ref_id"] for r in recs) == sorted(want)
        assert [r["ref_id"] for r in recs] == meta["ref_ids"]
        assert [len(r["sent_ids"]) for r in recs] == meta["sentence_counts"]
        assert {s["ref_id"] for s in meta["skipped_refs"]} == {
            rid for rid, name in bad_refs.items() if BAD_CASES[name][0] == split
        }
        assert all(r["split"] == split for r in recs)
        assert meta["source_counts"]["refs"] == sum(r["split"] == split for r in refs)
        assert meta["count_check"]["checked"] is False  # fixture-sized
        assert len(meta["sources"]["refs"]["sha256"]) == 64
    train = records.read_meta(converted, "train")
    kinds = {s["ref_id"]: s["kind"] for s in train["skipped_refs"]}
    assert kinds == {5: "bad_segmentation", 7: "missing_image"}
    assert train["skipped_sentences"] == [
        {"ref_id": 10, "ann_id": 109, "image_id": 2, "sent_id": i, "reason": "empty sentence"}
        for i in (101, 103)
    ]
    assert {s["kind"] for s in records.read_meta(converted, "testA")["skipped_refs"]} == {
        "corrupt_image"
    }
    assert {s["kind"] for s in records.read_meta(converted, "testB")["skipped_refs"]} == {
        "absent_ann"
    }
    val = records.read_meta(converted, "val")
    assert val["skipped_refs"] == []
    assert val["degenerate_polygon_refs"] == [
        {"ref_id": 6, "ann_id": 106, "image_id": 2, "polygons": [1]}
    ]


def test_record_contents(converted, fixture_paths):
    refs = {r["ref_id"]: r for r in _pickle(fixture_paths)}
    tok = load_tokenizer(None)
    by_id = {
        r["ref_id"]: r
        for s in ("train", "val", "testA", "testB")
        for r in _all_records(converted, s)
    }
    r1 = by_id[1]
    image_bytes = (
        Path(fixture_paths["image_root"]) / "COCO_train2014_000000000001.jpg"
    ).read_bytes()
    assert r1["image_jpeg"] == image_bytes  # original bytes, not re-encoded
    assert (r1["height"], r1["width"], r1["image_id"], r1["ann_id"], r1["category_id"]) == (
        40,
        48,
        1,
        101,
        1,
    )
    assert r1["raw"] == [s["raw"] for s in refs[1]["sentences"]]
    assert r1["sent"] == [s["sent"] for s in refs[1]["sentences"]]
    assert r1["raw"][0] != r1["sent"][0]
    enc = tok.batch_encode(r1["raw"], warn=False)
    np.testing.assert_array_equal(r1["input_ids"], enc.ids)
    np.testing.assert_array_equal(r1["attention_mask"], enc.attention_mask)
    assert r1["num_wordpieces"][1] > 20  # the long sentence is truncated, its length kept
    np.testing.assert_array_equal(r1["bbox"], [5, 5, 35, 30])
    assert r1["num_polygons"] == 2 and r1["overlap_pixels"] > 0
    official = records.mask_from_count_png(r1["mask_count_png"], "official")
    union = records.mask_from_count_png(r1["mask_count_png"], "union")
    assert union.sum() - official.sum() == r1["overlap_pixels"]
    # --with-instances: every annotation of image 1.
    assert list(r1["instance_ann_ids"]) == [101, 102]
    assert r1["instance_category_names"] == ["dog", "kite"]
    np.testing.assert_array_equal(
        records.count_from_png(r1["instance_count_pngs"][0]),
        records.count_from_png(r1["mask_count_png"]),
    )
    assert by_id[4]["iscrowd"] == 1
    assert by_id[10]["sent_ids"].tolist() == [102]
    # Image 1 appears in train (ref 1) and testA (ref 2).
    assert by_id[2]["split"] == "testA" and by_id[2]["image_id"] == 1
    meta_val = records.read_meta(converted, "val")
    assert meta_val["rle_refs"] == [{"ref_id": 3, "ann_id": 103, "image_id": 2, "kind": "rle"}]
    meta_b = records.read_meta(converted, "testB")
    assert meta_b["crowd_ref_ids"] == [4] and meta_b["rle_refs"][0]["kind"] == "rle_uncompressed"
    assert records.read_meta(converted, "train")["counts"]["truncated_sentences"] == 1


def test_grain_reads_the_shards(converted):
    ds = grain.MapDataset.source(records.RecordSource(converted, "train"))
    assert len(ds) == 2
    assert {ds[i]["ref_id"] for i in range(2)} == {1, 10}


def test_same_ann_id_other_dataset(fixture_paths, tmp_path):
    assert run_convert(fixture_paths, tmp_path, "--splits", "train", dataset="refcoco+") == 0
    rec = records.RecordSource(tmp_path, "train")[0]
    assert (rec["dataset"], rec["ref_id"], rec["ann_id"]) == ("refcoco+", 501, 101)
    # One --out per (dataset, split_by).
    assert run_convert(fixture_paths, tmp_path, "--splits", "val") == 2


def test_resume_skips_and_redoes_partial_splits(fixture_paths, tmp_path, capsys):
    assert run_convert(fixture_paths, tmp_path, "--splits", "val", "testB") == 0
    shard = tmp_path / "val.array_record-00000-of-00002"
    before = shard.stat().st_mtime_ns
    capsys.readouterr()
    assert run_convert(fixture_paths, tmp_path, "--splits", "val", "testB") == 0
    err = capsys.readouterr().err
    assert "val: already converted" in err and "testB: already converted" in err
    assert shard.stat().st_mtime_ns == before
    # A killed run: meta.json gone, a partial shard left behind.
    (tmp_path / "val.meta.json").unlink()
    leftover = tmp_path / "val.array_record-00001-of-00008.partial"
    leftover.write_bytes(b"half written")
    assert not records.is_complete(tmp_path, "val")
    assert run_convert(fixture_paths, tmp_path, "--splits", "val") == 0
    assert "val: already converted" not in capsys.readouterr().err
    assert not leftover.exists()
    assert records.is_complete(tmp_path, "val")
    assert sorted(p.name for p in tmp_path.glob("val.*")) == [
        "val.array_record-00000-of-00002",
        "val.array_record-00001-of-00002",
        "val.meta.json",
    ]
    # Other options: converted again.
    assert (
        run_convert(fixture_paths, tmp_path, "--splits", "val", "--mask-convention", "union") == 0
    )
    assert records.read_meta(tmp_path, "val")["mask_convention"] == "union"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_strict_makes_bad_input_fatal(case, tmp_path, capsys):
    split, ref_id, ann_id, image_id = BAD_CASES[case]
    paths = build_refer_fixture(tmp_path / "refer", bad=(case,))
    out = tmp_path / "out"
    assert run_convert(paths, out, "--strict", "--splits", split) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ")
    assert f"ref_id={ref_id} ann_id={ann_id} image_id={image_id}" in err
    assert not records.is_complete(out, split)
    assert not list(out.glob(f"{split}.*"))  # nothing half-written left behind
    # Without --strict the same input converts, skipping the bad part.
    assert run_convert(paths, out, "--splits", split) == 0
    assert records.is_complete(out, split)


def test_cli_errors_are_one_line(fixture_paths, tmp_path, capsys):
    assert run_convert(fixture_paths, tmp_path, split_by="google") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refs(google).p" in err and "refs(unc).p" in err
    assert run_convert(fixture_paths, tmp_path, "--splits", "test") == 2
    assert "not a split of refcoco unc" in capsys.readouterr().err


def test_count_check_on_full_sized_input(fixture_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(convert, "FULL_DATASET_MIN_REFS", 1)
    assert run_convert(fixture_paths, tmp_path, "--splits", "testB") == 0
    assert "refcoco unc train: 4 refs, expected 42404" in capsys.readouterr().err
    meta = records.read_meta(tmp_path, "testB")
    assert meta["count_check"]["checked"] and meta["count_check"]["mismatches"]
    assert run_convert(fixture_paths, tmp_path / "s", "--splits", "testB", "--strict") == 2
    assert "counts differ from the published ones" in capsys.readouterr().err


def test_workers_give_identical_records(fixture_paths, converted, tmp_path):
    assert (
        run_convert(
            fixture_paths, tmp_path, "--splits", "train", "--with-instances", "--workers", "2"
        )
        == 0
    )
    a, b = _all_records(converted, "train"), _all_records(tmp_path, "train")
    assert records.encode_record(a[0]) == records.encode_record(b[0])
    assert [r["ref_id"] for r in a] == [r["ref_id"] for r in b]
    ma, mb = records.read_meta(converted, "train"), records.read_meta(tmp_path, "train")
    assert json.dumps(ma["counts"]) == json.dumps(mb["counts"])


def test_token_ids_agree_with_a_second_tokenizer(converted):
    # data_formats.md §7.5.6: re-tokenise every stored sentence with another implementation.
    from tokenizers import BertWordPieceTokenizer

    from magnet_jax.data.tokenizer import DEFAULT_VOCAB

    second = BertWordPieceTokenizer(str(DEFAULT_VOCAB), lowercase=True)
    checked = 0
    for split in ("train", "val", "testA", "testB"):
        for rec in _all_records(converted, split):
            for raw, ids, mask, n in zip(
                rec["raw"], rec["input_ids"], rec["attention_mask"], rec["num_wordpieces"]
            ):
                full = second.encode(raw).ids
                assert n == len(full), raw
                kept = full[: records.MAX_TOKENS]
                assert ids.tolist() == kept + [0] * (records.MAX_TOKENS - len(kept)), raw
                assert mask.tolist() == [1] * len(kept) + [0] * (records.MAX_TOKENS - len(kept))
                checked += 1
    assert checked == 8
