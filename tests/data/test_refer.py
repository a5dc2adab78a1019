"""REFER reader: pickle order, exact split rule, partition checks (magnet_jax/data/refer.py)."""

from __future__ import annotations

import pickle

import pytest

from magnet_jax.data.refer import ReferDataset, ReferError, load_refs_pickle
from tests.data.fixtures.refer_fixture import build_refer_fixture


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_refer_fixture(tmp_path_factory.mktemp("refer"))["refer_root"]


def test_split_membership_equals_pickle(root):
    with open(f"{root}/refcoco/refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    ds = ReferDataset(root, "refcoco", "unc")
    assert ds.splits == ("train", "val", "testA", "testB")
    for split in ds.splits:
        want = [r["ref_id"] for r in refs if r["split"] == split]
        assert [r["ref_id"] for r in ds.refs_of_split(split)] == want
        assert ds.split_counts(split) == (
            len(want),
            len({r["image_id"] for r in refs if r["split"] == split}),
            sum(len(r["sentences"]) for r in refs if r["split"] == split),
        )
    assert ds.anns[101]["image_id"] == 1 and ds.images[2]["width"] == 40
    assert [a["id"] for a in ds.anns_by_image[1]] == [101, 102]


def test_same_ann_in_several_datasets(root):
    ids = {}
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        ds = ReferDataset(root, dataset, split_by)
        ids[dataset] = [r["ref_id"] for r in ds.refs if r["ann_id"] == 101]
    assert ids == {"refcoco": [1], "refcoco+": [501], "refcocog": [7001]}


def test_wrong_split_by_and_missing_files(root, tmp_path):
    with pytest.raises(
        ReferError,
        match=r"refs file not found: .*refs\(google\).p \(refs files in .*: refs\(unc\).p\)",
    ):
        ReferDataset(root, "refcoco", "google")
    with pytest.raises(
        ReferError, match=r"--split-by umd is not a partition of refcoco \(valid: unc, google"
    ):
        ReferDataset(root, "refcoco", "umd")
    with pytest.raises(
        ReferError, match=r"--split-by google is not a partition of refcoco\+ \(valid: unc"
    ):
        ReferDataset(root, "refcoco+", "google")
    (tmp_path / "refcocog").mkdir()
    with pytest.raises(
        ReferError, match=r"dataset directory not found: .*refcoco \(present in .*: refcocog\)"
    ):
        ReferDataset(tmp_path, "refcoco", "unc")
    with pytest.raises(ReferError, match="REFER root not found"):
        ReferDataset(tmp_path / "nope", "refcoco", "unc")
    with pytest.raises(ReferError, match="not a split of refcocog umd"):
        ReferDataset(root, "refcocog", "umd").refs_of_split("testA")


def test_unexpected_split_values(root, tmp_path):
    import shutil

    shutil.copytree(f"{root}/refcoco", tmp_path / "refcoco")
    path = tmp_path / "refcoco" / "refs(unc).p"
    refs = load_refs_pickle(path)
    refs[0]["split"] = "testAB"
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ReferError, match="unexpected: testAB"):
        ReferDataset(tmp_path, "refcoco", "unc")
    refs[0]["split"] = "train"
    refs.append(dict(refs[0]))
    path.write_bytes(pickle.dumps(refs, protocol=2))
    with pytest.raises(ReferError, match="duplicate ref_id=1"):
        ReferDataset(tmp_path, "refcoco", "unc")


def test_python2_pickle_with_latin1_bytes(tmp_path):
    # A Python 2 protocol-2 pickle of [{'raw': 'caf\xe9'}] (str = SHORT_BINSTRING 'U').
    data = b"\x80\x02]q\x00}q\x01U\x03rawq\x02U\x04caf\xe9q\x03sa."
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    assert load_refs_pickle(path) == [{"raw": "caf\xe9"}]
    path.write_bytes(b"not a pickle")
    with pytest.raises(ReferError, match="cannot unpickle"):
        load_refs_pickle(path)
