"""The training loop behind `python -m magnet_jax.train`.

One run = one workdir:
  WORKDIR/config.json       the run's config (a resumed run must match it, checkpointing.py)
  WORKDIR/checkpoints/      orbax: train state + data-iterator state + config, last N + best
  WORKDIR/metrics.jsonl     one JSON object per logged step / evaluation; TensorBoard events
  WORKDIR/overlays/step_N/  prediction overlays of the first evaluation examples
  WORKDIR/curves.png        loss and validation curves (redrawn at every evaluation)
  WORKDIR/params/           the final model parameters (checkpoint_io format: predict/evaluate)
  WORKDIR/synthetic_data/   the built-in data, when data.dir and data.mixture are empty
  WORKDIR/mixture.json      with data.mixture: the datasets, weights and overlap-filter report

Resume is exact: the state, the data iterator and the step RNG (fold_in(seed, step)) continue
where the checkpoint stopped, so an interrupted-and-resumed run logs the same losses as an
uninterrupted one. SIGTERM (or SIGINT) saves at the next step boundary and returns. A
non-finite loss stops the run with the step and the batch's ref/sentence ids; the state of that
step is never saved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from magnet_jax import compilation_cache, sharding
from magnet_jax.data import mixture, pipeline, records
from magnet_jax.data.transforms import Augment
from magnet_jax import methods
from magnet_jax.methods import Method, Objective
from magnet_jax.training import checkpointing, layout
from magnet_jax.evaluation.evaluator import evaluate_split, make_eval_step
from magnet_jax.training.layout import StackedLayout
from magnet_jax.training.optimizer import as_optimizer_config, leaf_treatment, make_optimizer
from magnet_jax.training.step import (abstract_boxed_params, init_train_state, jit_train_step,
                                      make_train_step)
from magnet_jax.writers import MetricWriter

log = logging.getLogger(__name__)

SYNTHETIC_DIR = "synthetic_data"
PARAMS_DIR = "params"


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite."""


class ConfigError(ValueError):
    """A config value that cannot run (a one-line message naming the key)."""


@dataclasses.dataclass
class RunResult:
    step: int                          # steps completed
    stopped: str                       # "done" | "preempted" | "time_limit" | "paused"
    last_metrics: dict[str, float]     # the last logged train metrics
    eval_metrics: dict[str, float]     # the last evaluation ("val/oIoU", ...)
    seconds: float


# --------------------------------------------------------------------------------------------
# Setup pieces


def prepare_data(config, workdir: Path) -> str:
    """The data directory of this run: the configured one (checked) or the synthetic set."""
    splits = (config.data.train_split,) + tuple(config.data.eval_splits)
    if config.data.dir:
        data_dir = os.path.abspath(os.path.expanduser(config.data.dir))
        if not os.path.isdir(data_dir):
            raise ConfigError(f"data.dir {data_dir} does not exist (convert a dataset with "
                              "`python -m magnet_jax.data.convert`, or leave data.dir empty for "
                              "the synthetic data)")
    else:
        data_dir = str(workdir / SYNTHETIC_DIR)
        syn = config.data.synthetic
        if jax.process_index() == 0 and not all(
                os.path.exists(records.meta_path(data_dir, s)) for s in splits):
            from magnet_jax.data import synthetic
            log.info("writing the synthetic dataset to %s", data_dir)
            synthetic.generate(data_dir, **synthetic.generate_kwargs(syn), verbose=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("synthetic data written")
        _check_synthetic_matches(data_dir, config.data.train_split, syn)
    for split in splits:
        try:
            records.read_meta(data_dir, split)
        except Exception as e:  # noqa: BLE001: one line naming the split and the cause
            raise ConfigError(f"data.dir {data_dir}: split {split!r} is not readable converted "
                              f"data ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                              ) from None
    return data_dir


def _check_synthetic_matches(data_dir: str, split: str, syn) -> None:
    """Synthetic data already in the workdir must be what config.data.synthetic asks for (a
    workdir of an older default would otherwise train silently on other data)."""
    from magnet_jax.data import synthetic
    try:
        meta = records.read_meta(data_dir, split)
    except Exception:  # noqa: BLE001: unreadable data is reported by the caller's check
        return
    want = synthetic.generate_kwargs(syn)
    have = dict(synthetic.style_meta(), **meta.get("style", {}),
                image_size=meta.get("image_size"), seed=meta.get("seed"))
    diff = [f"{k} {have[k]} (config {want[k]})" for k in
            ("image_size", "seed", *synthetic.style_meta())
            if have.get(k) is not None and have[k] != want[k]]
    if diff:
        raise ConfigError(f"the synthetic data in {data_dir} was written with "
                          f"{', '.join(diff)}; use another --workdir or delete that folder")


def prepare_mixture(config) -> mixture.Mixture | None:
    """The run's dataset mixture (data.mixture: checked, overlap-filtered, weighted), or None
    when it trains on data.dir alone."""
    data = config.data
    if not data.get("mixture"):
        if data.get("exclude_eval_of"):
            raise ConfigError("data.exclude_eval_of needs data.mixture (a mixture of one "
                              "dataset trains on that dataset alone)")
        return None
    if data.dir:
        raise ConfigError(f"set data.dir or data.mixture, not both (data.dir={data.dir!r})")
    try:
        mix = mixture.from_config(data)
        targets = mix.eval_targets(tuple(data.eval_splits))
    except mixture.MixtureError as e:
        raise ConfigError(str(e)) from None
    best = config.checkpoint.best_metric
    if config.checkpoint.keep_best and targets and not any(
            best.startswith(f"{prefix}/") for prefix, _, _ in targets):
        raise ConfigError(f"checkpoint.best_metric {best!r} is no evaluation of the mixture "
                          f"(its evaluations: {', '.join(p for p, _, _ in targets)}; e.g. "
                          f"{targets[0][0]}/oIoU)")
    return mix


def eval_targets(config, data_dir: str, mix: mixture.Mixture | None
                 ) -> list[tuple[str, str, str]]:
    """(metric prefix, data dir, split) of each periodic evaluation: "val" on data.dir, or
    "refcoco/val" per dataset of a mixture."""
    if mix is None:
        return [(split, data_dir, split) for split in config.data.eval_splits]
    return mix.eval_targets(tuple(config.data.eval_splits))


def num_train_steps(config, data_dir: str, mix: mixture.Mixture | None = None) -> int:
    t = config.train
    if t.num_steps > 0:
        return int(t.num_steps)
    if t.num_epochs <= 0:
        raise ConfigError("set train.num_steps or train.num_epochs (both are 0)")
    refs = t.epoch_refs or (mix.num_train_refs if mix is not None else len(
        records.read_meta(data_dir, config.data.train_split)["sentence_counts"]))
    return max(1, int(t.num_epochs) * int(refs) // int(t.global_batch_size))


def make_run_mesh(config):
    devices = jax.devices()
    n = len(devices)
    data, fsdp = int(config.train.mesh_data), int(config.train.mesh_fsdp)
    if fsdp < 1 or n % fsdp:
        raise ConfigError(f"train.mesh_fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ConfigError(f"train.mesh_data × train.mesh_fsdp = {data} × {fsdp} is not the "
                          f"{n} devices")
    for key, batch in (("train.global_batch_size", config.train.global_batch_size),
                       ("eval.batch_size", config.eval.batch_size)):
        if batch < 1 or batch % n:
            raise ConfigError(f"{key}={batch} is not divisible by the {n} devices")
    accum = config.train.accumulation_steps
    if accum < 1 or (config.train.global_batch_size // n) % accum:
        raise ConfigError(f"train.accumulation_steps={accum} does not divide the per-device "
                          f"batch {config.train.global_batch_size // n}")
    return sharding.make_mesh(data, fsdp, devices)


def model_from_config(config) -> tuple[Method, Any, Any]:
    """-> (the config's method, its model section with the compute dtype, the Linen module)."""
    try:
        method = methods.check_config(config)
    except methods.MethodError as e:
        raise ConfigError(str(e)) from None
    model_cfg = config.model.copy_and_resolve_references()
    if config.train.compute_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"train.compute_dtype must be float32 or bfloat16, got "
                          f"{config.train.compute_dtype!r}")
    model_cfg.dtype = config.train.compute_dtype
    return method, model_cfg, method.build_model(model_cfg)


def objective_from_config(config, method: Method, model) -> Objective:
    """The method's losses, heads and batch keys for this run's config."""
    return method.make_objective(model, config)


def flat_global_norm(mesh) -> bool:
    """Whether the run computes its global norm flat (optimizer.global_norm): on CPU devices
    (where it saves compile time; measured nowhere else) and where the mesh replicates the
    parameters (fsdp axis of one device)."""
    return mesh.shape["fsdp"] == 1 and mesh.devices.flat[0].platform == "cpu"


def optimizer_config(config, total_steps: int, mesh=None):
    """mesh: the run's (None: per-leaf global norm)."""
    items = dict(config.optim.to_dict())
    items.update(total_steps=total_steps,
                 warmup_steps=min(int(items.get("warmup_steps", 0)), total_steps - 1),
                 flat_global_norm=mesh is not None and flat_global_norm(mesh))
    try:
        return as_optimizer_config(items)
    except ValueError as e:
        raise ConfigError(f"optim: {e}") from None


def train_layout(config, model, objective: Objective, opt_cfg, mesh,
                 boxed_params: dict | None = None) -> StackedLayout:
    """How the train state stores the parameters (training/layout.py): each group of layers the
    model scans over as one stacked array, found by tracing the loss once; per layer when
    train.stack_layers is off or the model scans nothing (model.scan_layers off).
    boxed_params: the state's `abstract_boxed_params`, if the caller has it."""
    if not config.train.get("stack_layers", True) or not config.model.get("scan_layers", True):
        return StackedLayout()
    import flax.linen as nn
    from magnet_jax.training.random_batch import random_train_batch
    model_cfg = config.model
    if boxed_params is None:
        boxed_params = abstract_boxed_params(model, objective.init_heads,
                                             int(model_cfg.image_size), config.seed,
                                             int(model_cfg.max_tokens))
    params = nn.unbox(boxed_params)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)      # shapes only: one example
             for k, v in random_train_batch(config, objective, 1, config.seed).items()}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        return layout.discover(objective.loss_fn, params, batch, jax.random.key(config.seed),
                               leaf_treatment(params, opt_cfg))


class LayoutConversions:
    """The jitted conversions between the stacked train state and the per-layer trees that
    checkpoints, pretrained imports and export use (identity when the layout stacks
    nothing)."""

    def __init__(self, layout_: StackedLayout, state_shardings):
        self.layout = layout_
        self.per_layer_shardings = layout_.unstack_state(state_shardings)
        self._per_layer_state = jax.jit(layout_.unstack_state,
                                        out_shardings=self.per_layer_shardings)
        self._stacked_state = jax.jit(layout_.stack_state, out_shardings=state_shardings)
        self._per_layer_params = jax.jit(layout_.unstack,
                                         out_shardings=self.per_layer_shardings.params)
        self._stacked_params = jax.jit(layout_.stack, out_shardings=state_shardings.params)

    def per_layer_state(self, state):
        return self._per_layer_state(state) if self.layout else state

    def stacked_state(self, state):
        return self._stacked_state(state) if self.layout else state

    def per_layer_params(self, params):
        return self._per_layer_params(params) if self.layout else params

    def stacked_params(self, params):
        return self._stacked_params(params) if self.layout else params


def train_iterator(config, data_dir: str, image_size: int, objective: Objective,
                   tokenizer=None, mix: mixture.Mixture | None = None):
    """tokenizer: the method's own (Method.text_tokenizer); None = the records' BERT ids.
    mix: train on this dataset mixture instead of data_dir."""
    kwargs = dict(image_size=image_size, global_batch=config.train.global_batch_size,
                  seed=config.data.seed, convention=config.data.convention,
                  augment=Augment() if config.data.augment else None,
                  sample=config.data.sample, tokenizer=tokenizer, **objective.data_kwargs)
    if mix is None:
        ds = pipeline.train_dataset(data_dir, config.data.train_split, **kwargs)
    else:
        ds = mixture.train_dataset(mix, **kwargs)
    return pipeline.make_iterator(ds, config.data.num_workers, read_threads=config.data.read_threads,
                                  prefetch_buffer=config.data.prefetch)


def pretrained_configured(config) -> bool:
    """Whether the config names pretrained weights to load (`load_pretrained`)."""
    return bool(config.init.params or config.init.get("swin") or config.init.get("bert")
                or methods.method_of(config.model).import_pretrained is not None)


def load_pretrained(config, params: dict, shardings: dict) -> dict:
    """Replace subtrees of freshly initialised params with local pretrained weights."""
    from magnet_jax.weights.common import flatten_tree, unflatten_tree

    loaded: dict[str, Any] = {}
    if config.init.params:
        from magnet_jax.checkpoint_io import load_params
        stored_cfg, tree = load_params(config.init.params, expect_model=None)
        try:
            methods.check_same_method(stored_cfg.get("name", "magnet"), config.model.name,
                                      f"init.params {config.init.params}")
        except methods.MethodError as e:
            raise ConfigError(str(e)) from None
        loaded.update(flatten_tree(tree))
    if config.init.get("swin"):
        from magnet_jax.weights.swin import import_swin
        tree, _ = import_swin(config.init.swin)
        loaded.update(flatten_tree({"image_model": tree}))
    if config.init.get("bert"):
        from magnet_jax.weights.bert import import_bert
        tree, _ = import_bert(config.init.bert)
        loaded.update(flatten_tree({"language_model": tree}))
    method = methods.method_of(config.model)
    if method.import_pretrained is not None:
        loaded.update(flatten_tree(method.import_pretrained(config)))
    if not loaded:
        return params
    flat = flatten_tree(params)
    flat_shardings = flatten_tree(shardings)
    unknown = sorted(k for k in loaded if k not in flat)
    if unknown:
        raise ConfigError(f"init: {len(unknown)} pretrained tensors have no place in this model, "
                          f"e.g. {unknown[0]} (check model.swin / model.bert against the file)")
    for key, value in loaded.items():
        if tuple(value.shape) != tuple(flat[key].shape):
            raise ConfigError(f"init: {key} has shape {tuple(value.shape)} in the pretrained file "
                              f"but {tuple(flat[key].shape)} in the model")
        flat[key] = jax.device_put(np.asarray(value, flat[key].dtype), flat_shardings[key])
    log.info("initialised %d of %d tensors from pretrained files", len(loaded), len(flat))
    return unflatten_tree(flat)


# --------------------------------------------------------------------------------------------
# The loop


class _Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        log.warning("signal %d: saving a checkpoint at the next step boundary", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        """Whether any process was signalled (collective with several processes)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.max(flags))


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    host = jax.device_get(history)
    return {f"train/{k}": float(np.mean([h[k] for h in host])) for k in host[0]}


def _check_finite(step: int, metrics: dict, ids: tuple[np.ndarray, np.ndarray]) -> None:
    loss = float(jax.device_get(metrics["loss"]))
    if not math.isfinite(loss):
        pairs = ", ".join(f"{int(r)}/{int(s)}" for r, s in zip(*ids))
        raise NonFiniteLossError(f"non-finite loss {loss} at step {step}; batch ref_id/sent_id "
                                 f"(this process): {pairs}")


def train(config, workdir: str | os.PathLike, *, allow_config_change: bool = False,
          stop_after_steps: int | None = None,
          compiler_options: dict | None = None) -> RunResult:
    """Train (or resume) the run in `workdir`.

    stop_after_steps: save and return after this global step, like a preemption (tests).
    compiler_options: XLA options of the train step (tests compile at optimisation level 0).
    """
    start_time = time.time()
    compilation_cache.enable()   # a resumed run loads its compiled steps (no-op if configured)
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointing.check_config(workdir, config, allow_config_change)
    mix = prepare_mixture(config)
    data_dir = prepare_data(config, workdir) if mix is None else ""
    if mix is not None and jax.process_index() == 0:
        (workdir / "mixture.json").write_text(json.dumps(mix.report, indent=1) + "\n")
    targets = eval_targets(config, data_dir, mix)
    total_steps = num_train_steps(config, data_dir, mix)
    mesh = make_run_mesh(config)
    method, model_cfg, model = model_from_config(config)
    image_size = int(model_cfg.image_size)
    objective = objective_from_config(config, method, model)
    opt_cfg = optimizer_config(config, total_steps, mesh)
    boxed_params = abstract_boxed_params(model, objective.init_heads, image_size, config.seed,
                                         int(model_cfg.max_tokens))
    state_layout = train_layout(config, model, objective, opt_cfg, mesh, boxed_params)
    state, state_shardings, tx = init_train_state(
        model, objective.init_heads, lambda p: make_optimizer(p, opt_cfg, state_layout),
        image_size, config.seed, mesh, max_tokens=int(model_cfg.max_tokens),
        layout=state_layout, boxed_params=boxed_params)
    train_step = jit_train_step(
        make_train_step(objective.loss_fn, tx, config.seed, config.train.accumulation_steps,
                        opt_cfg.flat_global_norm, state_layout),
        state_shardings, mesh, compiler_options=compiler_options)
    convert = LayoutConversions(state_layout, state_shardings)
    extra_keys = tuple(method.extra_input_specs(model_cfg, image_size))
    # Evaluation reads the train state's parameters as stored: no conversion per evaluation,
    # and XLA folds the in-graph split into the model's own stacking.
    eval_params_shardings = objective.model_params(state_shardings.params)
    eval_step = make_eval_step(method, model, eval_params_shardings, mesh, extra_keys,
                               params_view=state_layout.only(eval_params_shardings).unstack)

    ckpt = checkpointing.TrainCheckpoints(
        workdir, max_to_keep=config.checkpoint.max_to_keep, keep_best=config.checkpoint.keep_best,
        best_metric=config.checkpoint.best_metric, async_save=config.checkpoint.async_save)
    tokenizer = method.text_tokenizer(model_cfg)
    data_iter = train_iterator(config, data_dir, image_size, objective, tokenizer, mix)
    start = ckpt.latest_step()
    if start is not None:
        log.info("resuming from step %d in %s", start, ckpt.directory)
        # Checkpoints hold the per-layer tree (training/layout.py).
        state = convert.stacked_state(ckpt.restore(
            start, state_layout.unstack_state(checkpointing.abstract_like(state)), data_iter))
    else:
        start = 0
        if pretrained_configured(config):
            params = load_pretrained(config, convert.per_layer_params(state.params),
                                     convert.per_layer_shardings.params)
            state = state.replace(params=convert.stacked_params(params))
    writer = MetricWriter(workdir)
    keys = objective.batch_keys
    end = total_steps if stop_after_steps is None else min(total_steps, int(stop_after_steps))
    step = start
    stopped = "done"
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    history: list[dict] = []
    log_every = max(1, int(config.train.log_every_steps))
    limit_s = float(config.train.max_runtime_minutes) * 60.0
    bar = _progress(config, start, total_steps)
    pending = None   # (step, metrics, ids) of the previous step: checked after the next dispatch
    timer = (time.perf_counter(), step)

    def run_eval(at_step: int) -> dict[str, float]:
        results: dict[str, float] = {}
        params = objective.model_params(state.params)
        for i, (name, split_dir, split) in enumerate(targets):
            r = evaluate_split(eval_step, params, split_dir, split, image_size=image_size,
                               global_batch=config.eval.batch_size, mesh=mesh,
                               convention=config.data.convention,
                               num_overlays=config.eval.num_overlays if i == 0 else 0,
                               overlay_dir=workdir / "overlays" / f"step_{at_step:07d}",
                               tokenizer=tokenizer, data_kwargs=method.data_kwargs(model_cfg),
                               extra_keys=extra_keys).metrics
            results.update({f"{name}/{k}": float(v) for k, v in r.items()})
        writer.write_scalars(at_step, results)
        _redraw_curves(workdir)
        return results

    with _Preemption() as preemption:
        try:
            while step < end:
                host_batch = next(data_iter)
                batch = pipeline.to_global({k: host_batch[k] for k in keys}, mesh)
                state, metrics = train_step(state, batch)
                step += 1
                if pending is not None and config.train.stop_on_nonfinite:
                    _check_finite(*pending)
                pending = (step, metrics, (host_batch["ref_id"], host_batch["sent_id"]))
                history.append(metrics)
                if step == start + 1:
                    # Throughput excludes the first step's compilation.
                    jax.block_until_ready(metrics)
                    timer = (time.perf_counter(), step)
                    log.info("first step (compilation included) took %.1f s",
                             time.time() - start_time)
                if step % log_every == 0 or step == end:
                    if config.train.stop_on_nonfinite:
                        _check_finite(*pending)
                    last_metrics = _mean_metrics(history)
                    history = []
                    now = time.perf_counter()
                    if step > timer[1]:
                        rate = (step - timer[1]) * config.train.global_batch_size / (now - timer[0])
                        last_metrics["train/images_per_s"] = rate
                    timer = (now, step)
                    last_metrics["train/lr"] = float(_lr(opt_cfg, step))
                    writer.write_scalars(step, last_metrics)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_metrics['train/loss']:.4f}",
                                        img_s=f"{last_metrics.get('train/images_per_s', 0):.1f}",
                                        refresh=False)
                if bar is not None:
                    bar.update(1)
                evaluated = (config.eval.every_steps > 0 and step % config.eval.every_steps == 0) \
                    or (step == total_steps and config.eval.at_end)
                if evaluated:
                    if pending is not None and config.train.stop_on_nonfinite:
                        _check_finite(*pending)
                    eval_metrics = run_eval(step)
                    _report(bar, step, eval_metrics)
                interrupted = preemption.agreed() if (jax.process_count() == 1 or
                                                      step % log_every == 0) else False
                timed_out = limit_s > 0 and time.time() - start_time > limit_s
                if evaluated or interrupted or timed_out or step == end or (
                        config.checkpoint.every_steps > 0
                        and step % config.checkpoint.every_steps == 0):
                    if pending is not None and config.train.stop_on_nonfinite:
                        _check_finite(*pending)
                    ckpt.save(step, convert.per_layer_state(state), data_iter, config,
                              metrics=eval_metrics if evaluated else None)
                if interrupted or timed_out:
                    stopped = "preempted" if interrupted else "time_limit"
                    log.warning("stopping at step %d (%s); checkpoint saved", step, stopped)
                    break
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
            writer.close()
            if hasattr(data_iter, "close"):
                data_iter.close()
    if stopped == "done" and step < total_steps:
        stopped = "paused"               # stop_after_steps
    if stopped == "done":
        export_params(workdir, objective.model_params(convert.per_layer_params(state.params)),
                      model_cfg)
    return RunResult(step=step, stopped=stopped, last_metrics=last_metrics,
                     eval_metrics=eval_metrics, seconds=time.time() - start_time)


def export_params(workdir: Path, params, model_cfg) -> None:
    """WORKDIR/params: the trained model in the converted-weights format (predict, evaluate)."""
    from magnet_jax.checkpoint_io import save_params

    inference_cfg = model_cfg.copy_and_resolve_references()
    inference_cfg.dtype = "float32"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        params = multihost_utils.process_allgather(params, tiled=True)
    save_params(str(workdir / PARAMS_DIR), params, inference_cfg,
                extra={"trained_in": str(workdir)}, overwrite=True)


def _lr(opt_cfg, step: int) -> float:
    from magnet_jax.training.optimizer import make_schedule
    return make_schedule(opt_cfg)(step)


def _progress(config, start: int, total: int):
    if not config.train.progress_bar or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)


def _report(bar, step: int, metrics: dict[str, float]) -> None:
    shown = {k: v for k, v in metrics.items()
             if k.endswith(("/oIoU", "/mIoU", "/prec@0.5", "/gres/gIoU", "/gres/cIoU",
                            "/gres/N-acc", "/gres/T-acc"))}
    text = f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
    if bar is not None:
        bar.write(text)
    elif jax.process_index() == 0:
        log.info(text)


def _redraw_curves(workdir: Path) -> None:
    if jax.process_index() != 0:
        return
    from magnet_jax.visualize import plot_curves
    from magnet_jax.writers import METRICS_FILE
    try:
        plot_curves(workdir / METRICS_FILE, workdir / "curves.png")
    except OSError as e:  # a picture must never stop training
        log.warning("could not draw curves.png: %s", e)
