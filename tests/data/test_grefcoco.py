"""gRefCOCO -> ArrayRecord converter (magnet_jax/data/grefcoco.py) on the hand-built fixture."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from magnet_jax.data import grefcoco, records
from magnet_jax.data.tokenizer import load_tokenizer
from tests.data.fixtures.grefcoco_fixture import (
    BAD_CASES,
    IMAGES,
    build_grefcoco_fixture,
    grefs,
    write_json,
)


def run_convert(paths, out, *extra, grefs_path=None) -> int:
    return grefcoco.main(
        [
            "--grefs",
            grefs_path or paths["grefs"],
            "--instances",
            paths["instances"],
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
    return build_grefcoco_fixture(tmp_path_factory.mktemp("grefcoco"))


@pytest.fixture(scope="module")
def converted(fixture_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("records") / "grefcoco_unc"
    assert run_convert(fixture_paths, out, "--with-instances") == 0
    return out


def _records(out, split) -> dict[int, dict]:
    src = records.RecordSource(out, split)
    return {r["ref_id"]: r for r in (src[i] for i in range(len(src)))}


def _anns(paths) -> dict[int, dict]:
    inst = json.loads(Path(paths["instances"]).read_text())
    return {a["id"]: a for a in inst["annotations"]}


def _pycocotools_union(anns: list[dict], h: int, w: int) -> np.ndarray:
    """Union of the non-crowd annotations, decoded with pycocotools' own merge (annToMask)."""
    from pycocotools import mask as mask_utils

    out = np.zeros((h, w), bool)
    for a in anns:
        if a["iscrowd"]:
            continue
        seg = a["segmentation"]
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects([p for p in seg if len(p) >= 6], h, w))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, h, w)
        else:
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        out |= mask_utils.decode(rle).astype(bool)
    return out


def test_records_and_counts_per_split(converted):
    train, val = records.read_meta(converted, "train"), records.read_meta(converted, "val")
    assert sorted(train["ref_ids"]) == [1, 2, 3, 12] and sorted(val["ref_ids"]) == [4, 5, 6, 7]
    for meta in (train, val):
        assert (meta["dataset"], meta["split_by"]) == ("grefcoco", "unc")
        assert meta["mask_convention"] == "union" and meta["with_instances"] is True
        c = meta["counts"]
        assert (c["single_target_refs"], c["multi_target_refs"], c["no_target_refs"]) == (2, 1, 1)
        assert c["refs"] == 4 and c["images"] == 2
    assert train["counts"]["single_target_sentences"] == 3  # ref 1 has two sentences
    assert val["counts"]["multi_target_sentences"] == 2
    assert train["source_counts"]["refs"] == 5 and val["source_counts"]["refs"] == 6
    assert [(s["ref_id"], s["kind"]) for s in train["skipped_refs"]] == [(9, "missing_image")]
    assert sorted((s["ref_id"], s["kind"]) for s in val["skipped_refs"]) == [
        (10, "absent_ann"),
        (11, "crowd_only"),
    ]
    assert val["crowd_targets"] == [
        {"ref_id": 5, "ann_id": [204, 205, 206], "image_id": 2, "target": 205}
    ]
    assert {(r["ref_id"], r["target"]) for r in val["rle_targets"]} == {(4, 204), (5, 204)}
    assert train["degenerate_polygon_refs"][0]["ref_id"] == 12


def test_union_masks_are_pixel_exact(converted, fixture_paths):
    anns = _anns(fixture_paths)
    checked = 0
    for split in ("train", "val"):
        for ref in (r for r in grefs() if r["split"] == split):
            rec = _records(converted, split).get(ref["ref_id"])
            if rec is None or rec["no_target"]:
                continue
            ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
            h, w = IMAGES[ref["image_id"]][:2]
            want = _pycocotools_union([anns[i] for i in ids], h, w)
            for convention in records.MASK_CONVENTIONS:
                got = records.mask_from_count_png(rec["mask_count_png"], convention)
                np.testing.assert_array_equal(
                    got, want.astype(np.uint8), err_msg=f"ref_id={ref['ref_id']}"
                )
            checked += 1
    assert checked == 6
    # Ref 2 = ref 1's dog plus a second, overlapping one: larger than either, overlap counted.
    train = _records(converted, "train")
    one, both = (records.mask_from_count_png(train[i]["mask_count_png"]) for i in (1, 2))
    two = _pycocotools_union([anns[202]], *IMAGES[1][:2])
    assert both.sum() == (one | two).sum() < one.sum() + two.sum()
    assert records.read_meta(converted, "train")["counts"]["merged_overlap_pixels"] > 0
    assert train[2]["overlap_pixels"] == 0


def test_no_target_records(converted):
    for split, ref_id, image_id in (("train", 3, 1), ("val", 6, 3)):
        rec = _records(converted, split)[ref_id]
        assert rec["no_target"] == 1
        mask = records.mask_from_count_png(rec["mask_count_png"], "union")
        assert mask.shape == IMAGES[image_id][:2] and not mask.any()
        assert (rec["ann_id"], rec["category_id"], rec["num_polygons"]) == (-1, -1, 0)
        assert rec["target_ann_ids"].shape == (0,) and rec["target_bboxes"].shape == (0, 4)
        np.testing.assert_array_equal(rec["bbox"], np.zeros(4))
    assert _records(converted, "train")[1]["no_target"] == 0


def test_target_fields_and_text(converted, fixture_paths):
    val = _records(converted, "val")
    r5 = val[5]
    assert r5["target_ann_ids"].tolist() == [204, 205, 206]
    assert r5["target_iscrowd"].tolist() == [0, 1, 0] and r5["iscrowd"] == 1
    assert r5["target_category_ids"].tolist() == [3, 3, 3] and r5["category_name"] == "person"
    anns = _anns(fixture_paths)
    np.testing.assert_array_equal(r5["target_bboxes"], [anns[i]["bbox"] for i in (204, 205, 206)])
    # bbox encloses the masked (non-crowd) targets 204 [6,4,15,9] and 206 [25,2,13,10].
    np.testing.assert_array_equal(r5["bbox"], [6, 2, 32, 11])
    assert r5["area"] == 135.0 + 130.0
    assert val[4]["target_ann_ids"].tolist() == [204]  # a bare-int ann_id
    assert val[7]["image_file"].endswith(".png") and val[7]["height"] == IMAGES[3][0]
    r1 = _records(converted, "train")[1]
    assert r1["raw"] == ["The dog on the LEFT.", "big brown dog"]
    assert r1["sent"][0] == "the dog on the left"
    enc = load_tokenizer(None).batch_encode(r1["raw"], warn=False)
    np.testing.assert_array_equal(r1["input_ids"], enc.ids)
    assert r1["instance_ann_ids"].tolist() == [201, 202, 203]  # --with-instances


STRUCTURE_CASES = {
    # name -> (mutation of the refs list, text of the error)
    "empty_ann_id_unflagged": (
        lambda refs: refs[0].update(ann_id=[]),
        "no annotation and not flagged no-target (ann_id [-1] or no_target true): ref_id=1",
    ),
    "flag_contradicts_anns": (
        lambda refs: refs[1].update(no_target=True),
        "no_target true contradicts ann_id [201, 202]: ref_id=2",
    ),
    "flag_false_on_minus_one": (
        lambda refs: refs[5].update(no_target=False),
        "no_target false contradicts ann_id [-1]: ref_id=6",
    ),
    "minus_one_mixed": (
        lambda refs: refs[0].update(ann_id=[201, -1]),
        "ann_id mixes -1 (no target) with annotation ids: ref_id=1",
    ),
    "missing_key": (lambda refs: refs[3].pop("sentences"), "refs lacking 'sentences': ref_id=4"),
    "unknown_split": (
        lambda refs: refs[6].update(split="test"),
        "split not one of train, val, testA, testB: ref_id=7",
    ),
    "duplicate_ref_id": (lambda refs: refs[2].update(ref_id=1), "duplicate ref_id: ref_id=1"),
    "ann_id_string": (
        lambda refs: refs[0].update(ann_id="201"),
        "ann_id neither an int nor a list of ints: ref_id=1",
    ),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE_CASES))
def test_structure_errors_are_one_line_and_write_nothing(case, fixture_paths, tmp_path, capsys):
    mutate, text = STRUCTURE_CASES[case]
    refs = grefs()
    mutate(refs)
    path = write_json(tmp_path / "grefs(unc).json", refs)
    out = tmp_path / "out"
    assert run_convert(fixture_paths, out, grefs_path=path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and text in err, err
    assert not out.exists() or not list(out.iterdir())


def test_error_lists_ten_ref_ids_and_a_count(fixture_paths, tmp_path, capsys):
    refs = grefs(bad=())
    refs += [dict(refs[0], ref_id=100 + i, ann_id=[]) for i in range(13)]
    path = write_json(tmp_path / "g.json", refs)
    assert run_convert(fixture_paths, tmp_path / "out", grefs_path=path) == 2
    err = capsys.readouterr().err
    assert "ref_id=100, 101, 102, 103, 104, 105, 106, 107, 108, 109 (and 3 more)" in err
    # Not a list of refs at all.
    path = write_json(tmp_path / "h.json", {"refs": refs})
    assert run_convert(fixture_paths, tmp_path / "out", grefs_path=path) == 2
    assert "expected a JSON list of refs, got a dict" in capsys.readouterr().err


def test_an_empty_ann_id_flagged_no_target_is_accepted(fixture_paths, tmp_path):
    refs = grefs(bad=())
    refs[5].update(ann_id=[], no_target=True)  # ref 6
    path = write_json(tmp_path / "g.json", refs)
    assert run_convert(fixture_paths, tmp_path / "out", "--splits", "val", grefs_path=path) == 0
    assert _records(tmp_path / "out", "val")[6]["no_target"] == 1


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_strict_makes_bad_data_fatal(case, tmp_path, capsys):
    split, ref_id, _, _ = BAD_CASES[case]
    paths = build_grefcoco_fixture(tmp_path / "src", bad=(case,))
    out = tmp_path / "out"
    assert run_convert(paths, out, "--strict", "--splits", split) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"ref_id={ref_id}" in err, err
    assert not list(out.glob(f"{split}.*"))  # nothing half-written left behind
    assert run_convert(paths, out, "--splits", split) == 0  # without --strict: converted


def test_resume_redoes_a_killed_split(fixture_paths, tmp_path, capsys):
    assert run_convert(fixture_paths, tmp_path, "--splits", "val") == 0
    capsys.readouterr()
    assert run_convert(fixture_paths, tmp_path, "--splits", "val") == 0
    assert "val: already converted" in capsys.readouterr().err
    (tmp_path / "val.meta.json").unlink()  # a killed run leaves shards without meta.json
    leftover = tmp_path / "val.array_record-00000-of-00009.partial"
    leftover.write_bytes(b"half written")
    assert not records.is_complete(tmp_path, "val")
    assert run_convert(fixture_paths, tmp_path, "--splits", "val") == 0
    assert "already converted" not in capsys.readouterr().err
    assert records.is_complete(tmp_path, "val") and not leftover.exists()


def test_cli_errors(fixture_paths, tmp_path, capsys):
    assert run_convert(fixture_paths, tmp_path, "--splits", "testA") == 2
    assert "split 'testA' has no refs in grefs(unc).json (present: train, val)" in (
        capsys.readouterr().err
    )
    assert run_convert(fixture_paths, tmp_path, grefs_path=str(tmp_path / "none.json")) == 2
    assert "grefs file not found" in capsys.readouterr().err
    (tmp_path / "val.meta.json").write_text(
        json.dumps({"dataset": "refcoco", "split_by": "unc", "schema_version": 1, "shards": []})
    )
    assert run_convert(fixture_paths, tmp_path, "--splits", "val") == 2
    assert "holds refcoco unc records" in capsys.readouterr().err


def test_pickled_grefs_and_workers_give_identical_records(fixture_paths, converted, tmp_path):
    path = tmp_path / "grefs(unc).p"
    path.write_bytes(pickle.dumps(json.loads(Path(fixture_paths["grefs"]).read_text())))
    out = tmp_path / "out"
    assert (
        run_convert(
            fixture_paths, out, "--splits", "train", "--with-instances", "--workers", "2",
            grefs_path=str(path),
        )
        == 0
    )
    a, b = _records(converted, "train"), _records(out, "train")
    assert sorted(a) == sorted(b)
    for ref_id in a:
        assert records.encode_record(a[ref_id]) == records.encode_record(b[ref_id])


@pytest.mark.parametrize("answer", ["oracle", "always_empty"])
def test_evaluator_reports_gres_metrics(converted, answer):
    """A gRefCOCO split gets the GRES metrics from the evaluator: an oracle (the GT mask
    itself) scores 1 everywhere; always answering "no target" (an empty mask) gets every
    no-target sentence right and no target sentence."""
    import jax
    import jax.numpy as jnp

    from magnet_jax import sharding
    from magnet_jax.evaluation.evaluator import evaluate_split, has_no_target_field

    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])

    def eval_step(params, batch):
        gt = batch["mask"].astype(jnp.int32)
        pred = gt if answer == "oracle" else jnp.zeros_like(gt)
        inter = (pred * gt).sum(axis=(1, 2))
        union = jnp.maximum(pred, gt).sum(axis=(1, 2))
        coarse = jnp.where(pred[:, ::4, ::4] > 0, 10.0, -10.0)
        return inter, union, coarse

    split = "val"
    assert has_no_target_field(str(converted), split)
    metrics = evaluate_split(eval_step, None, str(converted), split, image_size=32,
                             global_batch=4, mesh=mesh, convention="union").metrics
    flags = [int(r["no_target"]) for r in _records(converted, split).values()
             for _ in r["sent_ids"]]
    n_nt, n_t = sum(flags), len(flags) - sum(flags)
    assert n_nt > 0 and n_t > 0, "the fixture's val split needs both kinds"
    assert metrics["gres/no_target_count"] == n_nt and metrics["gres/target_count"] == n_t
    assert metrics["gres/N-acc"] == 1.0
    if answer == "oracle":
        assert metrics["gres/T-acc"] == 1.0 and metrics["gres/gIoU"] == 1.0
        assert metrics["gres/cIoU"] == 1.0
    else:
        assert metrics["gres/T-acc"] == 0.0
        assert metrics["gres/gIoU"] == pytest.approx(n_nt / (n_nt + n_t))
        assert metrics["gres/cIoU"] == 0.0
