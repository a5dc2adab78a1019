"""Shared helpers for importing PyTorch-layout weights into Linen parameter trees.

What lives here (see `magnet_architecture.md` §9.1 and `jax_stack.md` §10):
- layout transforms PyTorch -> Linen and their inverses (used by the round-trip tests);
- `KeyAccounting`: strict bookkeeping of consumed / ignored source keys that ends in ONE error
  naming every missing, unexpected or wrongly shaped key;
- tree helpers (`assign`, `flatten_tree`) and `check_against_abstract` (shape check against
  `jax.eval_shape` of the model's init);
- file readers: `load_torch_state_dict` (torch imported lazily, only here) and `load_safetensors`;
- `relative_position_index(window)`: the model's own formula (`models.ops`), used to check the
  buffers that checkpoints store.

Nothing in this module imports torch at import time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from magnet_jax.models.ops import relative_position_index  # noqa: F401 (re-exported)

# How many names an error message lists per category before summarising the rest.
_MAX_NAMES = 12


class WeightConversionError(ValueError):
    """A source checkpoint does not match the expected key map or shapes."""


class WeightFileError(ValueError):
    """A weight file exists but cannot be read (truncated, corrupt, wrong format)."""


class WeightFileNotFoundError(FileNotFoundError):
    """A weight file or directory does not exist."""

    def __str__(self) -> str:  # FileNotFoundError's default str includes errno noise.
        return str(self.args[0]) if self.args else "file not found"


def _names(items: Iterable[str], limit: int = _MAX_NAMES) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown


# ---------------------------------------------------------------------------------------------
# Layout transforms (magnet_architecture.md §9.1). All take and return NumPy arrays.


def _check_ndim(w: np.ndarray, ndim: int, what: str) -> None:
    if w.ndim != ndim:
        raise WeightConversionError(f"{what} weight must have {ndim} dims, got shape {tuple(w.shape)}")


def linear_to_dense(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight (out, in) -> Dense kernel (in, out)."""
    _check_ndim(w, 2, "Linear")
    return np.ascontiguousarray(w.T)


def dense_to_linear(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T)


def conv1d_to_dense(w: np.ndarray) -> np.ndarray:
    """nn.Conv1d kernel-size-1 weight (out, in, 1) -> Dense kernel (in, out)."""
    _check_ndim(w, 3, "Conv1d")
    if w.shape[2] != 1:
        raise WeightConversionError(f"Conv1d weight must have kernel size 1, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(w[:, :, 0].T)


def dense_to_conv1d(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T[:, :, None])


def conv1x1_to_dense(w: np.ndarray) -> np.ndarray:
    """nn.Conv2d 1x1 weight (out, in, 1, 1) -> Dense kernel (in, out)."""
    _check_ndim(w, 4, "Conv2d 1x1")
    if w.shape[2:] != (1, 1):
        raise WeightConversionError(f"Conv2d weight must be 1x1, got shape {tuple(w.shape)}")
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def dense_to_conv1x1(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T[:, :, None, None])


def conv_kxk_to_hwio(w: np.ndarray) -> np.ndarray:
    """nn.Conv2d weight (out, in, kh, kw) -> Linen Conv kernel (kh, kw, in, out)."""
    _check_ndim(w, 4, "Conv2d")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def hwio_to_conv_kxk(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def identity(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w)


# name -> (PyTorch -> Linen, Linen -> PyTorch)
TRANSFORMS: dict[str, tuple[Any, Any]] = {
    "none": (identity, identity),
    "linear": (linear_to_dense, dense_to_linear),
    "conv1d": (conv1d_to_dense, dense_to_conv1d),
    "conv1x1": (conv1x1_to_dense, dense_to_conv1x1),
    "hwio": (conv_kxk_to_hwio, hwio_to_conv_kxk),
}


def to_numpy(t: Any) -> np.ndarray:
    """Torch tensor / jax array / numpy array -> numpy array (no torch import needed)."""
    if hasattr(t, "detach"):  # torch.Tensor
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


# ---------------------------------------------------------------------------------------------
# Swin relative position index (magnet_architecture.md §2.3).


def window_from_bias_table(num_rows: int, key: str = "relative_position_bias_table") -> int:
    """(2w - 1)² rows -> w."""
    side = int(round(np.sqrt(num_rows)))
    if side * side != num_rows or side % 2 != 1:
        raise WeightConversionError(
            f"{key}: {num_rows} rows is not (2w-1)^2 for an integer window size w")
    return (side + 1) // 2


# ---------------------------------------------------------------------------------------------
# Trees.


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {'a/b/c': leaf}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, path))
        else:
            out[path] = v
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        assign(tree, path, v)
    return tree


def assign(tree: dict[str, Any], path: str, value: Any) -> None:
    """Set tree['a']['b']['c'] = value for path 'a/b/c', creating dicts; refuses to overwrite."""
    parts = path.split("/")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise WeightConversionError(
                f"cannot assign {path}: {'/'.join(parts[:i + 1])} already holds an array")
        node = nxt
    if parts[-1] in node:
        raise WeightConversionError(f"parameter {path} assigned twice")
    node[parts[-1]] = value


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for p in path.split("/"):
        if not isinstance(node, Mapping) or p not in node:
            raise KeyError(path)
        node = node[p]
    return node


def unbox(abstract: Any) -> Any:
    """Strip flax partitioning boxes (LogicallyPartitioned) if flax is around."""
    try:
        from flax import linen as nn  # pylint: disable=g-import-not-at-top
    except ImportError:  # pragma: no cover
        return abstract
    return nn.unbox(abstract)


def check_against_abstract(params: Mapping[str, Any], abstract: Mapping[str, Any],
                           what: str = "params") -> None:
    """Raise WeightConversionError naming every missing, extra or mis-shaped leaf.

    `abstract` is e.g. `jax.eval_shape(model.init, ...)`; a top-level {'params': ...} wrapper
    and flax partitioning boxes are removed first.
    """
    abstract = unbox(abstract)
    if isinstance(abstract, Mapping) and set(abstract.keys()) == {"params"} and "params" not in params:
        abstract = abstract["params"]
    got = flatten_tree(params)
    want = flatten_tree(abstract)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = []
    for path in sorted(set(want) & set(got)):
        gs, ws = tuple(np.shape(got[path])), tuple(want[path].shape)
        if gs != ws:
            bad.append(f"{path} (got {gs}, model expects {ws})")
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing leaves: {_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} leaves the model does not have: {_names(extra)}")
        if bad:
            parts.append(f"{len(bad)} shape mismatches: {_names(bad)}")
        raise WeightConversionError(f"{what} do not match the model: " + "; ".join(parts))


def count_params(tree: Mapping[str, Any]) -> int:
    return int(sum(int(np.prod(np.shape(v))) for v in flatten_tree(tree).values()))


# ---------------------------------------------------------------------------------------------
# Key accounting.


class KeyAccounting:
    """Tracks which source keys were consumed or ignored; `finish()` raises one error.

    Usage: `take(key, shape)` returns the array (or None after recording a problem),
    `ignore(key)` marks a known-dead key, `finish()` raises WeightConversionError listing
    missing keys, keys neither consumed nor ignored, and shape mismatches, all by name.
    """

    def __init__(self, state_dict: Mapping[str, Any], what: str = "checkpoint"):
        self.sd = state_dict
        self.what = what
        self.consumed: list[str] = []
        self.ignored: list[str] = []
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []
        self.other: list[str] = []
        self._seen: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray | None:
        if key not in self.sd:
            self.missing.append(key)
            return None
        if key in self._seen:
            raise WeightConversionError(f"key {key} consumed twice (converter bug)")
        self._seen.add(key)
        self.consumed.append(key)
        arr = to_numpy(self.sd[key])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            self.bad_shapes.append(f"{key} (got {tuple(arr.shape)}, expected {tuple(shape)})")
            return None
        return arr

    def ignore(self, key: str) -> np.ndarray | None:
        """Mark `key` as deliberately unused; returns its value (None when absent)."""
        if key not in self.sd or key in self._seen:
            return None
        self._seen.add(key)
        self.ignored.append(key)
        return to_numpy(self.sd[key])

    def error(self, message: str) -> None:
        """Record a problem that is not a missing/extra/shape issue (e.g. a buffer mismatch)."""
        self.other.append(message)

    def unexpected(self) -> list[str]:
        return sorted(k for k in self.sd if k not in self._seen)

    def finish(self) -> None:
        unexpected = self.unexpected()
        if not (self.missing or unexpected or self.bad_shapes or self.other):
            return
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys: {_names(self.missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
        if self.bad_shapes:
            parts.append(f"{len(self.bad_shapes)} wrong shapes: {_names(self.bad_shapes)}")
        if self.other:
            parts.append(_names(self.other))
        raise WeightConversionError(f"{self.what}: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------
# Readers.


def _check_file(path: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightFileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise WeightFileError(f"{path} is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"{path} is empty")
    return path


def _first_line(e: BaseException) -> str:
    """First sentence of an exception message (torch's run on for several lines)."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return text[0].split(". ")[0][:160]


def unwrap_state_dict(obj: Any, path: str = "checkpoint") -> dict[str, Any]:
    """{'model': sd} / {'state_dict': sd} / sd -> sd with any 'module.' prefix stripped."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise WeightFileError(f"{path} does not contain a state dict (found {type(obj).__name__})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise WeightFileError(f"{path} does not contain a state dict (non-string key {k!r})")
        if not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise WeightFileError(
                f"{path} does not contain a flat state dict (entry {k!r} is a {type(v).__name__})")
        sd[k[len("module."):] if k.startswith("module.") else k] = v
    return sd


def load_torch_state_dict(path: str, trusted: bool = False) -> dict[str, np.ndarray]:
    """Read a torch.save'd state dict as {key: np.ndarray}.

    Loads with `weights_only=True` (argparse.Namespace allow-listed, which the official MagNet
    checkpoints pickle next to the weights). Only when `trusted=True` does it fall back to
    `weights_only=False` (arbitrary code execution: trusted files only). Unwraps {'model': ...}
    and {'state_dict': ...}, strips 'module.'.
    """
    path = _check_file(path)
    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        raise WeightFileError(f"reading {path} needs torch (pip install the CPU build)") from e
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # zip archive (torch>=1.6) / legacy pickle
        raise WeightFileError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
        weights_only_refused = "weights only load failed" in str(e).lower()
        if not weights_only_refused:
            raise WeightFileError(
                f"cannot read {path}: truncated or corrupt ({_first_line(e)})") from None
        if not trusted:
            raise WeightFileError(
                f"{path} pickles objects other than tensors; load it with trusted=True "
                "(convert: --trusted) only if you trust its source") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # pylint: disable=broad-except
            raise WeightFileError(
                f"cannot read {path}: truncated or corrupt ({_first_line(e2)})") from None
    sd = unwrap_state_dict(obj, path)
    return {k: to_numpy(v) for k, v in sd.items()}


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    path = _check_file(path)
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
        sd = load_file(path)
    except Exception as e:  # pylint: disable=broad-except
        raise WeightFileError(
            f"cannot read {path}: truncated or corrupt safetensors ({_first_line(e)})") from None
    return unwrap_state_dict(sd, path)


def load_state_dict(path: str, trusted: bool = False) -> dict[str, np.ndarray]:
    """Dispatch on the file name: *.safetensors -> safetensors, else torch pickle."""
    if os.fspath(path).endswith(".safetensors"):
        return load_safetensors(path)
    return load_torch_state_dict(path, trusted=trusted)


def equal_split_ends(num_layers: int, num_stages: int = 4) -> tuple[int, ...]:
    """Stage ends splitting `num_layers` into `num_stages` near-equal parts, halves rounded up.

    12 -> (3, 6, 9, 12); 6 -> (2, 3, 5, 6) (the split suggested for a 6-layer MiniLM).
    """
    if num_layers < num_stages:
        raise WeightConversionError(f"cannot split {num_layers} layers into {num_stages} stages")
    ends = tuple((2 * num_layers * s + num_stages) // (2 * num_stages) for s in range(1, num_stages + 1))
    if len(set(ends)) != num_stages or ends[0] < 1:
        raise WeightConversionError(f"cannot split {num_layers} layers into {num_stages} stages")
    return ends


# ---------------------------------------------------------------------------------------------
# Declarative key maps: a list of Rules, applied forwards (PyTorch -> Linen) or inverted.


@dataclasses.dataclass(frozen=True)
class Rule:
    """One source key -> one Linen leaf (or three, for the MHA in_proj split)."""
    src: str
    dst: tuple[str, ...]
    kind: str  # a key of TRANSFORMS, or 'split3_kernel' / 'split3_bias'
    src_shape: tuple[int, ...]


class RuleBuilder:
    """Small DSL for writing key maps: one call per PyTorch layer."""

    def __init__(self):
        self.rules: list[Rule] = []

    def param(self, src, dst, shape, kind="none"):
        self.rules.append(Rule(src, (dst,), kind, tuple(int(s) for s in shape)))

    def linear(self, src, dst, out, inp, bias=True):
        self.param(f"{src}.weight", f"{dst}/kernel", (out, inp), "linear")
        if bias:
            self.param(f"{src}.bias", f"{dst}/bias", (out,))

    def conv1d(self, src, dst, out, inp):
        self.param(f"{src}.weight", f"{dst}/kernel", (out, inp, 1), "conv1d")
        self.param(f"{src}.bias", f"{dst}/bias", (out,))

    def conv1x1(self, src, dst, out, inp, bias=True):
        self.param(f"{src}.weight", f"{dst}/kernel", (out, inp, 1, 1), "conv1x1")
        if bias:
            self.param(f"{src}.bias", f"{dst}/bias", (out,))

    def norm(self, src, dst, c):
        self.param(f"{src}.weight", f"{dst}/scale", (c,))
        self.param(f"{src}.bias", f"{dst}/bias", (c,))

    def embedding(self, src, dst, rows, width):
        self.param(f"{src}.weight", f"{dst}/embedding", (rows, width))

    def mha(self, src, dst, d):
        """nn.MultiheadAttention: in_proj split in thirds (q, k, v), out_proj -> `out`."""
        qkv = tuple(f"{dst}/{n}" for n in ("query", "key", "value"))
        self.rules.append(Rule(f"{src}.in_proj_weight", tuple(f"{p}/kernel" for p in qkv),
                               "split3_kernel", (3 * d, d)))
        self.rules.append(Rule(f"{src}.in_proj_bias", tuple(f"{p}/bias" for p in qkv),
                               "split3_bias", (3 * d,)))
        self.linear(f"{src}.out_proj", f"{dst}/out", d, d)


def apply_rule(rule: Rule, arr: np.ndarray, params: dict[str, Any]) -> None:
    """Write the Linen leaf/leaves of `rule` computed from source array `arr` into `params`."""
    if rule.kind == "split3_kernel":
        d = arr.shape[1]
        for i, path in enumerate(rule.dst):
            assign(params, path, linear_to_dense(arr[i * d:(i + 1) * d]))
    elif rule.kind == "split3_bias":
        d = arr.shape[0] // 3
        for i, path in enumerate(rule.dst):
            assign(params, path, np.ascontiguousarray(arr[i * d:(i + 1) * d]))
    else:
        forward, _ = TRANSFORMS[rule.kind]
        assign(params, rule.dst[0], forward(arr))


def invert_rule(rule: Rule, params: Mapping[str, Any]) -> np.ndarray:
    """The source tensor of `rule`, rebuilt from the Linen leaves in `params`."""
    try:
        leaves = [np.asarray(get_path(params, p)) for p in rule.dst]
    except KeyError as e:
        raise WeightConversionError(f"params have no leaf {e.args[0]} (needed for {rule.src})") from None
    if rule.kind == "split3_kernel":
        value = np.concatenate([dense_to_linear(k) for k in leaves], axis=0)
    elif rule.kind == "split3_bias":
        value = np.concatenate(leaves, axis=0)
    else:
        _, inverse = TRANSFORMS[rule.kind]
        value = inverse(leaves[0])
    if tuple(value.shape) != rule.src_shape:
        raise WeightConversionError(
            f"{'/'.join(rule.dst)} gives {rule.src} shape {tuple(value.shape)}, "
            f"expected {rule.src_shape}")
    return value


def apply_rules(rules: Iterable[Rule], acc: KeyAccounting) -> dict[str, Any]:
    """Consume every rule's source key through `acc`; returns the (possibly partial) tree."""
    params: dict[str, Any] = {}
    for rule in rules:
        arr = acc.take(rule.src, rule.src_shape)
        if arr is not None:
            apply_rule(rule, np.asarray(arr, dtype=np.float32), params)
    return params
