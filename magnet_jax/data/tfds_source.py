"""Optional tensorflow-datasets builder for the magnet_jax records (`data_formats.md` §6, §7).

The builder `ref_coco_magnet` stores, per ref, the very record the ArrayRecord converter
writes (`records.encode_record` bytes in the feature `record`, plus `ref_id`, `image_id` and
`num_sentences` for cheap lookups), so a TFDS split decodes to the same dicts as
`records.RecordSource` and feeds the same grain pipeline. Configs:

    refcoco_unc, refcoco+_unc, refcocog_umd, refcocog_google

Splits keep the REFER names (train, val, testA, testB, test). Preparation (manual download,
file format array_record):

    <manual_dir>/refcoco/{instances.json, refs(unc).p}, refcoco+/..., refcocog/...
    <manual_dir>/images/mscoco/images/train2014/  (or train2014/ or images/): COCO train2014

    builder = RefCocoMagnet(config="refcoco_unc", data_dir=DATA_DIR, file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=MANUAL_DIR))

Reading needs neither TensorFlow nor this builder class: `data_source(...)` wraps
`tfds.data_source`. Refs are in TFDS's order (shuffled by key), not pickle order; the mask
convention of meta.json does not exist here, readers choose it (`records.mask_from_count_png`).
With tensorflow-datasets 4.9.10 preparing these plain features works without TensorFlow too;
older releases need it (install the `tensorflow` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from magnet_jax.data import records
from magnet_jax.data.refer import EXPECTED_SPLITS

BUILDER_NAME = "ref_coco_magnet"

# config name -> (dataset, split_by)
CONFIGS: dict[str, tuple[str, str]] = {
    "refcoco_unc": ("refcoco", "unc"),
    "refcoco+_unc": ("refcoco+", "unc"),
    "refcocog_umd": ("refcocog", "umd"),
    "refcocog_google": ("refcocog", "google"),
}

_IMAGE_DIRS = ("images/mscoco/images/train2014", "train2014", "coco_train2014", "images")


class RefCocoMagnetConfig(tfds.core.BuilderConfig):
    """One (dataset, split_by) of the REFER annotations."""

    def __init__(self, *, dataset: str, split_by: str, with_instances: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.dataset = dataset
        self.split_by = split_by
        self.with_instances = with_instances


class RefCocoMagnet(tfds.core.GeneratorBasedBuilder):
    """RefCOCO / RefCOCO+ / G-Ref as magnet_jax records (one example per ref)."""

    VERSION = tfds.core.Version(f"{records.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        f"{records.SCHEMA_VERSION}.0.0": "magnet_jax record schema v1."
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the REFER annotation folders (refcoco/, refcoco+/, refcocog/, each with "
        "instances.json and refs(<split_by>).p) in manual_dir, and the COCO train2014 images in "
        "manual_dir/images/mscoco/images/train2014/ (or manual_dir/train2014/)."
    )
    BUILDER_CONFIGS: ClassVar[list[tfds.core.BuilderConfig]] = [
        RefCocoMagnetConfig(
            name=name, dataset=ds, split_by=sb, description=f"{ds} ({sb} partition)"
        )
        for name, (ds, sb) in CONFIGS.items()
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="REFER referring expressions as magnet_jax record schema v1 (msgpack).",
            features=tfds.features.FeaturesDict(
                {
                    "record": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "ref_id": tfds.features.Scalar(dtype=np.int64),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "num_sentences": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage="https://github.com/lichengunc/refer",
        )

    def _split_generators(self, dl_manager):
        root = Path(os.fspath(dl_manager.manual_dir))
        image_root = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
        if image_root is None:
            raise FileNotFoundError(
                f"no COCO train2014 image folder in {root} (looked for {', '.join(_IMAGE_DIRS)})"
            )
        cfg = self.builder_config
        return {
            split: self._generate_examples(root, image_root, split)
            for split in EXPECTED_SPLITS[(cfg.dataset, cfg.split_by)]
        }

    def _generate_examples(self, refer_root: Path, image_root: Path, split: str):
        from magnet_jax.data.convert import iter_split_records

        cfg = self.builder_config
        for rec in iter_split_records(
            refer_root,
            cfg.dataset,
            cfg.split_by,
            image_root,
            split,
            with_instances=cfg.with_instances,
        ):
            yield (
                rec["ref_id"],
                {
                    "record": records.encode_record(rec),
                    "ref_id": rec["ref_id"],
                    "image_id": rec["image_id"],
                    "num_sentences": len(rec["sent_ids"]),
                },
            )


class TfdsRecordSource:
    """Random-access sequence of decoded records over a prepared TFDS split (no TensorFlow)."""

    def __init__(self, config: str, split: str, data_dir: str | os.PathLike | None = None):
        if config not in CONFIGS:
            raise ValueError(f"unknown config {config!r} (expected one of {', '.join(CONFIGS)})")
        self.config, self.split = config, split
        self._source = tfds.data_source(
            f"{BUILDER_NAME}/{config}",
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=False,
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return records.decode_record(self._source[int(index)]["record"])

    def sentence_counts(self) -> list[int]:
        """Sentences per record, in this source's order (reads every example once)."""
        return [int(self._source[i]["num_sentences"]) for i in range(len(self._source))]


def data_source(
    config: str = "refcoco_unc", split: str = "val", data_dir: str | os.PathLike | None = None
) -> TfdsRecordSource:
    """`TfdsRecordSource(config, split, data_dir)`: for `grain.MapDataset.source`."""
    return TfdsRecordSource(config, split, data_dir)
