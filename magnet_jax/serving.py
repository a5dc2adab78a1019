"""Load and call an exported MagNet (written by `magnet_jax.export`) with only jax and numpy.

A serving process imports this module alone: no model code, no flax. It needs jax (with the
backend the export was made for), numpy and flatbuffers (jax.export's serialization format).

    from magnet_jax.serving import load_export
    model = load_export("exported/")           # reads DIR/model.stablehlo + DIR/params.npz
    logits = model(image, ids, att)             # (B, S, S) float32, pre-sigmoid
    mask = jax.nn.sigmoid(logits) > 0.5

Layout of DIR:
  DIR/model.stablehlo  `jax.export.Exported.serialize()` of logits = f(params, image, ids, att)
  DIR/params.npz       the params, one array per '/'-joined path ('swin/layers_0/.../kernel')
  DIR/export.json      input/output shapes and dtypes, preprocessing notes, platforms, model config
  DIR/COMPLETE         written last; a directory without it is a partial export
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "magnet_jax.export/1"
MODEL_FILE = "model.stablehlo"
PARAMS_FILE = "params.npz"
METADATA_FILE = "export.json"
COMPLETE = "COMPLETE"


class ExportError(ValueError):
    """An export directory is partial, inconsistent or was made for another platform."""


def param_key(path) -> str:
    """'/'-joined dict keys of a pytree path: the params.npz key of one leaf."""
    parts = []
    for entry in path:
        if not isinstance(entry, jax.tree_util.DictKey):
            raise ExportError(f"params must be nested dicts of arrays; found {entry!r} in "
                              f"{jax.tree_util.keystr(path)}")
        key = str(entry.key)
        if "/" in key:
            raise ExportError(f"param name {key!r} contains '/', which params.npz uses as separator")
        parts.append(key)
    return "/".join(parts)


def params_avals(exported: jax.export.Exported):
    """The params argument of the exported function as a pytree of its abstract values."""
    (params, *_inputs), _kwargs = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    return params


def check_param_arrays(exported: jax.export.Exported, arrays: dict[str, Any]):
    """-> the params pytree the exported function takes, built from {key: array}.

    Raises one ExportError that names every missing, unexpected or wrongly shaped key.
    """
    avals = params_avals(exported)
    expected, treedef = jax.tree_util.tree_flatten_with_path(avals)
    keys = [param_key(path) for path, _ in expected]
    missing = sorted(set(keys) - set(arrays))
    unexpected = sorted(set(arrays) - set(keys))
    leaves, wrong = [], []
    for key, (_, aval) in zip(keys, expected):
        if key not in arrays:
            continue
        array = arrays[key]
        dtype = np.dtype(aval.dtype)
        if array.dtype != dtype and array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
            array = array.view(dtype)  # numpy stores bfloat16 & co. as raw bytes
        if tuple(array.shape) != tuple(aval.shape) or array.dtype != dtype:
            wrong.append(f"{key}: {array.dtype}{list(array.shape)} vs {dtype}{list(aval.shape)}")
        leaves.append(array)
    problems = [f"{what} ({len(names)}): {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape/dtype", wrong)) if names]
    if problems:
        raise ExportError("params do not match the exported function: " + "; ".join(problems))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_directory(directory: str) -> None:
    if not os.path.exists(directory):
        raise FileNotFoundError(f"no exported model at {directory}: the directory does not exist")
    if not os.path.isdir(directory):
        raise ExportError(f"{directory} is not a directory (expected an exported model directory)")
    if not os.path.exists(os.path.join(directory, COMPLETE)):
        raise ExportError(f"{directory} is a partial export (no {COMPLETE} marker): the export that "
                          "wrote it did not finish; export again")
    for name in (MODEL_FILE, PARAMS_FILE, METADATA_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise ExportError(f"{directory} has no {name}")


class ExportedModel:
    """(image, ids, att) -> logits, from an export directory; compiled once per batch size."""

    def __init__(self, exported: jax.export.Exported, params, metadata: dict[str, Any]):
        self.exported = exported
        self.metadata = metadata
        (_, self._image_aval, self._ids_aval, _, *extra), _ = jax.tree_util.tree_unflatten(
            exported.in_tree, exported.in_avals)
        # Extra inputs of some methods (e.g. MaIL's instance masks), in the metadata's order.
        self.extra_names = list(metadata.get("inputs", {}))[3:3 + len(extra)]
        self._extra_avals = extra
        self.image_size = int(self._image_aval.shape[1])
        self.max_tokens = int(self._ids_aval.shape[1])
        # On the device once: the params are the bulk of every call's arguments.
        self.params = jax.device_put(params)
        self._call = jax.jit(exported.call)

    def __call__(self, image, ids, att, **extra) -> jax.Array:
        """image float32 (B, S, S, 3) normalised; ids, att int32 (B, T) -> (B, S, S) float32.
        `extra`: the method's extra inputs by name (metadata "inputs"), all required."""
        image = jnp.asarray(image, jnp.float32)
        ids = jnp.asarray(ids, jnp.int32)
        att = jnp.asarray(att, jnp.int32)
        size, tokens = self.image_size, self.max_tokens
        if image.ndim != 4 or image.shape[1:] != (size, size, 3):
            raise ExportError(f"image must be (B, {size}, {size}, 3), got {image.shape}")
        if ids.shape != (image.shape[0], tokens) or att.shape != ids.shape:
            raise ExportError(f"ids and att must be ({image.shape[0]}, {tokens}) for a batch of "
                              f"{image.shape[0]} images, got {ids.shape} and {att.shape}")
        batch = self._image_aval.shape[0]
        if not jax.export.is_symbolic_dim(batch) and image.shape[0] != batch:
            raise ExportError(f"this export takes batches of exactly {batch}, got {image.shape[0]}")
        missing = [n for n in self.extra_names if n not in extra]
        unknown = sorted(set(extra) - set(self.extra_names))
        if missing or unknown:
            raise ExportError(f"this export takes the extra inputs {self.extra_names}; missing "
                              f"{missing}, unknown {unknown}")
        args = [jnp.asarray(extra[n], aval.dtype) for n, aval in
                zip(self.extra_names, self._extra_avals)]
        return self._call(self.params, image, ids, att, *args)


def load_export(directory: str | os.PathLike) -> ExportedModel:
    """Read an export directory; fails with one ExportError line when it is partial or does not
    fit this process (another platform, mismatched params)."""
    directory = os.fspath(directory)
    _check_directory(directory)
    meta_path = os.path.join(directory, METADATA_FILE)
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ExportError(f"{meta_path} has format {found!r}, expected {FORMAT!r}")
    with open(os.path.join(directory, MODEL_FILE), "rb") as f:
        blob = f.read()
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as e:  # noqa: BLE001  (corrupt file, missing flatbuffers, newer format)
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ExportError(f"cannot deserialize {directory}/{MODEL_FILE}: {first}") from None
    platform = jax.export.default_export_platform()
    if platform not in exported.platforms:
        raise ExportError(f"{directory} was exported for {', '.join(exported.platforms)}, this "
                          f"process runs on {platform}; export again with --platforms "
                          f"{','.join((*exported.platforms, platform))}")
    try:
        with np.load(os.path.join(directory, PARAMS_FILE), allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {directory}/{PARAMS_FILE}: {e}") from None
    return ExportedModel(exported, check_param_arrays(exported, arrays), metadata)


__all__ = ["FORMAT", "ExportError", "ExportedModel", "load_export"]
