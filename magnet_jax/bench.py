"""Benchmarks: `python -m magnet_jax.bench forward --config configs/magnet.py:ARG --batch-size N`,
`python -m magnet_jax.bench train --config configs/NAME.py --batch-size N [--config.key=value]`,
`python -m magnet_jax.bench compile --config configs/NAME.py --batch-size N [--parts forward,train]`
and `python -m magnet_jax.bench data --data DIR [--split train] [--image_size 480]`.

compile: for the inference forward pass and the full train step of a config, on abstract
inputs (nothing is initialised or run): lowering time, XLA compile time, the size of the
lowered StableHLO module (operations) and of the optimised HLO (instructions, fusions) and the
bytes of constants baked into it; for the train step also the train state's layout
(training/layout.py: parameter leaves of the state, how many per-layer leaves it stacks, and
the seconds spent tracing the loss to find them). One JSON line per part. The persistent
compilation cache is off for this mode, so each figure is a real compile.

train: the full jitted train step (every objective the config turns on, the optimiser update,
donated state) on random weights and inputs: compile time, steps/s and images/s over --iters
steps after a warm-up, peak memory (device on accelerators, host RSS on CPU), XLA's FLOP count
of one step and, on known accelerators, model FLOPs utilisation against the bf16 peak.

forward: jit-compiled inference (logits at input resolution) on random weights: compile
time, images/s over --iters timed calls after a warm-up, peak host memory.

data: the training input pipeline end to end (read, decode, pick a sentence, resize,
normalise, batch; ids are stored tokenised) with 0, 1 and 2 worker processes (--workers):
examples/s over --data_batches batches after --data_warmup batches (worker start-up is timed
separately).

save: orbax saves of the config's whole train state on the run's mesh (all devices;
XLA_FLAGS=--xla_force_host_platform_device_count=8 simulates 8 on a CPU), with orbax's
default array saving (replica-parallel: each replicated array is split over its replicas)
and with the one-replica saving that TrainCheckpoints uses on one process, side by side:
seconds of each of --iters saves (the first includes any compilation).

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
_PARTS = flags.DEFINE_list("parts", ["forward", "train"], "bench compile: what to compile")

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

WHATS = ("forward", "data", "train", "compile", "save")
COMPILE_PARTS = ("forward", "train")
# Dense bf16 peak FLOP/s per chip, for model FLOPs utilisation (vendor figures).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def bench_forward(model_config, name: str, batch_size: int, iters: int, seed: int,
                  params=None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from magnet_jax import methods
    from magnet_jax.models import random_params
    method = methods.method_of(model_config)
    model = method.build_model(model_config)
    size = model_config.image_size
    if params is None:
        params = random_params(model, size, seed)
    rng = np.random.default_rng(seed)
    image = jnp.asarray(rng.standard_normal((batch_size, size, size, 3), np.float32))
    ids = jnp.asarray(rng.integers(1000, 2000, (batch_size, 20)), jnp.int32)
    att = jnp.asarray((np.arange(20)[None] < rng.integers(4, 21, (batch_size, 1))).astype(np.int32))

    @jax.jit
    def forward(params, image, ids, att):
        return method.infer(model, params, image, ids, att, (size, size))[0]

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


def _peak_memory_gb() -> float:
    """Peak device memory on accelerators; peak host RSS (process) on CPU."""
    import jax
    stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return round(stats["peak_bytes_in_use"] / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def _peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def _random_train_state(config, num_steps: int, seed: int):
    """The config's method, model section, objective and randomly initialised train state on
    the run's mesh -> (mesh, method, model_cfg, objective, state, shardings, tx, opt_cfg,
    the train state's layout)."""
    from magnet_jax.training import loop
    from magnet_jax.training.optimizer import make_optimizer
    from magnet_jax.training.step import abstract_boxed_params, init_train_state

    mesh = loop.make_run_mesh(config)
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    opt_cfg = loop.optimizer_config(config, num_steps, mesh)
    size, tokens = int(model_cfg.image_size), int(model_cfg.max_tokens)
    boxed_params = abstract_boxed_params(model, objective.init_heads, size, seed, tokens)
    layout = loop.train_layout(config, model, objective, opt_cfg, mesh, boxed_params)
    state, shardings, tx = init_train_state(model, objective.init_heads,
                                            lambda p: make_optimizer(p, opt_cfg, layout),
                                            size, seed, mesh, max_tokens=tokens, layout=layout,
                                            boxed_params=boxed_params)
    return mesh, method, model_cfg, objective, state, shardings, tx, opt_cfg, layout


def bench_train(config, batch_size: int, iters: int, seed: int) -> dict:
    """The full jitted train step (every configured objective) on random weights and inputs."""
    import jax
    import numpy as np
    from magnet_jax import sharding
    from magnet_jax.training.random_batch import random_train_batch
    from magnet_jax.training.step import jit_train_step, make_train_step

    config = _with_batch(config, batch_size)
    mesh, method, model_cfg, objective, state, shardings, tx, opt_cfg, layout = \
        _random_train_state(config, max(iters + 2, 10), seed)
    size = int(model_cfg.image_size)
    host = random_train_batch(config, objective, batch_size, seed)
    batch = jax.device_put({k: host[k] for k in objective.batch_keys},
                           sharding.batch_sharding(mesh))
    step = jit_train_step(make_train_step(objective.loss_fn, tx, seed,
                                          config.train.accumulation_steps,
                                          opt_cfg.flat_global_norm, layout), shardings, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, metrics = compiled(state, batch)                              # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    device = jax.devices()[0]
    peak = _peak_flops(device)
    result = dict(what="train", config=config.name, method=method.name, image_size=size,
                  batch_size=batch_size, compute_dtype=config.train.compute_dtype,
                  remat=bool(config.model.remat), **objective.summary, iters=iters,
                  compile_s=round(compile_s, 2), step_s=round(step_s, 4),
                  steps_per_s=round(1 / step_s, 3), images_per_s=round(batch_size / step_s, 3),
                  step_tflops=round(flops / 1e12, 3), peak_memory_gb=_peak_memory_gb(),
                  loss=round(float(metrics["loss"]), 4), devices=len(jax.devices()),
                  device=getattr(device, "device_kind", device.platform), cpus=os.cpu_count(),
                  jax=jax.__version__, date=time.strftime("%Y-%m-%d"))
    if peak and flops:
        result["mfu"] = round(flops / step_s / (peak * len(jax.devices())), 4)
    return result


def bench_save(config, iters: int, seed: int) -> list[dict]:
    """Seconds per orbax save of the train state: orbax's default array handler, then ours."""
    import shutil
    import tempfile

    import jax
    import orbax.checkpoint as ocp
    from magnet_jax.training import checkpointing
    from magnet_jax.training.loop import LayoutConversions

    # Batch sizes play no part in a save: one per device passes the run's mesh checks.
    config = _with_batch(config, len(jax.devices()))
    mesh, _, _, _, state, shardings, _, _, layout = _random_train_state(config, 10, seed)
    state = LayoutConversions(layout, shardings).per_layer_state(state)   # what the loop saves
    leaves = jax.tree.leaves(state)
    results = []
    for name, handler in (("orbax default (replica-parallel)", ocp.type_handlers.ArrayHandler()),
                          ("one replica (TrainCheckpoints)", None)):
        if handler is None:
            checkpointing.use_single_host_array_saving()
        else:
            ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
        directory = tempfile.mkdtemp(prefix="magnet_jax_bench_save_")
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False, create=True))
        seconds = []
        for i in range(iters):
            start = time.perf_counter()
            manager.save(i, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
            seconds.append(round(time.perf_counter() - start, 2))
        manager.close()
        shutil.rmtree(directory, ignore_errors=True)
        results.append(dict(what="save", config=config.name, saving=name,
                            devices=len(jax.devices()), mesh=dict(mesh.shape),
                            arrays=len(leaves), save_s=seconds))
    return results


def hlo_size(text: str) -> dict:
    """Counts of an HLO module's text: instructions, fusion computations, constant bytes."""
    instructions = fusions = constant_bytes = 0
    sizes = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "s64": 8, "f64": 8, "u8": 1,
             "s8": 1, "pred": 1}
    for line in text.splitlines():
        line = line.strip()
        if " = " not in line or line.startswith(("HloModule", "//")):
            continue
        instructions += 1
        head = line.split(" = ", 1)[1]
        if " fusion(" in head:
            fusions += 1
        if " constant(" in head and "{" in head:
            kind, _, dims = head.partition("[")
            count = 1
            for d in dims.partition("]")[0].split(","):
                count *= int(d) if d.strip().isdigit() else 1
            constant_bytes += count * sizes.get(kind.split()[-1], 4)
    return dict(hlo_instructions=instructions, hlo_fusions=fusions,
                hlo_constant_mb=round(constant_bytes / 2**20, 2))


def _timed_compile(jitted, *args) -> dict:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - start
    stablehlo = lowered.as_text()
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    ops = sum(1 for line in stablehlo.splitlines() if " = " in line)
    return dict(lower_s=round(lower_s, 2), compile_s=round(compile_s, 2), stablehlo_ops=ops,
                **hlo_size(compiled.as_text()))


def _compile_record(config, part: str, batch_size: int) -> dict:
    import jax
    return dict(what="compile", part=part, config=config.name,
                image_size=int(config.model.image_size), batch_size=batch_size,
                compute_dtype=config.train.compute_dtype, remat=bool(config.model.remat),
                devices=len(jax.devices()),
                device=getattr(jax.devices()[0], "device_kind", jax.devices()[0].platform),
                cpus=os.cpu_count(), jax=jax.__version__, date=time.strftime("%Y-%m-%d"))


def compile_forward(config, batch_size: int) -> dict:
    """Lower and compile the inference function (logits at input resolution) on shapes only."""
    import jax
    import jax.numpy as jnp
    from magnet_jax import methods
    from magnet_jax.models import abstract_params
    model_config = config.model
    method = methods.method_of(model_config)
    model = method.build_model(model_config)
    size, n = int(model_config.image_size), int(model_config.max_tokens)
    params = abstract_params(model, size, n)

    def forward(params, image, ids, att):
        return method.infer(model, params, image, ids, att, (size, size))[0]

    args = (params, jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch_size, n), jnp.int32),
            jax.ShapeDtypeStruct((batch_size, n), jnp.int32))
    return dict(_compile_record(config, "forward", batch_size), **_timed_compile(jax.jit(forward), *args))


def compile_train_step(config, batch_size: int, seed: int = 0) -> dict:
    """Lower and compile the train step exactly as training jits it, on shapes only."""
    import jax
    from magnet_jax import sharding
    from magnet_jax.training import loop
    from magnet_jax.training.optimizer import make_optimizer
    from magnet_jax.training.random_batch import random_train_batch
    from magnet_jax.training.step import (abstract_boxed_params, abstract_train_state,
                                          jit_train_step, make_train_step)
    config = _with_batch(config, batch_size)
    mesh = loop.make_run_mesh(config)
    method, model_cfg, model = loop.model_from_config(config)
    objective = loop.objective_from_config(config, method, model)
    opt_cfg = loop.optimizer_config(config, 1000, mesh)
    size, tokens = int(model_cfg.image_size), int(model_cfg.max_tokens)
    boxed_params = abstract_boxed_params(model, objective.init_heads, size, seed, tokens)
    start = time.perf_counter()
    layout = loop.train_layout(config, model, objective, opt_cfg, mesh, boxed_params)
    layout_s = time.perf_counter() - start
    _, state, shardings, tx = abstract_train_state(
        model, objective.init_heads, lambda p: make_optimizer(p, opt_cfg, layout), size, seed,
        mesh, max_tokens=tokens, layout=layout, boxed_params=boxed_params)
    host = random_train_batch(config, objective, batch_size, seed)
    batch_sharding = sharding.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(host[k].shape, host[k].dtype, sharding=batch_sharding)
             for k in objective.batch_keys}
    step = jit_train_step(make_train_step(objective.loss_fn, tx, seed,
                                          config.train.accumulation_steps,
                                          opt_cfg.flat_global_norm, layout), shardings, mesh)
    record = _compile_record(config, "train", batch_size)
    record.update(method=method.name, **objective.summary,
                  stacked_leaves=layout.num_stacked_leaves, layout_s=round(layout_s, 2),
                  state_param_leaves=len(jax.tree.leaves(state.params)))
    return dict(record, **_timed_compile(step, state, batch))


def _with_batch(config, batch_size: int):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.train.global_batch_size = batch_size
        config.eval.batch_size = batch_size
    return config


def bench_compile(config, batch_size: int, parts, seed: int = 0):
    """Yield one record per part ("forward", "train"), compiling each from scratch."""
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    for part in parts:
        if part == "forward":
            yield compile_forward(config, batch_size)
        else:
            yield compile_train_step(config, batch_size, seed)


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
    if argv[1] == "compile":
        unknown = sorted(set(_PARTS.value) - set(COMPILE_PARTS))
        if _CONFIG.value is None or unknown:
            print("error: bench compile needs --config FILE[:ARG] and --parts from "
                  f"{','.join(COMPILE_PARTS)}" + (f" (unknown: {','.join(unknown)})" if unknown else ""),
                  file=sys.stderr)
            return 2
        for record in bench_compile(_CONFIG.value, _BATCH.value, _PARTS.value, _SEED.value):
            print(json.dumps(record), flush=True)
        return 0
    if argv[1] in ("save", "train") and _CONFIG.value is None:
        example = "configs/magnet.py:tiny" if argv[1] == "save" else "configs/synthetic.py"
        print(f"error: bench {argv[1]} needs --config FILE[:ARG] (e.g. {example})",
              file=sys.stderr)
        return 2
    if argv[1] == "save":
        for record in bench_save(_CONFIG.value, max(_ITERS.value, 1), _SEED.value):
            print(json.dumps(record), flush=True)
        return 0
    if argv[1] == "train":
        print(json.dumps(bench_train(_CONFIG.value, _BATCH.value, _ITERS.value, _SEED.value)))
        return 0
    if _CHECKPOINT.value:
        from magnet_jax import checkpoint_io
        model_config, params = checkpoint_io.load_params(_CHECKPOINT.value, expect_model=None)
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
