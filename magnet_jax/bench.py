"""Benchmarks: `python -m magnet_jax.bench forward --config configs/magnet.py:ARG --batch_size N`.

forward: jit-compiled inference (logits at input resolution) on random weights: compile
time, images/s over --iters timed calls after a warm-up, peak host memory. Figures go to
docs/benchmarks.md with the machine, command and date.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path[:arg])",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "converted checkpoint directory: its model "
                                  "config and weights replace --config and the random weights")
_BATCH = flags.DEFINE_integer("batch_size", 1, "images per call")
_ITERS = flags.DEFINE_integer("iters", 5, "timed calls")
_SEED = flags.DEFINE_integer("seed", 0, "random weights and inputs")

WHATS = ("forward",)


def bench_forward(model_config, name: str, batch_size: int, iters: int, seed: int,
                  params=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from magnet_jax.models import build_model, mask_logits_at, random_params
    model = build_model(model_config)
    size = model_config.image_size
    if params is None:
        params = random_params(model, size, seed)
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.standard_normal((batch_size, size, size, 3), np.float32))
    ids = jnp.asarray(rng.integers(1000, 2000, (batch_size, 20)), jnp.int32)
    att = jnp.asarray((np.arange(20)[None] < rng.integers(4, 21, (batch_size, 1))).astype(np.int32))

    @jax.jit
    def forward(params, image, ids, att):
        return mask_logits_at(model.apply({"params": params}, image, ids, att), (size, size))

    start = time.perf_counter()
    compiled = forward.lower(params, image, ids, att).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, image, ids, att))            # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, image, ids, att))
        times.append(time.perf_counter() - start)
    step = float(np.median(times))
    return dict(what="forward", config=name, image_size=size, batch_size=batch_size,
                iters=iters, compile_s=round(compile_s, 2), step_s=round(step, 4),
                images_per_s=round(batch_size / step, 3),
                peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                devices=str(jax.devices()[0].platform), cpus=os.cpu_count(),
                machine=platform.machine(), jax=jax.__version__,
                date=time.strftime("%Y-%m-%d"))


def main(argv):
    if len(argv) != 2 or argv[1] not in WHATS:
        print(f"usage: python -m magnet_jax.bench {{{'|'.join(WHATS)}}} --config FILE[:ARG] ...",
              file=sys.stderr)
        return 2
    if _CHECKPOINT.value:
        from magnet_jax import checkpoint_io
        model_config, params = checkpoint_io.load_params(_CHECKPOINT.value)
        name = _CHECKPOINT.value
    elif _CONFIG.value is not None:
        model_config, params, name = _CONFIG.value.model, None, _CONFIG.value.name
    else:
        print("error: give --config FILE[:ARG] (e.g. configs/magnet.py:tiny) or --checkpoint DIR",
              file=sys.stderr)
        return 2
    result = bench_forward(model_config, name, _BATCH.value, _ITERS.value, _SEED.value, params)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    app.run(main)
