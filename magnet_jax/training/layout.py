"""The train state's parameter layout: the layers the model scans over, stored stacked.

The model keeps one parameter subtree per layer (the official layout) and stacks a stack's
layers inside the graph when it scans over them (`models/stacks.py`). In a train step that
costs a concatenation per stacked parameter in the forward pass and a slice per layer
parameter in the backward pass, and the optimiser updates each layer's leaves one by one (XLA's
CPU backend emits 3-4 kernels per leaf for AdamW). `StackedLayout` stores each group of leaves
that the model stacks as one array with a leading layer axis, at the path of the group's first
leaf; the other members' paths are left out. The train step splits the arrays again before the
loss (`unstack_in_graph`): XLA folds those slices into the model's own concatenation, and the
gradient's concatenation into the scan's stacked gradient, so the state, the gradients and the
optimiser see about a third of the leaves (docs/benchmarks.md, "Stacked train state").

The groups are found by tracing the loss once (`discover`): exactly what `stacks.stack_trees`
stacks, in its order, and only groups whose leaves the optimiser treats alike. Only the train
state uses this layout (the training loop's evaluation reads it through `unstack` inside its
step): checkpoints, exported parameters, the evaluate and predict commands, pretrained imports
and the converters see the per-layer tree (`unstack_state` before a save, `stack_state` after
a restore), so checkpoints written before still restore.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Path = tuple[str, ...]


def _is_leaf(x: Any) -> bool:
    # Boxed parameters (logical sharding names) and optax's placeholders of masked leaves are
    # moved as one piece.
    return isinstance(x, (nn.Partitioned, optax.MaskedNode))


def leaves_by_path(tree: Any) -> dict[Path, Any]:
    """{("image_model", "layers_0", ...): leaf} of a nested-dict tree (boxes and MaskedNodes
    as leaves)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
    return {tuple(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def _nest(flat: dict[Path, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _shift_sharding(sharding: Any, stacked: bool) -> Any:
    """A NamedSharding with the layer axis added (replicated) or removed; others unchanged."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    spec = (None,) + spec if stacked else spec[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def stack_leaves(leaves: Sequence[Any]) -> Any:
    """Arrays, abstract arrays, shardings and boxed parameters -> one with a leading layer
    axis."""
    first = leaves[0]
    if isinstance(first, optax.MaskedNode):
        return first
    if isinstance(first, jax.sharding.Sharding):
        return _shift_sharding(first, stacked=True)
    if isinstance(first, nn.Partitioned):
        # .value, not unbox(): unboxing would apply the sharding constraint here.
        value = stack_leaves([leaf.value for leaf in leaves])
        return first.replace(value=value, names=(None,) + tuple(first.names))
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(first.shape), first.dtype,
                                    sharding=_shift_sharding(first.sharding, stacked=True))
    return jnp.stack(leaves)


def split_leaf(leaf: Any, count: int) -> list[Any]:
    """The inverse of `stack_leaves` (MaskedNode placeholders repeat)."""
    if isinstance(leaf, optax.MaskedNode):
        return [leaf] * count
    if isinstance(leaf, jax.sharding.Sharding):
        return [_shift_sharding(leaf, stacked=False)] * count
    if isinstance(leaf, nn.Partitioned):
        return [leaf.replace(value=p, names=tuple(leaf.names)[1:])
                for p in split_leaf(leaf.value, count)]
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = _shift_sharding(leaf.sharding, stacked=False)
        return [jax.ShapeDtypeStruct(tuple(leaf.shape)[1:], leaf.dtype, sharding=sharding)
                for _ in range(count)]
    return [leaf[i] for i in range(count)]


@jax.custom_vjp
def _split_in_graph(x: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(x[i] for i in range(x.shape[0]))


def _split_fwd(x):
    return _split_in_graph(x), None


def _split_bwd(_, cotangents):
    # One concatenation of the layers' gradients, which XLA folds into the scan's stacked
    # gradient (the transpose of plain indexing would be one padded add per layer).
    return (jnp.stack(cotangents),)


_split_in_graph.defvjp(_split_fwd, _split_bwd)


@dataclasses.dataclass(frozen=True)
class StackedLayout:
    """groups: the paths of each stacked group's leaves, in layer order; the array sits at the
    first path. root_keys: the top-level keys of the parameter tree, which mark the
    parameter-shaped subtrees of a train state (params, AdamW's moments). No groups = the
    per-layer layout (every conversion returns its input)."""

    groups: tuple[tuple[Path, ...], ...] = ()
    root_keys: frozenset = frozenset()

    def __bool__(self) -> bool:
        return bool(self.groups)

    @property
    def num_stacked_leaves(self) -> int:
        return sum(len(g) for g in self.groups)

    def only(self, root_keys: Any) -> "StackedLayout":
        """The layout of the subtree under `root_keys` (e.g. the model without the training
        heads)."""
        keys = frozenset(root_keys)
        return StackedLayout(tuple(g for g in self.groups if g[0][0] in keys), keys)

    # Parameter trees -----------------------------------------------------------------------

    def stack(self, tree: Any, combine: Callable[[Sequence[Any]], Any] = stack_leaves) -> Any:
        """Per-layer tree -> stacked tree."""
        if not self.groups:
            return tree
        flat = leaves_by_path(tree)
        for group in self.groups:
            flat[group[0]] = combine([flat.pop(p) if i else flat[p]
                                      for i, p in enumerate(group)])
        return _nest(flat)

    def unstack(self, tree: Any, split: Callable[[Any, int], list] = split_leaf) -> Any:
        """Stacked tree -> per-layer tree."""
        if not self.groups:
            return tree
        flat = leaves_by_path(tree)
        for group in self.groups:
            for path, part in zip(group, split(flat[group[0]], len(group))):
                flat[path] = part
        return _nest(flat)

    def unstack_in_graph(self, params: Any) -> Any:
        """`unstack` inside a traced function, with the gradient as one concatenation."""
        return self.unstack(params, lambda leaf, count: list(_split_in_graph(leaf)))

    # Train states --------------------------------------------------------------------------

    def _is_params(self, x: Any) -> bool:
        return isinstance(x, dict) and frozenset(x) == self.root_keys

    def stack_state(self, state: Any) -> Any:
        """Every parameter-shaped subtree of `state` (params, optimiser moments) stacked."""
        if not self.groups:
            return state
        return jax.tree.map(lambda x: self.stack(x) if self._is_params(x) else x, state,
                            is_leaf=self._is_params)

    def unstack_state(self, state: Any) -> Any:
        if not self.groups:
            return state
        return jax.tree.map(lambda x: self.unstack(x) if self._is_params(x) else x, state,
                            is_leaf=self._is_params)


def discover(loss_fn: Callable, params: Any, batch: Any, key: jax.Array,
             same_treatment: Any = None) -> StackedLayout:
    """The groups the model stacks, found by tracing `loss_fn(params, batch, key)` once.

    params, batch: abstract (ShapeDtypeStructs) or concrete; nothing is compiled.
    same_treatment: a tree like params of hashable values (the optimiser's group and decay
    flag of each leaf); a group whose leaves differ in it is left per layer.
    """
    from magnet_jax.models import stacks

    paths_by_id: dict[int, Path] = {}

    def traced(p, b):
        paths_by_id.update({id(leaf): path for path, leaf in leaves_by_path(p).items()})
        return loss_fn(p, b, key)

    with stacks.record_stacks() as recorded:
        jax.eval_shape(traced, params, batch)
    treatment = leaves_by_path(same_treatment) if same_treatment is not None else {}
    groups: list[tuple[Path, ...]] = []
    used: set[Path] = set()
    for members in recorded:
        for position in range(len(members[0])):
            group = tuple(paths_by_id.get(id(m[position])) for m in members)
            if (None in group or len(set(group)) != len(group)
                    or any(p in used for p in group)
                    or len({treatment.get(p) for p in group}) != 1):
                continue      # not a parameter, seen before, or treated differently
            used.update(group)
            groups.append(group)
    return StackedLayout(tuple(groups), frozenset(params))


__all__ = ["StackedLayout", "discover", "leaves_by_path", "split_leaf", "stack_leaves"]
