"""Optional TFDS builder: prepare from the REFER fixture, read back via tfds.data_source."""

from __future__ import annotations

import grain
import pytest

from magnet_jax.data import convert, records

tfds = pytest.importorskip("tensorflow_datasets")

from magnet_jax.data import tfds_source
from tests.data.fixtures.refer_fixture import build_refer_fixture


def test_configs():
    names = [c.name for c in tfds_source.RefCocoMagnet.BUILDER_CONFIGS]
    assert names == ["refcoco_unc", "refcoco+_unc", "refcocog_umd", "refcocog_google"]


def test_prepare_and_read_equal_converter_records(tmp_path):
    paths = build_refer_fixture(tmp_path / "refer")
    # The builder looks for images under manual_dir/images (the fixture's layout).
    builder = tfds_source.RefCocoMagnet(
        config="refcoco_unc", data_dir=str(tmp_path / "tfds"), file_format="array_record"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=paths["refer_root"])
    )
    out = tmp_path / "records"
    assert convert.main([
        "--refer-root", paths["refer_root"], "--dataset", "refcoco", "--split-by", "unc",
        "--image-root", paths["image_root"], "--out", str(out), "--quiet",
    ]) == 0  # fmt: skip
    for split in ("train", "val", "testA", "testB"):
        src = tfds_source.data_source("refcoco_unc", split, tmp_path / "tfds")
        ds = grain.MapDataset.source(src)
        got = {ds[i]["ref_id"]: records.encode_record(ds[i]) for i in range(len(ds))}
        ref = records.RecordSource(out, split)
        want = {ref[i]["ref_id"]: records.encode_record(ref[i]) for i in range(len(ref))}
        assert got == want, split
        assert sorted(src.sentence_counts()) == sorted(
            records.read_meta(out, split)["sentence_counts"]
        )
    with pytest.raises(ValueError, match="unknown config 'refcoco_google'"):
        tfds_source.data_source("refcoco_google", "val", tmp_path / "tfds")
