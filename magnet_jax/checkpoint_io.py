"""Converted-weights directories: one params tree + its model config (`jax_stack.md` §7.3).

Layout of DIR (written by `save_params`, read by `load_params`):
  DIR/params/     orbax StandardSave of the unboxed params pytree (root = the params dict,
                  no {'params': ...} wrapper)
  DIR/config.json {"format": ..., "model": <model ConfigDict as dict>, "source": <extra>}
  DIR/COMPLETE    written last
Everything is written into DIR.tmp-<pid> and renamed into place, so a killed run never leaves
a directory that looks complete. Training checkpoints (state + data iterator) are a separate
concern (`magnet_jax/checkpointing.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from magnet_jax.weights.common import (WeightConversionError, WeightFileError,
                                       WeightFileNotFoundError, check_against_abstract,
                                       count_params, flatten_tree, unbox, unflatten_tree)

FORMAT = "magnet_jax.params/1"
COMPLETE = "COMPLETE"
CONFIG = "config.json"
PARAMS = "params"


class CheckpointError(WeightFileError):
    """A converted-weights directory is missing pieces, partial or of another model."""


def _to_plain_numpy(tree: Mapping[str, Any]) -> dict[str, Any]:
    import jax  # pylint: disable=g-import-not-at-top
    flat = flatten_tree(tree)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}
    return unflatten_tree(flat)


def _config_to_dict(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "copy_and_resolve_references"):
        cfg = cfg.copy_and_resolve_references()
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    return json.loads(json.dumps(dict(cfg)))  # fails early on anything not JSON-serialisable


def tuples_from_json(x: Any) -> Any:
    """JSON lists back to tuples (model configs use tuples, hashable for Linen fields)."""
    if isinstance(x, dict):
        return {k: tuples_from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(tuples_from_json(v) for v in x)
    return x


@contextlib.contextmanager
def atomic_directory(directory: str):
    """Yield a temporary sibling of `directory` to fill; when the block succeeds it takes the
    place of `directory` by rename (an old one is moved aside first), so a killed writer
    never leaves a directory that looks complete."""
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(directory):
            old = f"{directory}.old-{os.getpid()}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
            os.rename(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_params(directory: str, params: Mapping[str, Any], model_config: Any,
                extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> str:
    """Write params + config to `directory` atomically; returns the absolute path."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory} exists and is not a directory")
        if os.listdir(directory) and not overwrite:
            raise CheckpointError(f"{directory} exists and is not empty; pass overwrite=True "
                                  "(--overwrite) to replace it")
    params = unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    tree = _to_plain_numpy(params)
    record = {"format": FORMAT, "model": _config_to_dict(model_config), "source": dict(extra or {})}
    json.dumps(record)  # validate before writing anything

    with atomic_directory(directory) as tmp:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS), tree)
        ckptr.wait_until_finished()
        ckptr.close()
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            json.dump({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_params": count_params(tree)}, f)
    return directory


def read_config(directory: str, expect_model: str | None = "magnet"):
    """Validate `directory` and return (ConfigDict of the model section, full record dict)."""
    import ml_collections  # pylint: disable=g-import-not-at-top
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise WeightFileNotFoundError(
            f"no converted checkpoint at {directory}: the directory does not exist")
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{directory} is not a directory (expected a converted checkpoint directory)")
    if not os.listdir(directory):
        raise CheckpointError(f"{directory} is empty, not a converted checkpoint")
    if not os.path.exists(os.path.join(directory, COMPLETE)):
        raise CheckpointError(
            f"{directory} is a partial checkpoint (no {COMPLETE} marker): the run that wrote it did "
            "not finish; convert or save again")
    path = os.path.join(directory, CONFIG)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise CheckpointError(f"{path} has no 'model' section")
    name = record["model"].get("name")
    if expect_model is not None and name != expect_model:
        raise CheckpointError(f"{directory} holds weights of model {name!r}, expected {expect_model!r}")
    return ml_collections.ConfigDict(tuples_from_json(record["model"])), record


def _stored_tree(ckptr, path: str):
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    return getattr(meta, "tree", meta)


def load_params(directory: str, abstract: Mapping[str, Any] | None = None,
                expect_model: str | None = "magnet"):
    """-> (model ConfigDict, params).

    Without `abstract`, leaves are restored as NumPy arrays (host memory, any device count).
    With `abstract` (e.g. `jax.eval_shape(model.init, ...)`, boxed or not, with or without the
    'params' wrapper; leaves may carry shardings) the stored shapes are checked against it first
    (one error naming every mismatching path), then each leaf is restored with the abstract
    leaf's sharding (NumPy when it has none).
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    cfg, _ = read_config(directory, expect_model)
    path = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS)
    if not os.path.isdir(path):
        raise CheckpointError(f"{directory} has no {PARAMS}/ directory")
    ckptr = ocp.StandardCheckpointer()
    try:
        if abstract is None:
            params = ckptr.restore(path)
        else:
            from flax import linen as nn  # pylint: disable=g-import-not-at-top
            import jax  # pylint: disable=g-import-not-at-top
            target = nn.unbox(abstract)
            if isinstance(target, Mapping) and set(target) == {"params"}:
                target = target["params"]
            try:
                stored = _stored_tree(ckptr, path)
            except Exception as e:  # pylint: disable=broad-except
                raise CheckpointError(f"cannot read {path} ({str(e).splitlines()[0][:200]})") from None
            try:
                check_against_abstract(stored, target, what=f"weights in {directory}")
            except WeightConversionError as e:
                raise CheckpointError(str(e)) from None
            target = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                target)
            params = ckptr.restore(path, target)
    except CheckpointError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f"cannot restore {path}: {str(e).splitlines()[0][:300]}") from None
    finally:
        ckptr.close()
    return cfg, params
