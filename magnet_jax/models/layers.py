"""Small layers shared by the MagNet modules: Dense/norm factories with PyTorch numerics,
stochastic depth and the tanh gates.

Every factory takes the logical axis names used by `magnet_jax.sharding`; norm scales and
biases stay unannotated (replicated).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# Exact erf GELU everywhere (magnet_architecture.md §8); Flax defaults to the tanh form.
gelu = functools.partial(nn.gelu, approximate=False)

# timm trunc_normal_(std=0.02) truncates at ±2 absolute, i.e. effectively N(0, 0.02²).
normal_002 = nn.initializers.normal(0.02)
# PyTorch's default Linear/Conv init: kaiming_uniform(a=√5) = U(±1/√fan_in).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense(features: int, *, name: str, use_bias: bool = True,
          kernel_init: Initializer = normal_002,
          bias_init: Initializer = nn.initializers.zeros,
          axes: tuple[str | None, str | None] = ("embed", "mlp"),
          dtype: Dtype = jnp.float32, precision=None) -> nn.Dense:
    """nn.Dense with a logically partitioned kernel (PyTorch Linear / 1×1 conv equivalent)."""
    return nn.Dense(
        features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=jnp.float32,
        precision=precision,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        # Biases stay replicated: tiny, and added to activations sharded over the batch.
        bias_init=nn.with_logical_partitioning(bias_init, (None,)))


def layer_norm(epsilon: float, *, name: str, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """PyTorch LayerNorm numerics: two-pass biased variance, explicit epsilon."""
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name, dtype=dtype,
                        param_dtype=jnp.float32)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm DropPath); identity when deterministic or rate 0."""
    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, rate: jax.Array | None = None) -> jax.Array:
        """rate: overrides the attribute (a traced per-layer rate inside a scanned stack)."""
        if deterministic or (rate is None and self.rate == 0.0):
            return x
        if rate is None:
            keep = 1.0 - self.rate
        else:
            # The same float32 value the static path uses, in x's dtype for the division.
            keep = (1.0 - jnp.asarray(rate, jnp.float32))
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("droppath"), keep, shape)
        divisor = keep if rate is None else keep.astype(x.dtype)
        return jnp.where(mask, x / divisor, jnp.zeros_like(x))


class TanhGate(nn.Module):
    """Gated residual x + tanh(fc2(act(fc1(f)))) ⊙ f (magnet_architecture.md §3.2, §4.2).

    The image side uses GELU, the language side ReLU; both Dense layers have no bias.
    """
    features: int
    activation: str = "gelu"
    kernel_init: Initializer = normal_002
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, f: jax.Array) -> jax.Array:
        act = gelu if self.activation == "gelu" else nn.relu
        h = dense(self.features, name="fc1", use_bias=False, kernel_init=self.kernel_init,
                  dtype=self.dtype)(f)
        h = dense(self.features, name="fc2", use_bias=False, kernel_init=self.kernel_init,
                  dtype=self.dtype)(act(h))
        return x + jnp.tanh(h) * f


def stochastic_depth_rates(total_rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Per-block drop-path rates, linspace(0, total_rate, sum(depths)) split by stage."""
    n = sum(depths)
    flat = [total_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


def block_accumulated_dot(x: jax.Array, kernel: jax.Array, block: int) -> jax.Array:
    """x @ kernel in float32 with the contraction summed in blocks of at most `block` inputs,
    the partial products then added pairwise.

    XLA's CPU dot accumulates the whole contraction in one running float32 sum; blocking
    cuts that rounding error several-fold (measured on a 512-wide projection: 1.9e-5 -> 4.8e-6
    against float64; PyTorch's MKL gives 8.3e-6).
    """
    n_in = x.shape[-1]
    x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
    size = max(d for d in range(1, min(block, n_in) + 1) if n_in % d == 0)
    terms = [jnp.dot(x[..., i:i + size], kernel[i:i + size], precision=jax.lax.Precision.HIGHEST)
             for i in range(0, n_in, size)]
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
    return terms[0]


class BlockAccumulatedDense(nn.Module):
    """A float32 Dense layer (same parameters as nn.Dense) using `block_accumulated_dot`.

    Used where the official model amplifies rounding: the language PWAM, whose token-axis
    InstanceNorm divides by per-channel spreads near 3e-3 (docs/parity.md).
    """
    features: int
    block: int = 64
    kernel_init: Initializer = normal_002
    axes: tuple[str | None, str | None] = ("embed", "mlp")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                          (self.features,), jnp.float32)
        return block_accumulated_dot(x, kernel, self.block) + bias
