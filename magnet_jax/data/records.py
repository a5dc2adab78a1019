"""The magnet_jax record schema v1 (`data_formats.md` §7): encode/decode, shards, meta.json.

One record = one referred object (ref). The payload is `flax.serialization.msgpack_serialize`
of a flat dict of numpy arrays, bytes, str and lists of str/bytes: TF-free and self-describing.

Decoded records hold Python `int`/`float` for scalar fields, `bytes` for byte fields, `str`
for strings, `list[str]` for `raw`/`sent`, and numpy arrays (declared dtype) for array fields.

Files of one split in `out_dir` (§7.1):
    <split>.array_record-00000-of-00016 ...   written as `<name>.partial`, renamed after close
    <split>.meta.json                         written last, atomically
A split is complete iff its meta.json exists and every shard it lists exists. Records are
numbered shard-major (all of shard 0, then shard 1, ...), the order in which
`grain.sources.ArrayRecordDataSource` concatenates the shard files; meta.json's per-record
lists (`ref_ids`, `image_ids`, `sentence_counts`) follow that order (`image_ids` since the
mixture overlap filter, `mixture.py`; older meta.json files lack it and stay readable).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MAX_TOKENS = 20
META_SUFFIX = ".meta.json"
PARTIAL_SUFFIX = ".partial"
WRITER_OPTIONS = "group_size:1"  # required for grain's random access (jax_stack.md §6.2)

# field -> kind. Kinds: "int"/"float" (scalar), "str", "bytes", "strs" (list[str]),
# or a numpy dtype name with a shape spec ("S" = number of sentences, "T" = MAX_TOKENS).
REQUIRED_FIELDS: dict[str, tuple[str, tuple]] = {
    "schema_version": ("int", ()),
    "dataset": ("str", ()),
    "split_by": ("str", ()),
    "split": ("str", ()),
    "ref_id": ("int", ()),
    "ann_id": ("int", ()),
    "image_id": ("int", ()),
    "category_id": ("int", ()),
    "image_file": ("str", ()),
    "image_jpeg": ("bytes", ()),
    "height": ("int", ()),
    "width": ("int", ()),
    "bbox": ("float32", (4,)),
    "area": ("float", ()),
    "iscrowd": ("int", ()),
    "mask_count_png": ("bytes", ()),
    "num_polygons": ("int", ()),
    "overlap_pixels": ("int", ()),
    "sent_ids": ("int64", ("S",)),
    "raw": ("strs", ("S",)),
    "sent": ("strs", ("S",)),
    "input_ids": ("int32", ("S", "T")),
    "attention_mask": ("int8", ("S", "T")),
    "num_wordpieces": ("int32", ("S",)),
}

# Optional fields (--with-instances and extras); K = number of instances of the image.
OPTIONAL_FIELDS: dict[str, tuple[str, tuple]] = {
    "category_name": ("str", ()),
    "instance_ann_ids": ("int64", ("K",)),
    "instance_category_ids": ("int32", ("K",)),
    "instance_category_names": ("strs", ("K",)),
    "instance_iscrowd": ("int8", ("K",)),
    "instance_count_pngs": ("bytes_list", ("K",)),
    # Detector instances (`python -m magnet_jax.data.add_detections`, MaIL); D = the tool's
    # --top-k: exactly D entries, sorted by score, padded with empty masks and valid 0. Each
    # mask is a uint8 0/1 PNG at the record's native (height, width).
    "det_mask_pngs": ("bytes_list", ("D",)),
    "det_scores": ("float32", ("D",)),
    "det_category_ids": ("int32", ("D",)),
    "det_valid": ("int8", ("D",)),
    # gRefCOCO (`python -m magnet_jax.data.grefcoco`, generalised RIS); N = the ref's number of
    # targets in its `ann_id` list, 0 for a no-target ref. `no_target` is 1 for a ref that
    # refers to nothing (empty mask), else 0. The mask is the union of the non-crowd targets;
    # crowd targets are listed here (target_iscrowd 1) but left out of it, as ReLA does.
    "no_target": ("int", ()),
    "target_ann_ids": ("int64", ("N",)),
    "target_category_ids": ("int32", ("N",)),
    "target_iscrowd": ("int8", ("N",)),
    "target_bboxes": ("float32", ("N", 4)),  # COCO [x, y, w, h] per target
}

MASK_CONVENTIONS = ("official", "union")
_CONVENTION_ALIASES = {"official": "official", "eq1": "official", "union": "union"}


class RecordError(ValueError):
    """A record that does not follow the schema."""


def _rid(record: Mapping[str, Any]) -> str:
    return f"ref_id={record.get('ref_id', '?')}"


def _check_and_convert(
    record: Mapping[str, Any], name: str, kind: str, shape: tuple, dims: dict[str, int]
) -> Any:
    value = record[name]
    where = f"record {_rid(record)}: field {name!r}"
    if kind == "int":
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise RecordError(f"{where} must be an int, got {type(value).__name__}")
        return int(value)
    if kind == "float":
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise RecordError(f"{where} must be a number, got {type(value).__name__}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise RecordError(f"{where} must be a str, got {type(value).__name__}")
        return value
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray)):
            raise RecordError(f"{where} must be bytes, got {type(value).__name__}")
        return bytes(value)
    if kind in ("strs", "bytes_list"):
        want = str if kind == "strs" else (bytes, bytearray)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, want) for v in value):
            raise RecordError(f"{where} must be a list of {'str' if kind == 'strs' else 'bytes'}")
        _check_dim(where, shape[0], len(value), dims)
        return [v if kind == "strs" else bytes(v) for v in value]
    arr = np.asarray(value)
    if arr.ndim != len(shape):
        raise RecordError(f"{where} must have {len(shape)} dimensions, got shape {arr.shape}")
    for spec, size in zip(shape, arr.shape):
        _check_dim(where, spec, size, dims)
    target = np.dtype(kind)
    if (
        arr.size
        and not np.can_cast(arr.dtype, target, casting="same_kind")
        and not (np.issubdtype(arr.dtype, np.integer) and np.issubdtype(target, np.integer))
    ):
        raise RecordError(f"{where} must be {kind}, got {arr.dtype}")
    return np.ascontiguousarray(arr.astype(target, copy=False))


def _check_dim(where: str, spec, size: int, dims: dict[str, int]) -> None:
    if isinstance(spec, int):
        if size != spec:
            raise RecordError(f"{where} has length {size}, expected {spec}")
        return
    if spec == "T":
        if size != MAX_TOKENS:
            raise RecordError(f"{where} has {size} tokens, expected {MAX_TOKENS}")
        return
    if dims.setdefault(spec, size) != size:
        raise RecordError(f"{where} has {size} entries, other fields have {dims[spec]}")


def _check_fields_and_version(record: Mapping[str, Any]) -> None:
    missing = [k for k in REQUIRED_FIELDS if k not in record]
    if missing:
        raise RecordError(f"record {_rid(record)} lacks required fields: {', '.join(missing)}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise RecordError(f"record {_rid(record)} has schema_version {record['schema_version']}, "
                          f"this code reads {SCHEMA_VERSION}")


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Return a normalised copy of `record`; raise RecordError (one line) if it breaks the schema."""
    if not isinstance(record, Mapping):
        raise RecordError(f"a record must be a dict, got {type(record).__name__}")
    _check_fields_and_version(record)
    dims: dict[str, int] = {}
    out: dict[str, Any] = {}
    for name, (kind, shape) in REQUIRED_FIELDS.items():
        out[name] = _check_and_convert(record, name, kind, shape, dims)
    if dims.get("S", 0) < 1:
        raise RecordError(f"record {_rid(record)} has no sentences")
    for name, value in record.items():
        if name in out:
            continue
        if name in OPTIONAL_FIELDS:
            kind, shape = OPTIONAL_FIELDS[name]
            out[name] = _check_and_convert(record, name, kind, shape, dims)
        else:
            # Extra fields are kept as they are (msgpack-serialisable values only).
            out[name] = value
    return out


def encode_record(record: Mapping[str, Any]) -> bytes:
    """Validate and serialise one record (flat dict) to msgpack bytes."""
    from flax import serialization

    return serialization.msgpack_serialize(validate_record(record))


def decode_record(data: bytes) -> dict[str, Any]:
    """Inverse of `encode_record`; raises RecordError on a payload that is not a v1 record."""
    from flax import serialization

    try:
        raw = serialization.msgpack_restore(bytes(data))
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types
        raise RecordError(f"not a msgpack record ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise RecordError(f"not a record: payload is a {type(raw).__name__}, not a dict")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        kind = (REQUIRED_FIELDS.get(name) or OPTIONAL_FIELDS.get(name) or (None,))[0]
        if kind == "int":
            value = int(value)
        elif kind == "float":
            value = float(value)
        elif kind in ("strs", "bytes_list"):
            value = list(value)
        out[name] = value
    _check_fields_and_version(out)
    return out


# ------------------------------------------------------------------------------------------
# Masks.
# ------------------------------------------------------------------------------------------


def _convention(convention: str) -> str:
    try:
        return _CONVENTION_ALIASES[convention]
    except KeyError:
        raise ValueError(
            f"unknown mask convention {convention!r} (expected one of {', '.join(MASK_CONVENTIONS)})"
        ) from None


def count_png(count_map: np.ndarray) -> bytes:
    """Lossless 8-bit grey PNG of a per-pixel polygon count map (uint8, H x W)."""
    from PIL import Image

    count_map = np.asarray(count_map)
    if count_map.ndim != 2 or count_map.dtype != np.uint8:
        raise ValueError(f"count map must be uint8 (H, W), got {count_map.dtype} {count_map.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(count_map), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def count_from_png(png_bytes: bytes) -> np.ndarray:
    """Decode a count PNG back to uint8 (H, W)."""
    from PIL import Image

    with Image.open(io.BytesIO(png_bytes)) as img:
        if img.mode != "L":
            raise ValueError(f"count PNG must be 8-bit grey (mode L), got mode {img.mode}")
        return np.asarray(img, dtype=np.uint8).copy()


def mask_from_count(count_map: np.ndarray, convention: str = "official") -> np.ndarray:
    """Binary uint8 0/1 mask: official = (count == 1) (LAVT/MagNet), union = (count >= 1)."""
    if _convention(convention) == "official":
        return (count_map == 1).astype(np.uint8)
    return (count_map >= 1).astype(np.uint8)


def mask_from_count_png(png_bytes: bytes, convention: str = "official") -> np.ndarray:
    """Binary uint8 0/1 (H, W) target mask from a record's `mask_count_png`."""
    _convention(convention)
    return mask_from_count(count_from_png(png_bytes), convention)


# ------------------------------------------------------------------------------------------
# Shards and meta.json.
# ------------------------------------------------------------------------------------------


def shard_name(split: str, i: int, n: int) -> str:
    """`<split>.array_record-00000-of-00016`."""
    if not 0 <= i < n:
        raise ValueError(f"shard index {i} outside 0..{n - 1}")
    return f"{split}.array_record-{i:05d}-of-{n:05d}"


def meta_path(out_dir: str | os.PathLike, split: str) -> Path:
    return Path(out_dir) / f"{split}{META_SUFFIX}"


def available_splits(out_dir: str | os.PathLike) -> list[str]:
    """Splits of `out_dir` that have a meta.json (complete or not), sorted."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p.name[: -len(META_SUFFIX)] for p in out_dir.glob(f"*{META_SUFFIX}"))


def _split_files(out_dir: Path, split: str) -> list[Path]:
    """Shard files and partial files of `split` (whatever their shard count)."""
    return sorted(out_dir.glob(f"{split}.array_record-*"))


def is_complete(out_dir: str | os.PathLike, split: str) -> bool:
    """True iff the split's meta.json exists, parses, and every shard it lists exists."""
    try:
        read_meta(out_dir, split)
    except (FileNotFoundError, ValueError):
        return False
    return True


def read_meta(out_dir: str | os.PathLike, split: str) -> dict[str, Any]:
    """The split's meta.json; one-line errors for a missing dir/split or an incomplete split."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"records directory not found: {out_dir}")
    path = meta_path(out_dir, split)
    if not path.is_file():
        avail = available_splits(out_dir)
        if _split_files(out_dir, split):
            raise FileNotFoundError(
                f"split {split!r} in {out_dir} is incomplete (shards but no {path.name}; "
                "re-run the converter)"
            )
        raise FileNotFoundError(
            f"split {split!r} not found in {out_dir} "
            f"(available: {', '.join(avail) if avail else 'none'})"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise ValueError(f"{path} has no shard list")  # noqa: TRY004 - bad file content
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema_version {meta.get('schema_version')}, this code reads {SCHEMA_VERSION}"
        )
    missing = [s for s in meta["shards"] if not (out_dir / s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"split {split!r} in {out_dir} is incomplete: missing shard {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    return meta


def shard_paths(out_dir: str | os.PathLike, split: str) -> list[str]:
    """Paths of a complete split's shards, sorted (= record order); errors as `read_meta`."""
    meta = read_meta(out_dir, split)
    return sorted(str(Path(out_dir) / s) for s in meta["shards"])


def remove_split(out_dir: str | os.PathLike, split: str) -> None:
    """Delete the split's meta.json first (so it stops being complete), then its shard files."""
    out_dir = Path(out_dir)
    for p in (meta_path(out_dir, split), Path(str(meta_path(out_dir, split)) + PARTIAL_SUFFIX)):
        p.unlink(missing_ok=True)
    for p in _split_files(out_dir, split):
        p.unlink()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = Path(str(path) + PARTIAL_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_shards(
    records_iter: Iterable[Mapping[str, Any] | bytes],
    out_dir: str | os.PathLike,
    split: str,
    num_shards: int,
    meta: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write records round-robin (record i -> shard i % num_shards) and then meta.json.

    `records_iter` yields record dicts (validated and encoded here) or already encoded bytes.
    `meta` may be a callable, called after the last record (for statistics gathered while
    iterating).
    Any previous output of the split is removed first. Each shard is written as
    `<name>.partial` and renamed after a successful close; meta.json (the given `meta` plus
    `schema_version`, `split`, `shards`, `num_records`, `shard_sizes`, and, in record order,
    `ref_ids`, `image_ids` and `sentence_counts`) is written last. Returns the written meta.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_split(out_dir, split)
    names = [shard_name(split, i, num_shards) for i in range(num_shards)]
    partials = [out_dir / (n + PARTIAL_SUFFIX) for n in names]
    # (ref_id, image_id, num sentences) per record of each shard
    per_shard: list[list[tuple[int, int, int]]] = [[] for _ in names]
    writers = [ArrayRecordWriter(str(p), WRITER_OPTIONS) for p in partials]
    try:
        for i, rec in enumerate(records_iter):
            if isinstance(rec, (bytes, bytearray)):
                data = bytes(rec)
                dec = decode_record(data)
            else:
                dec = validate_record(rec)
                data = encode_record(dec)
            writers[i % num_shards].write(data)
            per_shard[i % num_shards].append(
                (int(dec["ref_id"]), int(dec["image_id"]), len(dec["sent_ids"])))
    finally:
        for w in writers:
            w.close()
    for p, n in zip(partials, names):
        os.replace(p, out_dir / n)
    order = [x for shard in per_shard for x in shard]
    full = dict((meta() if callable(meta) else meta) or {})
    full.update(
        schema_version=SCHEMA_VERSION,
        split=split,
        shards=names,
        num_records=len(order),
        shard_sizes=[len(s) for s in per_shard],
        ref_ids=[r for r, _, _ in order],
        # The mixture overlap filter reads these instead of decoding every record.
        image_ids=[i for _, i, _ in order],
        sentence_counts=[s for _, _, s in order],
    )
    _write_json_atomic(meta_path(out_dir, split), full)
    return full


class RecordSource:
    """Random-access sequence of decoded records of one complete split (for grain).

    `grain.MapDataset.source(RecordSource(dir, "val"))[i]` is the i-th record (shard-major
    order, matching meta.json). Picklable: the ArrayRecord reader opens lazily per process.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str):
        self.out_dir = str(out_dir)
        self.split = split
        self.meta = read_meta(out_dir, split)
        self.paths = shard_paths(out_dir, split)
        self._source = None
        self._len = int(self.meta["num_records"])

    def _src(self):
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource(self.paths)
            if len(self._source) != self._len:
                raise ValueError(
                    f"split {self.split!r} in {self.out_dir}: shards hold {len(self._source)} "
                    f"records, meta.json says {self._len}"
                )
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"record index {index} out of range for {self._len} records")
        return decode_record(self._src()[index])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return f"RecordSource({self.out_dir!r}, {self.split!r}, {self._len} records)"
