"""Training on several converted datasets at once, without test leaks (`data_formats.md` §1.6).

    config.data.mixture = ("refcoco_unc", ("refcocog_umd", 2.0), ...)   # "DIR" or ("DIR", weight)
    config.data.root = "records"                 # relative DIRs resolve under it
    config.data.exclude_eval_of = ("refcocog_google",)   # more eval splits to keep out of train
    config.data.mixture_force_mixed_conventions = False

The train stream (`train_dataset`) is a weighted grain mixture: each dataset's kept train
records are shuffled (own seed, derived from data.seed and its position), repeated forever and
interleaved with `grain.MapDataset.mix`, which is deterministic (no random draw: within every
window of sum(proportions) elements each dataset contributes exactly its share; grain rounds
the weights to integers with the smallest at 100, i.e. to 1 % of the smallest). The result is a
MapDataset, so its iterator is checkpointed and resumed exactly like one dataset's. Weights
default to the datasets' kept train refs (sentences with data.sample = "sentence"), so every
ref is drawn equally often, as when training on their union.

Overlap filter: all RefCOCO-family datasets use COCO train2014 images, and one dataset's
val/test image can be another's train image. Every train record whose image_id appears in any
non-train split (val, testA, testB, test, ...) of any dataset of the mixture or of
data.exclude_eval_of is removed; the report counts removed refs, sentences and images per
train split. Image ids come from meta.json's `image_ids` (written since this filter), else from
the records (slow on full datasets; `--add-image-ids` stores them once).

    python -m magnet_jax.data.mixture --report DIR [DIR ...] [--exclude-eval-of DIR ...]
    python -m magnet_jax.data.mixture --refer-root ROOT --report refcoco:unc refcoco+:unc \\
        refcocog:umd --exclude-eval-of refcocog:google      # from refs(*).p, no conversion
    python -m magnet_jax.data.mixture --add-image-ids DIR [DIR ...]

print the counts as JSON and a table (or store image_ids in old meta.json files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from magnet_jax.data import records
from magnet_jax.data.refer import EXPECTED_SPLITS, load_refs_pickle

log = logging.getLogger(__name__)


class MixtureError(ValueError):
    """A mixture that cannot be built; the message is one line naming the bad thing."""


# --------------------------------------------------------------------------------------------
# The overlap computation (shared by converted dirs and REFER pickles)


@dataclasses.dataclass(frozen=True)
class TrainTable:
    """Per-record image ids and sentence counts of one train split (record order)."""

    image_ids: np.ndarray
    sentence_counts: np.ndarray


def overlap_filter(train: Mapping[str, TrainTable], eval_images: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(report, keep) for train splits named like "refcoco/train" and eval splits' image ids.

    keep[name] is a bool mask over that train split's records. The report holds, per train
    split, its totals, what was removed and kept ({refs, sentences, images}), and how many of
    its images each eval split holds; and the eval splits' image counts.
    """
    leaked = np.unique(np.concatenate([np.asarray(v, np.int64) for v in eval_images.values()])
                       if eval_images else np.zeros((0,), np.int64))
    report: dict[str, Any] = {"train": {}, "eval": {}, "eval_images": int(len(leaked))}
    for name, ids in eval_images.items():
        report["eval"][name] = {"images": int(len(np.unique(ids)))}
    keep: dict[str, np.ndarray] = {}
    for name, table in train.items():
        image_ids = np.asarray(table.image_ids, np.int64)
        counts = np.asarray(table.sentence_counts, np.int64)
        drop = np.isin(image_ids, leaked)
        keep[name] = ~drop

        def totals(mask, image_ids=image_ids, counts=counts):
            return {"refs": int(mask.sum()), "sentences": int(counts[mask].sum()),
                    "images": int(len(np.unique(image_ids[mask])))}

        train_images = np.unique(image_ids)
        report["train"][name] = {
            "total": totals(np.ones_like(drop)),
            "removed": totals(drop),
            "kept": totals(~drop),
            "overlap_images": {ev: int(np.isin(train_images, ids).sum())
                               for ev, ids in eval_images.items()},
        }
    return report, keep


def unique_names(items: Sequence[tuple[str, str, str]]) -> list[str]:
    """Short names for (dataset, split_by, dir basename): the dataset ("refcoco"), else
    dataset_split_by where two share a dataset ("refcocog_umd"), else the dir's basename."""
    names = [d for d, _, _ in items]
    for fallback in (lambda d, s, b: f"{d}_{s}", lambda d, s, b: b):
        dup = {n for n in names if names.count(n) > 1}
        names = [fallback(*it) if n in dup else n for n, it in zip(names, items)]
    dup = {n for n in names if names.count(n) > 1}
    return [f"{n}_{i}" if n in dup else n for i, n in enumerate(names)]


# --------------------------------------------------------------------------------------------
# Converted datasets


def resolve_dir(path: str | os.PathLike, root: str | os.PathLike = "") -> str:
    """An absolute dataset dir; a relative one resolves under `root` when it is set."""
    path = os.path.expanduser(str(path))
    if root and not os.path.isabs(path):
        path = os.path.join(os.path.expanduser(str(root)), path)
    return os.path.abspath(path)


def _meta(out_dir: str, split: str, what: str) -> dict[str, Any]:
    try:
        return records.read_meta(out_dir, split)
    except (FileNotFoundError, ValueError) as e:
        raise MixtureError(f"{what}: {str(e).splitlines()[0]}") from None


def split_image_ids(out_dir: str, split: str, meta: Mapping[str, Any] | None = None
                    ) -> np.ndarray:
    """Image id of every record of a split (record order): meta.json's `image_ids`, else read
    from the records (meta.json written before image_ids existed)."""
    meta = meta if meta is not None else _meta(out_dir, split, out_dir)
    ids = meta.get("image_ids")
    n = int(meta["num_records"])
    if ids is not None:
        if len(ids) != n:
            raise MixtureError(f"{records.meta_path(out_dir, split)}: image_ids has {len(ids)} "
                               f"entries for {n} records")
        return np.asarray(ids, np.int64)
    log.warning("%s lacks image_ids: reading the image id of its %d records (store them once "
                "with `python -m magnet_jax.data.mixture --add-image-ids %s`)",
                records.meta_path(out_dir, split), n, out_dir)
    source = records.RecordSource(out_dir, split)
    return np.fromiter((source[i]["image_id"] for i in range(n)), np.int64, n)


def eval_splits_of(out_dir: str, train_split: str = "train", what: str = "") -> list[str]:
    """Every split of `out_dir` except the train split; for a known REFER partition, every
    expected val/test split must be there (a missing one would let its images leak)."""
    what = what or out_dir
    splits = [s for s in records.available_splits(out_dir) if s != train_split]
    if not splits:
        raise MixtureError(f"{what}: {out_dir} has no split besides {train_split!r} to keep "
                           "out of training")
    meta = _meta(out_dir, splits[0], what)
    key = (meta.get("dataset"), meta.get("split_by"))
    missing = [s for s in EXPECTED_SPLITS.get(key, ()) if s != "train" and s not in splits]
    if missing:
        raise MixtureError(f"{what}: {out_dir} lacks the converted {key[0]} {key[1]} split "
                           f"{missing[0]!r}; the overlap filter needs every val/test split "
                           "(convert it with python -m magnet_jax.data.convert)")
    return splits


@dataclasses.dataclass(frozen=True)
class MixtureDataset:
    name: str                 # "refcoco": eval metrics are reported as "refcoco/val/oIoU"
    dir: str
    dataset: str              # meta.json's dataset / split_by / mask_convention
    split_by: str
    convention: str
    weight: float             # resolved mixing weight
    keep: np.ndarray          # indices of the train records kept by the overlap filter
    kept_sentences: int
    eval_splits: tuple[str, ...]


@dataclasses.dataclass
class Mixture:
    datasets: list[MixtureDataset]
    excluded: list[tuple[str, str]]   # (name, dir) of data.exclude_eval_of
    train_split: str
    report: dict[str, Any]

    @property
    def num_train_refs(self) -> int:
        return int(sum(len(d.keep) for d in self.datasets))

    def eval_targets(self, splits: Sequence[str]) -> list[tuple[str, str, str]]:
        """(metric prefix "name/split", dir, split) for each requested split of each dataset
        that has it; a split that no dataset has is an error."""
        targets = [(f"{d.name}/{s}", d.dir, s) for d in self.datasets for s in splits
                   if s in d.eval_splits]
        for s in splits:
            if not any(t[2] == s for t in targets):
                raise MixtureError(f"data.eval_splits: no dataset of the mixture has split {s!r}")
        return targets


def parse_entries(spec: Any) -> list[tuple[str, float | None]]:
    """data.mixture -> [(dir, weight or None)]: entries "DIR" or ("DIR", weight), weights given
    for every entry or for none."""
    if isinstance(spec, str):
        spec = (spec,)
    out: list[tuple[str, float | None]] = []
    for entry in spec:
        if isinstance(entry, str):
            out.append((entry, None))
            continue
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2
                and isinstance(entry[0], str)):
            raise MixtureError(f"data.mixture: entry {entry!r} is neither 'DIR' nor "
                               "('DIR', weight)")
        weight = entry[1]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not math.isfinite(weight) or weight <= 0:
            raise MixtureError(f"data.mixture: weight {weight!r} of {entry[0]} is not a "
                               "positive number")
        out.append((entry[0], float(weight)))
    given = [w is not None for _, w in out]
    if any(given) and not all(given):
        raise MixtureError("data.mixture: give a weight to every entry or to none (weights "
                           f"missing for {', '.join(d for d, w in out if w is None)})")
    return out


def build_mixture(entries: Sequence[tuple[str, float | None]], *, root: str = "",
                  exclude_eval_of: Sequence[str] = (), train_split: str = "train",
                  sample: str = "ref", force_mixed_conventions: bool = False) -> Mixture:
    """Check the datasets, apply the overlap filter, resolve the weights; logs the report."""
    if not entries:
        raise MixtureError("data.mixture is empty")
    dirs = [resolve_dir(d, root) for d, _ in entries]
    excluded = [resolve_dir(d, root) for d in exclude_eval_of]
    for key, given in (("data.mixture", [d for d, _ in entries]),
                       ("data.exclude_eval_of", list(exclude_eval_of))):
        for d in given:
            if not os.path.isdir(resolve_dir(d, root)):
                hint = "" if root or os.path.isabs(os.path.expanduser(d)) else \
                    " (relative dirs resolve under data.root, which is not set)"
                raise MixtureError(f"{key}: dataset directory {resolve_dir(d, root)} does not "
                                   f"exist{hint}")
    for d in dirs:
        if dirs.count(d) > 1:
            raise MixtureError(f"data.mixture: {d} is listed twice")
    for d, w in entries:
        if w is not None and not w > 0:
            raise MixtureError(f"data.mixture: weight {w!r} of {d} is not a positive number")
    # An excluded dir that is also in the mixture (or listed twice) adds nothing.
    excluded = [d for i, d in enumerate(excluded) if d not in dirs and d not in excluded[:i]]

    train_metas = [_meta(d, train_split, f"data.mixture: {d}") for d in dirs]
    # The converter always records its convention; "official" is its default.
    conventions = [str(m.get("mask_convention", "official")) for m in train_metas]
    if len(set(conventions)) > 1 and not force_mixed_conventions:
        j = next(i for i, c in enumerate(conventions) if c != conventions[0])
        raise MixtureError(f"data.mixture: mask conventions differ: {dirs[0]} is "
                           f"{conventions[0]!r}, {dirs[j]} is {conventions[j]!r} (set "
                           "data.mixture_force_mixed_conventions=True to mix them)")

    all_dirs = dirs + excluded
    described = []
    for d in all_dirs:
        if d in dirs:
            m = train_metas[dirs.index(d)]
        else:   # dataset and split_by are the same in every split's meta.json
            m = _meta(d, (records.available_splits(d) or [train_split])[0],
                      f"data.exclude_eval_of: {d}")
        described.append((str(m.get("dataset", "")) or os.path.basename(d),
                          str(m.get("split_by", "")), os.path.basename(d)))
    names = unique_names(described)

    eval_splits: dict[str, list[str]] = {}
    eval_images: dict[str, np.ndarray] = {}
    for d, name in zip(all_dirs, names):
        key = "data.mixture" if d in dirs else "data.exclude_eval_of"
        eval_splits[d] = eval_splits_of(d, train_split, f"{key}: {d}")
        for s in eval_splits[d]:
            eval_images[f"{name}/{s}"] = split_image_ids(d, s, _meta(d, s, f"{key}: {d}"))
    tables = {f"{name}/{train_split}": TrainTable(split_image_ids(d, train_split, m),
                                                  np.asarray(m["sentence_counts"], np.int64))
              for d, name, m in zip(dirs, names, train_metas)}
    report, keep = overlap_filter(tables, eval_images)

    datasets = []
    for i, (d, m) in enumerate(zip(dirs, train_metas)):
        name = names[i]
        kept = report["train"][f"{name}/{train_split}"]["kept"]
        if kept["refs"] == 0:
            raise MixtureError(f"data.mixture: the overlap filter leaves no {train_split!r} "
                               f"record of {d}")
        auto = kept["sentences"] if sample == "sentence" else kept["refs"]
        datasets.append(MixtureDataset(
            name=name, dir=d, dataset=described[i][0], split_by=described[i][1],
            convention=conventions[i],
            weight=float(auto) if entries[i][1] is None else float(entries[i][1]),
            keep=np.flatnonzero(keep[f"{name}/{train_split}"]).astype(np.int64),
            kept_sentences=kept["sentences"], eval_splits=tuple(eval_splits[d])))
    total_weight = sum(ds.weight for ds in datasets)
    report["datasets"] = {ds.name: {"dir": ds.dir, "dataset": ds.dataset,
                                    "split_by": ds.split_by, "mask_convention": ds.convention,
                                    "weight": ds.weight / total_weight,
                                    "eval_splits": list(ds.eval_splits)} for ds in datasets}
    report["exclude_eval_of"] = {n: d for n, d in zip(names[len(dirs):], excluded)}
    for line in report_lines(report):
        log.info("%s", line)
    return Mixture(datasets, list(zip(names[len(dirs):], excluded)), train_split, report)


def from_config(data_config) -> Mixture | None:
    """The mixture of config.data (None when data.mixture is empty)."""
    spec = data_config.get("mixture") or ()
    if not spec:
        return None
    return build_mixture(parse_entries(spec), root=data_config.get("root", "") or "",
                         exclude_eval_of=tuple(data_config.get("exclude_eval_of") or ()),
                         train_split=data_config.get("train_split", "train"),
                         sample=data_config.get("sample", "ref"),
                         force_mixed_conventions=bool(
                             data_config.get("mixture_force_mixed_conventions", False)))


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """One log line per train split: what the overlap filter removed."""
    out = []
    for name, r in report["train"].items():
        rm, tot = r["removed"], r["total"]
        out.append(f"overlap filter: {name}: removed {rm['refs']} of {tot['refs']} refs, "
                   f"{rm['sentences']} of {tot['sentences']} sentences, {rm['images']} of "
                   f"{tot['images']} images (in a val/test split of "
                   f"{', '.join(k for k, v in r['overlap_images'].items() if v) or 'none'})")
    return out


def format_table(report: Mapping[str, Any]) -> str:
    """The report's train splits as a fixed-width table."""
    head = ("train split", "refs", "-refs", "sentences", "-sentences", "images", "-images",
            "kept refs")
    rows = [head] + [(name, r["total"]["refs"], r["removed"]["refs"], r["total"]["sentences"],
                      r["removed"]["sentences"], r["total"]["images"], r["removed"]["images"],
                      r["kept"]["refs"]) for name, r in report["train"].items()]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                       for i, (v, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"(-: removed by the overlap filter: {report['eval_images']} distinct images "
                 f"in {len(report['eval'])} val/test splits)")
    return "\n".join(lines)


def overlap_report(dirs: Sequence[str], exclude_eval_of: Sequence[str] = (),
                   train_split: str = "train") -> dict[str, Any]:
    """The overlap filter's report for converted dirs (mixed conventions allowed; a dir
    without a train split only contributes its eval splits)."""
    for d in list(dirs) + list(exclude_eval_of):
        if not os.path.isdir(resolve_dir(d)):
            raise MixtureError(f"dataset directory {resolve_dir(d)} does not exist")
    with_train = [d for d in dirs if records.is_complete(resolve_dir(d), train_split)]
    only_eval = [d for d in dirs if d not in with_train]
    if not with_train:
        raise MixtureError(f"none of {', '.join(dirs)} has a complete {train_split!r} split")
    return build_mixture([(d, None) for d in with_train],
                         exclude_eval_of=list(only_eval) + list(exclude_eval_of),
                         train_split=train_split, force_mixed_conventions=True).report


# --------------------------------------------------------------------------------------------
# The same counts from REFER pickles (no conversion)


def refer_overlap_report(refer_root: str | os.PathLike, datasets: Sequence[tuple[str, str]],
                         exclude_eval_of: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The overlap report of (dataset, split_by) partitions read from
    <refer_root>/<dataset>/refs(<split_by>).p. Counts are of the pickles' refs and sentences;
    a converted dataset can hold slightly fewer (the converter skips bad refs and empty
    sentences, listed in its meta.json)."""
    items = list(datasets) + [x for x in exclude_eval_of if x not in datasets]
    names = unique_names([(d, s, f"{d}_{s}") for d, s in items])
    train: dict[str, TrainTable] = {}
    eval_images: dict[str, np.ndarray] = {}
    for i, ((dataset, split_by), name) in enumerate(zip(items, names)):
        refs = load_refs_pickle(Path(refer_root) / dataset / f"refs({split_by}).p")
        splits = sorted({str(r["split"]) for r in refs})
        for s in splits:
            part = [r for r in refs if r["split"] == s]
            ids = np.asarray([int(r["image_id"]) for r in part], np.int64)
            if s != "train":
                eval_images[f"{name}/{s}"] = ids
            elif i < len(datasets):
                train[f"{name}/train"] = TrainTable(
                    ids, np.asarray([len(r["sentences"]) for r in part], np.int64))
    report, _ = overlap_filter(train, eval_images)
    report["datasets"] = {n: {"dataset": d, "split_by": s} for n, (d, s) in zip(names, items)}
    return report


# --------------------------------------------------------------------------------------------
# The train stream


class SubsetSource:
    """The kept records of a train split (random access, picklable); each record is tagged with
    its dataset's position in the mixture (`mixture_index`)."""

    def __init__(self, source: records.RecordSource, keep: np.ndarray, mixture_index: int):
        self.source = source
        self.keep = np.asarray(keep, np.int64)
        self.mixture_index = int(mixture_index)
        counts = source.meta["sentence_counts"]
        # SentenceSource reads the sentence counts of these records from `meta`.
        self.meta = {"sentence_counts": [int(counts[i]) for i in self.keep],
                     "num_records": len(self.keep)}

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.source[int(self.keep[int(index)])]
        record["mixture_index"] = self.mixture_index
        return record


class TaggedPreprocess:
    """(random_)map: Preprocess, plus `dataset_index` (int32): which mixture dataset the
    example comes from (ref ids are not unique across datasets)."""

    def __init__(self, prep):
        self.prep = prep

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
        out = self.prep(item, rng)
        out["dataset_index"] = np.int32(item["record"]["mixture_index"])
        return out


def dataset_seed(seed: int, index: int) -> int:
    """The shuffle seed of the mixture's index-th dataset (independent orders per dataset)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def train_dataset(mix: Mixture, *, image_size: int, global_batch: int, seed: int,
                  convention: str = "official", augment=None, sample: str = "ref",
                  mask_tokens=None, tokenizer: Any = None, instances=None,
                  process_index: int | None = None, process_count: int | None = None
                  ) -> grain.MapDataset:
    """`pipeline.train_dataset` over the mixture: the same per-process batches, plus
    `dataset_index`. Deterministic for a seed; its iterator resumes exactly."""
    from magnet_jax.data import pipeline
    from magnet_jax.data.instances import check_split_has_instances
    from magnet_jax.data.transforms import PickSentence, Preprocess

    if sample not in pipeline.SAMPLES:
        raise ValueError(f"unknown sample {sample!r}; expected one of "
                         f"{', '.join(pipeline.SAMPLES)}")
    pi, pc = pipeline._process(process_index, process_count)
    batch = pipeline._per_process_batch(global_batch, pc)
    streams = []
    for i, d in enumerate(mix.datasets):
        if instances is not None:
            check_split_has_instances(d.dir, mix.train_split, instances)
        source = SubsetSource(records.RecordSource(d.dir, mix.train_split), d.keep, i)
        if sample == "sentence":
            source = pipeline.SentenceSource(source)
        streams.append(grain.MapDataset.source(source).seed(dataset_seed(seed, i)).shuffle()
                       .repeat(None))
    ds = grain.MapDataset.mix(streams, [d.weight for d in mix.datasets])
    ds = ds.seed(int(seed))[pi::pc]
    if sample == "ref":
        ds = ds.random_map(PickSentence())
    prep = TaggedPreprocess(Preprocess(image_size, convention, augment, tokenizer, instances))
    return pipeline.examples_to_batches(ds, prep, random=augment is not None,
                                        mask_tokens=mask_tokens, batch=batch)


# --------------------------------------------------------------------------------------------
# Upgrading old meta.json files


def add_image_ids(out_dir: str | os.PathLike) -> list[str]:
    """Store `image_ids` in every complete split's meta.json that lacks it; returns those
    splits. Reads each record once."""
    out_dir = str(out_dir)
    if not os.path.isdir(out_dir):
        raise MixtureError(f"dataset directory {out_dir} does not exist")
    done = []
    for split in records.available_splits(out_dir):
        meta = _meta(out_dir, split, out_dir)
        if "image_ids" in meta:
            continue
        meta["image_ids"] = split_image_ids(out_dir, split, meta).tolist()
        records._write_json_atomic(records.meta_path(out_dir, split), meta)
        done.append(split)
    return done


# --------------------------------------------------------------------------------------------
# CLI


def _partition(arg: str) -> tuple[str, str]:
    dataset, sep, split_by = arg.partition(":")
    if not sep or not dataset or not split_by:
        raise MixtureError(f"{arg!r} is not DATASET:SPLIT_BY (e.g. refcoco:unc)")
    return dataset, split_by


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m magnet_jax.data.mixture",
        description="Count what the mixture overlap filter removes from each train split.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--report", nargs="+", metavar="DIR",
                      help="converted dataset dirs (with --refer-root: DATASET:SPLIT_BY)")
    what.add_argument("--add-image-ids", nargs="+", metavar="DIR",
                      help="store image_ids in the meta.json files of converted dirs")
    p.add_argument("--exclude-eval-of", nargs="*", default=[], metavar="DIR",
                   help="more datasets whose val/test images are kept out of training")
    p.add_argument("--refer-root", help="read REFER refs(*).p pickles under this root")
    p.add_argument("--train-split", default="train")
    p.add_argument("--json-only", action="store_true", help="no table after the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.add_image_ids:
            for d in args.add_image_ids:
                done = add_image_ids(d)
                print(f"{d}: image_ids added to {', '.join(done) if done else 'no split'}")
            return 0
        if args.refer_root:
            report = refer_overlap_report(args.refer_root, [_partition(a) for a in args.report],
                                          [_partition(a) for a in args.exclude_eval_of])
        else:
            report = overlap_report(args.report, args.exclude_eval_of, args.train_split)
    except (MixtureError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    if not args.json_only:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
