"""Benchmarks: `python -m magnet_jax.bench forward --config configs/magnet.py:ARG --batch-size N`
and `python -m magnet_jax.bench data --data DIR [--split train] [--image_size 480]`.

forward: jit-compiled inference (logits at input resolution) on random weights: compile
time, images/s over --iters timed calls after a warm-up, peak host memory.

data: the training input pipeline end to end (read, decode, pick a sentence, resize,
normalise, batch; ids are stored tokenised) with 0, 1 and 2 worker processes (--workers):
examples/s over --data_batches batches after --data_warmup batches (worker start-up is timed
separately).

Figures go to docs/benchmarks.md with the machine, command and date.
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

_DATA = flags.DEFINE_string("data", None, "bench data: records directory (e.g. synthetic)")
_SPLIT = flags.DEFINE_string("split", "train", "bench data: split to read")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 480, "bench data: square output size")
_GLOBAL_BATCH = flags.DEFINE_integer("global_batch", 32, "bench data: examples per batch")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "bench data: worker counts to time")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 30, "bench data: timed batches")
_DATA_WARMUP = flags.DEFINE_integer("data_warmup", 3, "bench data: untimed batches first")
# Dashed spellings too (`--batch-size 2`), as the rest of the project's CLIs use them.
for _name in ("batch_size", "image_size", "global_batch", "data_batches", "data_warmup"):
    flags.DEFINE_alias(_name.replace("_", "-"), _name)

WHATS = ("forward", "data")


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


def bench_data(data_dir: str, split: str, image_size: int, global_batch: int, workers: int,
               batches: int, warmup: int, seed: int) -> dict:
    from magnet_jax.data import pipeline
    ds = pipeline.train_dataset(data_dir, split, image_size=image_size, global_batch=global_batch,
                                seed=seed, process_index=0, process_count=1)
    start = time.perf_counter()
    it = pipeline.make_iterator(ds, workers, read_threads=2, prefetch_buffer=2 * global_batch)
    try:
        for _ in range(warmup):
            next(it)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        elapsed = time.perf_counter() - start
    finally:
        if hasattr(it, "close"):
            it.close()
    return {"what": "data", "data": data_dir, "split": split, "image_size": image_size,
            "global_batch": global_batch, "workers": workers, "batches": batches,
            "startup_s": round(startup, 2),
            "examples_per_s": round(batches * global_batch / elapsed, 1),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d")}


def main(argv):
    if len(argv) != 2 or argv[1] not in WHATS:
        print(f"usage: python -m magnet_jax.bench {{{'|'.join(WHATS)}}} --config FILE[:ARG] ... "
              "| data --data DIR", file=sys.stderr)
        return 2
    if argv[1] == "data":
        if not _DATA.value:
            print("error: bench data needs --data DIR (a records directory)", file=sys.stderr)
            return 2
        for w in _WORKERS.value:
            print(json.dumps(bench_data(_DATA.value, _SPLIT.value, _IMAGE_SIZE.value,
                                        _GLOBAL_BATCH.value, int(w), _DATA_BATCHES.value,
                                        _DATA_WARMUP.value, _SEED.value)), flush=True)
        return 0
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
