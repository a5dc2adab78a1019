"""Instance masks (MaIL): InstanceSpec, gt/detector selection, add_detections, Preprocess."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from magnet_jax.data import add_detections as add_dets
from magnet_jax.data import pipeline, records, synthetic
from magnet_jax.data.instances import (
    InstanceSpec,
    MissingInstancesError,
    check_split_has_instances,
    instance_masks,
)
from magnet_jax.data.transforms import Augment, Preprocess

SIZE = 48   # synthetic image size
S = 32      # model input size


def _box(h, w, y0, y1, x0, x1, value=1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def _gt_record(masks, crowd, h=10, w=12):
    return {"ref_id": 1, "image_id": 2, "height": h, "width": w,
            "instance_count_pngs": [records.count_png(m) for m in masks],
            "instance_iscrowd": np.asarray(crowd, np.int8)}


def _det_record(masks, scores, valid, h=10, w=12):
    return {"ref_id": 1, "image_id": 2, "height": h, "width": w,
            "det_mask_pngs": [records.count_png(m) for m in masks],
            "det_scores": np.asarray(scores, np.float32),
            "det_category_ids": np.arange(1, len(masks) + 1, dtype=np.int32),
            "det_valid": np.asarray(valid, np.int8)}


def test_instance_spec_is_validated():
    assert InstanceSpec(3) == InstanceSpec(3, "gt")
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="num"):
            InstanceSpec(bad)
    with pytest.raises(ValueError, match="unknown instance source 'sam'"):
        InstanceSpec(2, "sam")


def test_gt_keeps_the_largest_non_crowd_instances_and_pads():
    a10 = _box(10, 12, 0, 2, 0, 5)       # area 10
    crowd = _box(10, 12, 0, 10, 0, 5)    # area 50, crowd: skipped
    a30 = _box(10, 12, 0, 5, 6, 12)      # area 30
    empty = np.zeros((10, 12), np.uint8)  # e.g. a bad polygon the converter stored empty
    a20 = _box(10, 12, 6, 10, 0, 5)      # area 20
    rec = _gt_record([a10, crowd, a30, empty, a20], [0, 1, 0, 0, 0])
    masks, valid = instance_masks(rec, InstanceSpec(2))
    assert masks.shape == (2, 10, 12) and masks.dtype == np.uint8 and valid.dtype == np.int32
    np.testing.assert_array_equal(masks, [a30, a20])
    np.testing.assert_array_equal(valid, [1, 1])
    masks, valid = instance_masks(rec, InstanceSpec(5))
    np.testing.assert_array_equal(masks, [a30, a20, a10, empty, empty])
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 0])
    # Count maps: union (default) = count > 0, official = count == 1.
    two = _box(10, 12, 0, 4, 0, 4) + _box(10, 12, 0, 2, 0, 2)
    rec = _gt_record([two], [0])
    assert instance_masks(rec, InstanceSpec(1))[0].sum() == 16
    assert instance_masks(rec, InstanceSpec(1), "official")[0].sum() == 12


def test_detector_keeps_the_top_scores_and_pads():
    ms = [_box(10, 12, 0, i + 1, 0, 1) for i in range(4)]
    rec = _det_record(ms, [0.9, 0.3, 0.95, 0.5], [1, 1, 1, 0])
    masks, valid = instance_masks(rec, InstanceSpec(2, "detector"))
    np.testing.assert_array_equal(masks, [ms[2], ms[0]])
    np.testing.assert_array_equal(valid, [1, 1])
    masks, valid = instance_masks(rec, InstanceSpec(5, "detector"))
    np.testing.assert_array_equal(masks[:3], [ms[2], ms[0], ms[1]])  # ms[3] is padding
    assert not masks[3:].any()
    np.testing.assert_array_equal(valid, [1, 1, 1, 0, 0])


def test_missing_fields_name_the_flag_or_the_tool():
    rec = {"ref_id": 7, "image_id": 8, "height": 4, "width": 4}
    with pytest.raises(MissingInstancesError, match=r"ref_id=7 image_id=8 .*--with-instances"):
        instance_masks(rec, InstanceSpec(2))
    with pytest.raises(MissingInstancesError,
                       match=r"ref_id=7 .*python -m magnet_jax.data.add_detections"):
        instance_masks(rec, InstanceSpec(2, "detector"))


def test_wrong_mask_size_names_the_ids_and_sizes():
    rec = _gt_record([np.ones((8, 8), np.uint8)], [0], h=10, w=12)
    with pytest.raises(ValueError, match=r"ref_id=1 image_id=2: .*8x8 .*10x12"):
        instance_masks(rec, InstanceSpec(1))
    rec = _det_record([np.ones((8, 8), np.uint8)], [0.5], [1], h=10, w=12)
    with pytest.raises(ValueError, match=r"ref_id=1 image_id=2: det_mask_pngs\[0\] .*8x8 .*10x12"):
        instance_masks(rec, InstanceSpec(1, "detector"))


# ------------------------------------------------------------------------------------------
# add_detections on a tiny synthetic split.
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    synthetic.generate(out, num_train=0, num_val=5, num_heldout=0, image_size=SIZE, seed=0,
                       num_shards=2)
    return out


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}


def _results(data_dir):
    """Per image: its object masks as detections (scores rising with the index), one below 0.2."""
    src = records.RecordSource(data_dir, "val")
    dets, expect = [], {}
    for i in range(len(src)):
        rec = src[i]
        ms = [records.count_from_png(p) for p in rec["instance_count_pngs"]]
        for k, m in enumerate(ms):
            dets.append({"image_id": rec["image_id"], "category_id": 10 + k,
                         "segmentation": _rle(m), "score": 0.3 + 0.1 * k})
        dets.append({"image_id": rec["image_id"], "category_id": 99,
                     "segmentation": _rle(np.ones_like(ms[0])), "score": 0.1})
        expect[rec["image_id"]] = ms[::-1]  # highest score first
    return dets, expect


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_add_detections_end_to_end(data_dir, tmp_path):
    dets, expect = _results(data_dir)
    results = _write(tmp_path / "dets.json", dets)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    assert add_dets.main(["--data", str(data_dir), "--split", "val", "--results", str(results),
                          "--detector", "toy", "--top-k", "8", "--score-threshold", "0.2",
                          "--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in data_dir.iterdir()} == before  # input untouched
    src_meta, meta = records.read_meta(data_dir, "val"), records.read_meta(out, "val")
    assert meta["ref_ids"] == src_meta["ref_ids"] and meta["shards"] == src_meta["shards"]
    assert meta["shard_sizes"] == src_meta["shard_sizes"] and meta["with_instances"] is True
    d = meta["detections"]
    assert (d["detector"], d["results_file"], d["top_k"], d["score_threshold"]) == \
        ("toy", "dets.json", 8, 0.2)
    assert len(d["results_sha256"]) == 64
    assert d["counts"]["detections_below_threshold"] == 5
    assert d["counts"]["images_with_detections"] == d["counts"]["images"] == 5
    src, new = records.RecordSource(data_dir, "val"), records.RecordSource(out, "val")
    for i in range(len(src)):
        a, b = src[i], new[i]
        assert a["image_jpeg"] == b["image_jpeg"] and a["ref_id"] == b["ref_id"]
        n = len(expect[b["image_id"]])
        assert len(b["det_mask_pngs"]) == 8
        np.testing.assert_array_equal(b["det_valid"], [1] * n + [0] * (8 - n))
        assert list(b["det_category_ids"][:n]) == list(range(10 + n - 1, 9, -1))
        assert (np.diff(b["det_scores"][:n]) < 0).all() and not b["det_scores"][n:].any()
        for k, m in enumerate(expect[b["image_id"]]):
            np.testing.assert_array_equal(records.count_from_png(b["det_mask_pngs"][k]), m)
    # Through the pipeline: the split check and the per-example masks.
    rec = new[0]
    spec = InstanceSpec(3, "detector")
    ex = Preprocess(S, instances=spec)({"record": rec, "sent_index": 0, "weight": 1.0})
    assert ex["instance_masks"].shape == (3, S, S) and ex["instance_masks"].dtype == np.uint8
    np.testing.assert_array_equal(ex["instance_valid"], [1, 1, 1])
    native, _ = instance_masks(rec, spec)
    for k in range(3):
        np.testing.assert_array_equal(
            ex["instance_masks"][k], np.asarray(Image.fromarray(native[k]).resize((S, S),
                                                                                   Image.NEAREST)))
    batch = next(iter(pipeline.eval_dataset(out, "val", image_size=S, global_batch=4,
                                            instances=spec, process_index=0, process_count=1)))
    assert batch["instance_masks"].shape == (4, 3, S, S)
    assert batch["instance_valid"].shape == (4, 3) and batch["instance_valid"].dtype == np.int32
    with pytest.raises(MissingInstancesError, match=r"split val\) have no detector .*add_detections"):
        pipeline.eval_dataset(data_dir, "val", image_size=S, global_batch=4, instances=spec,
                              process_index=0, process_count=1)
    # An existing output is kept without --overwrite; the output dir may not be the input.
    with pytest.raises(add_dets.DetectionsError, match="already exist.*--overwrite"):
        add_dets.add_detections(data_dir, ["val"], results, "toy", out)
    add_dets.add_detections(data_dir, ["val"], results, "toy", out, overwrite=True, top_k=2)
    assert records.read_meta(out, "val")["detections"]["top_k"] == 2
    with pytest.raises(add_dets.DetectionsError, match="is the input directory"):
        add_dets.add_detections(data_dir, ["val"], results, "toy", data_dir)


def test_add_detections_input_errors(data_dir, tmp_path, capsys):
    dets, _ = _results(data_dir)
    out = tmp_path / "out"
    unknown = _write(tmp_path / "unknown.json",
                     dets + [dict(dets[0], image_id=i) for i in range(900001, 900013)])
    with pytest.raises(add_dets.DetectionsError,
                       match=r"12 image id\(s\) not in split\(s\) val .*900001, .*, \.\.\. "
                             r"\(use --ignore-unknown-images"):
        add_dets.add_detections(data_dir, ["val"], unknown, "toy", out)
    assert add_dets.main(["--data", str(data_dir), "--split", "val", "--results", str(unknown),
                          "--detector", "toy", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "900001" in err[0]
    meta = add_dets.add_detections(data_dir, ["val"], unknown, "toy", out,
                                   ignore_unknown_images=True)["val"]
    assert meta["detections"]["counts"]["detections_unknown_image"] == 12

    bad = dict(dets[3], segmentation=_rle(np.ones((SIZE + 1, SIZE), np.uint8)))
    wrong = _write(tmp_path / "wrong.json", dets[:3] + [bad])
    with pytest.raises(add_dets.DetectionsError,
                       match=rf"image_id={bad['image_id']} detection 3 has RLE size "
                             rf"{SIZE + 1}x{SIZE}, the image is {SIZE}x{SIZE}"):
        add_dets.add_detections(data_dir, ["val"], wrong, "toy", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()

    out = tmp_path / "out3"

    with pytest.raises(add_dets.DetectionsError, match=r"results file not found: .*nope\.json"):
        add_dets.add_detections(data_dir, ["val"], tmp_path / "nope.json", "toy", out)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(add_dets.DetectionsError, match=r"cannot read results file .*broken\.json"):
        add_dets.add_detections(data_dir, ["val"], broken, "toy", out)
    nolist = _write(tmp_path / "dict.json", {"annotations": []})
    with pytest.raises(add_dets.DetectionsError, match=r"dict\.json is not a JSON list"):
        add_dets.add_detections(data_dir, ["val"], nolist, "toy", out)
    noseg = _write(tmp_path / "noseg.json", [{"image_id": 1, "category_id": 1, "score": 1.0}])
    with pytest.raises(add_dets.DetectionsError, match=r"noseg\.json: detection 0 lacks segmentation"):
        add_dets.add_detections(data_dir, ["val"], noseg, "toy", out)


def test_add_detections_failing_midway_leaves_no_split(data_dir, tmp_path, monkeypatch):
    dets, _ = _results(data_dir)
    results = _write(tmp_path / "dets.json", dets)
    calls = {"n": 0}
    real = add_dets._decode_rle

    def flaky(det):
        calls["n"] += 1
        if calls["n"] > 6:  # after the first records are written
            raise RuntimeError("disk on fire")
        return real(det)

    monkeypatch.setattr(add_dets, "_decode_rle", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        add_dets.add_detections(data_dir, ["val"], results, "toy", out)
    assert not records.is_complete(out, "val")
    assert not records.meta_path(out, "val").exists()
    assert not list(out.glob("val.array_record-*"))  # partial shards removed too
    with pytest.raises(FileNotFoundError, match="not found"):
        records.RecordSource(out, "val")


# ------------------------------------------------------------------------------------------
# Preprocess and the pipeline with ground-truth instances (synthetic data has them).
# ------------------------------------------------------------------------------------------


def test_split_check(data_dir, tmp_path):
    assert check_split_has_instances(data_dir, "val", InstanceSpec(4))["with_instances"] is True
    rec = synthetic.make_example(0, "val", 0, SIZE)
    rec.pop("synthetic")
    for k in [k for k in rec if k.startswith("instance_")]:
        rec.pop(k)
    from magnet_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None).batch_encode(rec["raw"], warn=False)
    rec.update(input_ids=tok.ids, attention_mask=tok.attention_mask.astype(np.int8),
               num_wordpieces=(tok.num_pieces + 2).astype(np.int32))
    records.write_shards([rec], tmp_path, "val", 1, meta={"with_instances": False})
    with pytest.raises(MissingInstancesError,
                       match=r"records in .* \(split val\) have no instance masks: convert with "
                             r"--with-instances .*add_detections"):
        check_split_has_instances(tmp_path, "val", InstanceSpec(4))
    with pytest.raises(MissingInstancesError, match="--with-instances"):
        pipeline.train_dataset(tmp_path, "val", image_size=S, global_batch=1, seed=0,
                               instances=InstanceSpec(4), process_index=0, process_count=1)


def test_augmentation_moves_instances_with_the_mask(data_dir):
    rec = records.RecordSource(data_dir, "val")[0]
    rec = dict(rec, raw=["the thing"] * len(rec["raw"]))  # no left/right word: flips allowed
    spec = InstanceSpec(6)
    native, valid = instance_masks(rec, spec)
    target = records.mask_from_count_png(rec["mask_count_png"])
    slot = next(k for k in range(6) if valid[k] and (native[k] == target).all())
    item = {"record": rec, "sent_index": 0, "weight": 1.0}
    with_inst = Preprocess(S, augment=Augment(min_scale=0.6), instances=spec)
    plain = Preprocess(S, augment=Augment(min_scale=0.6))
    flips = 0
    for seed in range(8):
        a = with_inst(item, np.random.default_rng(seed))
        b = plain(item, np.random.default_rng(seed))
        assert set(b) == set(a) - {"instance_masks", "instance_valid"}
        for k in b:  # the same random stream: instances change nothing else
            np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a["instance_masks"][slot], a["mask"])
        assert a["instance_valid"][slot] == 1
        assert not a["instance_masks"][~a["instance_valid"].astype(bool)].any()
        flips += bool(a["flipped"])
    assert 0 < flips < 8


def test_train_dataset_with_gt_instances(data_dir):
    ds = pipeline.train_dataset(data_dir, "val", image_size=S, global_batch=2, seed=0,
                                augment=Augment(), instances=InstanceSpec(4),
                                process_index=0, process_count=1)
    batch = ds[0]
    assert batch["instance_masks"].shape == (2, 4, S, S)
    assert batch["instance_valid"].shape == (2, 4) and batch["instance_valid"][:, :3].all()
    plain = pipeline.train_dataset(data_dir, "val", image_size=S, global_batch=2, seed=0,
                                   augment=Augment(), process_index=0, process_count=1)[0]
    assert "instance_masks" not in plain
    np.testing.assert_array_equal(plain["image"], batch["image"])
