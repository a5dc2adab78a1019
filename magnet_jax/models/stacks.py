"""Run a stack of identical layers as one `jax.lax.scan` over their unstacked parameters.

The parameter tree keeps one subtree per layer (`blocks_0`, `blocks_1`, ... as the official
checkpoints, the converters and the optimiser groups name them). At apply time the layers'
parameters are stacked inside the graph and the layer is traced and compiled once instead of
once per layer: XLA compile time grows with the number of operations, and the 18-block Swin
stage, the BERT stages and the decoder stacks dominate it (docs/benchmarks.md, "Compile time").
The stacking is a concatenate in the forward pass and a slice in the backward pass.

Modules call `scan_layers` from their apply path only; at init the layers run unrolled, so
that each one creates its own parameters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

# A stack runs unrolled below this many scan steps (one step gains nothing).
MIN_SCAN_STEPS = 2


# Open `record_stacks` lists: each receives the leaves of every stack formed while open.
_recorders: list[list] = []


@contextlib.contextmanager
def record_stacks():
    """Collect what `stack_trees` stacks while open: one entry per call, the list of each
    tree's leaves. training/layout.py traces the loss under it to find the parameter groups
    the train state can store stacked."""
    found: list[list[list[Any]]] = []
    _recorders.append(found)
    try:
        yield found
    finally:
        _recorders.remove(found)


def stack_trees(trees: Sequence[Any]) -> Any:
    """[tree_0, tree_1, ...] of equal structure -> one tree with a leading layer axis."""
    for found in _recorders:
        found.append([jax.tree.leaves(t) for t in trees])
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def scan_layers(step: Callable[[Any, Any, Any], Any], carry: Any, params: Sequence[Any],
                inputs: Any = None, remat: bool = False) -> tuple[Any, Any]:
    """Fold `step(carry, params_k, inputs_k) -> (carry, output_k)` over k = 0 .. len(params)-1.

    params: one parameter tree per scan step, stacked here; inputs: per-step arrays with a
    leading axis of len(params) (or None). remat recomputes each step's activations in the
    backward pass (only the carry between steps is kept), as `nn.remat` does per layer.
    Returns (final carry, stacked outputs).
    """
    def body(c, xs):
        p, x = xs
        return step(c, p, x)

    if remat:
        # prevent_cse=False: inside scan the recomputation cannot be merged away anyway.
        body = jax.checkpoint(body, prevent_cse=False)
    return jax.lax.scan(body, carry, (stack_trees(params), inputs))


def layer_keys(key: jax.Array | None, count: int) -> jax.Array | None:
    """One RNG key per scan step from a module's key (None when deterministic)."""
    return None if key is None else jax.random.split(key, count)


__all__ = ["MIN_SCAN_STEPS", "layer_keys", "record_stacks", "scan_layers", "stack_trees"]
