"""Reader of the REFER layout (`data_formats.md` §1): refs(<split_by>).p + instances.json.

    <refer_root>/<dataset>/refs(<split_by>).p     pickled list of refs (written by Python 2)
    <refer_root>/<dataset>/instances.json         COCO-format images, annotations, categories

Splits match exactly (§1.5) after checking that the split values of the pickle are exactly the
expected set of §1.4 for that (dataset, split_by), so `refer.py`'s contains-rule and the exact
rule select the same refs. Refs keep the pickle order. A ref is keyed by
(dataset, split_by, ref_id); ref ids must be unique within one pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

DATASETS = ("refcoco", "refcoco+", "refcocog")

# (dataset, split_by) -> splits, in the conventional order (§1.4).
EXPECTED_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
}

# (dataset, split_by) -> split -> (refs, images, sentences or None when not published) (§1.4).
EXPECTED_COUNTS: dict[tuple[str, str], dict[str, tuple[int, int, int | None]]] = {
    ("refcoco", "unc"): {
        "train": (42404, 16994, 120624),
        "val": (3811, 1500, 10834),
        "testA": (1975, 750, 5657),
        "testB": (1810, 750, 5095),
    },
    ("refcoco", "google"): {
        "train": (40000, 19213, None),
        "val": (5000, 4559, None),
        "test": (5000, 4527, None),
    },
    ("refcoco+", "unc"): {
        "train": (42278, 16992, 120191),
        "val": (3805, 1500, 10758),
        "testA": (1975, 750, 5726),
        "testB": (1798, 750, 4889),
    },
    ("refcocog", "umd"): {
        "train": (42226, 21899, 80512),
        "val": (2573, 1300, 4896),
        "test": (5023, 2600, 9602),
    },
    ("refcocog", "google"): {
        "train": (44822, 24698, 85474),
        "val": (5000, 4650, 9536),
    },
}


class ReferError(ValueError):
    """Missing or inconsistent REFER annotation files."""


def index_coco_instances(inst: Any, path: Path, error: type[Exception] = ReferError):
    """A COCO instances.json object -> (images, annotations, categories by id, annotations
    by image id); a missing list raises `error` naming the file."""
    if not isinstance(inst, dict):
        raise error(f"{path}: expected a COCO object, got a {type(inst).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(inst.get(key), list):
            raise error(f"{path} lacks the list {key!r}")
    anns_by_image: dict[int, list[dict[str, Any]]] = {}
    for a in inst["annotations"]:
        anns_by_image.setdefault(int(a["image_id"]), []).append(a)
    return ({int(im["id"]): im for im in inst["images"]},
            {int(a["id"]): a for a in inst["annotations"]},
            {int(c["id"]): c for c in inst["categories"]}, anns_by_image)


def valid_split_bys(dataset: str) -> list[str]:
    return [sb for (ds, sb) in EXPECTED_SPLITS if ds == dataset]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_refs_pickle(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The pickled list of refs; Python 2 byte strings are read as latin-1 if not ASCII."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            try:
                refs = pickle.load(f)
            except UnicodeDecodeError:
                f.seek(0)
                refs = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise ReferError(f"refs file not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise ReferError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        raise ReferError(f"{path} does not hold a list of ref dicts")
    return refs


class ReferDataset:
    """refs of one (dataset, split_by) with lookup tables of instances.json.

    Attributes: refs (pickle order), anns / images / categories (id -> dict),
    anns_by_image (image id -> annotations in file order), splits (expected split names),
    refs_path, instances_path.
    """

    def __init__(self, refer_root: str | os.PathLike, dataset: str, split_by: str):
        root = Path(refer_root)
        if dataset not in DATASETS:
            raise ReferError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASETS)})")
        if not root.is_dir():
            raise ReferError(f"REFER root not found: {root}")
        data_dir = root / dataset
        if not data_dir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise ReferError(
                f"dataset directory not found: {data_dir} "
                f"(present in {root}: {', '.join(present) if present else 'none'})"
            )
        present_refs = sorted(p.name for p in data_dir.glob("refs(*).p"))
        if (dataset, split_by) not in EXPECTED_SPLITS:
            raise ReferError(
                f"--split-by {split_by} is not a partition of {dataset} "
                f"(valid: {', '.join(valid_split_bys(dataset))}; "
                f"files in {data_dir}: {', '.join(present_refs) if present_refs else 'none'})"
            )
        self.dataset, self.split_by = dataset, split_by
        self.splits = EXPECTED_SPLITS[(dataset, split_by)]
        self.refs_path = data_dir / f"refs({split_by}).p"
        self.instances_path = data_dir / "instances.json"
        if not self.refs_path.is_file():
            raise ReferError(
                f"refs file not found: {self.refs_path} "
                f"(refs files in {data_dir}: {', '.join(present_refs) if present_refs else 'none'})"
            )
        if not self.instances_path.is_file():
            raise ReferError(f"instances file not found: {self.instances_path}")
        self.refs = load_refs_pickle(self.refs_path)
        try:
            inst = json.loads(self.instances_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReferError(f"cannot read {self.instances_path}: {e}") from None
        (self.images, self.anns, self.categories,
         self.anns_by_image) = index_coco_instances(inst, self.instances_path, ReferError)
        self._check_refs()

    def _check_refs(self) -> None:
        seen: set[int] = set()
        values: set[str] = set()
        for i, ref in enumerate(self.refs):
            for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
                if key not in ref:
                    raise ReferError(
                        f"ref #{i} (ref_id={ref.get('ref_id')}) in {self.refs_path} lacks {key!r}"
                    )
            rid = int(ref["ref_id"])
            if rid in seen:
                raise ReferError(f"duplicate ref_id={rid} in {self.refs_path}")
            seen.add(rid)
            values.add(ref["split"])
        unexpected = sorted(values - set(self.splits))
        missing = [s for s in self.splits if s not in values]
        if unexpected or missing:
            raise ReferError(
                f"{self.refs_path}: split values {sorted(values)} are not the expected "
                f"{list(self.splits)} of {self.dataset} {self.split_by}"
                + (f" (unexpected: {', '.join(unexpected)})" if unexpected else "")
                + (f" (missing: {', '.join(missing)})" if missing else "")
                + " - wrong --split-by?"
            )

    def refs_of_split(self, split: str) -> list[dict[str, Any]]:
        """Refs whose split is exactly `split`, in pickle order."""
        if split not in self.splits:
            raise ReferError(
                f"split {split!r} is not a split of {self.dataset} {self.split_by} "
                f"(splits: {', '.join(self.splits)})"
            )
        return [r for r in self.refs if r["split"] == split]

    def split_counts(self, split: str) -> tuple[int, int, int]:
        """(refs, images, sentences) of a split as the REFER API counts them."""
        refs = self.refs_of_split(split)
        return (
            len(refs),
            len({int(r["image_id"]) for r in refs}),
            sum(len(r["sentences"]) for r in refs),
        )

    def check_counts(self) -> list[str]:
        """Mismatches against §1.4 (empty list when all published counts match)."""
        problems = []
        for split, expected in EXPECTED_COUNTS[(self.dataset, self.split_by)].items():
            got = self.split_counts(split)
            for name, e, g in zip(("refs", "images", "sentences"), expected, got):
                if e is not None and e != g:
                    problems.append(
                        f"{self.dataset} {self.split_by} {split}: {g} {name}, expected {e}"
                    )
        return problems
