"""`python -m magnet_jax.data.inspect`: the JSON-lines contract (magnet_jax/data/inspect.py)."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from magnet_jax.data import convert, inspect
from tests.data.fixtures.refer_fixture import IMAGES, annotations, build_refer_fixture


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    paths = build_refer_fixture(tmp_path_factory.mktemp("refer"))
    out = tmp_path_factory.mktemp("records")
    rc = convert.main(
        [
            "--refer-root",
            paths["refer_root"],
            "--dataset",
            "refcoco",
            "--split-by",
            "unc",
            "--image-root",
            paths["image_root"],
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0
    return paths, out


def expected_mask(ann: dict, convention: str) -> np.ndarray:
    """Independent of magnet_jax: refer.getMask's per-polygon sum, or the RLE decode."""
    h, w = IMAGES[ann["image_id"]]
    seg = ann["segmentation"]
    if isinstance(seg, list):
        # refer.getMask: the whole polygon list through frPyObjects, decoded, summed.
        count = mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(int).sum(axis=2)
    else:
        rle = (
            mask_utils.frPyObjects(seg, h, w)
            if isinstance(seg["counts"], list)
            else {"size": seg["size"], "counts": seg["counts"].encode()}
        )
        count = mask_utils.decode(rle).astype(int)
    return ((count == 1) if convention == "official" else (count >= 1)).astype(np.uint8)


@pytest.mark.parametrize("convention", ["official", "union"])
def test_lines_match_independent_computation(converted, capsys, convention):
    paths, out = converted
    anns = {a["id"]: a for a in annotations()}
    with open(Path(paths["refer_root"]) / "refcoco" / "refs(unc).p", "rb") as f:
        refs = {r["ref_id"]: r for r in pickle.load(f)}
    seen = []
    for split in ("train", "val", "testA", "testB"):
        argv = [str(out), "--split", split] + (
            ["--mask-convention", "union"] if convention == "union" else []
        )
        assert inspect.main(argv) == 0
        for text in capsys.readouterr().out.strip().splitlines():
            line = json.loads(text)
            assert list(line) == [
                "ref_id",
                "ann_id",
                "image_id",
                "height",
                "width",
                "sentences",
                "mask_sum",
                "mask_sha1",
            ]
            ref = refs[line["ref_id"]]
            assert (line["ann_id"], line["image_id"]) == (ref["ann_id"], ref["image_id"])
            assert (line["height"], line["width"]) == IMAGES[ref["image_id"]]
            want_sents = [
                {"sent_id": s["sent_id"], "raw": s["raw"], "sent": s["sent"]}
                for s in ref["sentences"]
                if s["sent_id"] not in (101, 103)  # the empty sentences of ref 10
            ]
            assert line["sentences"] == want_sents
            mask = expected_mask(anns[ref["ann_id"]], convention)
            assert line["mask_sum"] == int(mask.sum())
            assert (
                line["mask_sha1"] == hashlib.sha1(np.ascontiguousarray(mask).tobytes()).hexdigest()
            )
            seen.append(line["ref_id"])
    assert sorted(seen) == [1, 2, 3, 4, 6, 10]


def test_overlap_changes_the_mask(converted, capsys):
    _, out = converted
    lines = {}
    for conv in ("official", "union"):
        inspect.main([str(out), "--split", "train", "--mask-convention", conv])
        lines[conv] = {
            json.loads(t)["ref_id"]: json.loads(t) for t in capsys.readouterr().out.split("\n") if t
        }
    assert lines["official"][1]["mask_sum"] < lines["union"][1]["mask_sum"]
    assert lines["official"][10]["mask_sha1"] == lines["union"][10]["mask_sha1"]


def test_summary(converted, capsys):
    _, out = converted
    assert inspect.main([str(out), "--summary"]) == 0
    rows = [json.loads(t) for t in capsys.readouterr().out.strip().splitlines()]
    got = {r["split"]: (r["refs"], r["images"], r["sentences"], r["skipped_refs"]) for r in rows}
    assert got == {
        "train": (2, 2, 3, 2),
        "val": (2, 1, 3, 0),
        "testA": (1, 1, 1, 1),
        "testB": (1, 1, 1, 1),
    }


def test_errors_are_one_line(converted, tmp_path, capsys):
    _, out = converted
    assert inspect.main([str(tmp_path / "missing"), "--split", "val"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: records directory not found: {tmp_path / 'missing'}"
    )
    assert inspect.main([str(out), "--split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "available: testA, testB, train, val" in err


def test_module_entry_point(converted):
    _, out = converted
    res = subprocess.run(
        [sys.executable, "-m", "magnet_jax.data.inspect", str(out), "--split", "testB"],
        check=False,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["ref_id"] == 4
