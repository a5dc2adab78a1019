"""Training checkpoints: train state + data-iterator state + config, with orbax (jax_stack.md §7).

Layout: WORKDIR/checkpoints/<step>/{state/, data_iter/process_<i>-of-<n>.json, config/,
_CHECKPOINT_METADATA}. orbax writes each step into a temporary directory and renames it when
complete, so a save killed half-way (a crash, a full disk) never shows up as a step and the
previous checkpoint stays the latest. Saves are asynchronous: device arrays are copied to the
host before `save` returns and written in a background thread.

Kept: the last `max_to_keep` steps and, with `keep_best`, the step with the best validation
metric (saved with the metrics of the evaluation at that step).

A workdir belongs to one run: `check_config` refuses a config that differs from the one stored
in the workdir, except in RESUMABLE_KEYS (how long to train, how often to log/evaluate/save,
how fast to read), unless the caller allows the change.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation

from magnet_jax.models import presets
from magnet_jax.restore import CHECKPOINT_DIR, RUN_CONFIG

# Config keys a resumed run may change without becoming another run (model.remat,
# model.scan_layers and train.stack_layers change how the same function is compiled, not the
# parameters or the checkpoint).
RESUMABLE_KEYS = ("model.remat", "model.scan_layers", "train.stack_layers", "train.num_steps",
                  "train.num_epochs",
                  "train.log_every_steps", "train.progress_bar", "train.max_runtime_minutes",
                  "train.stop_on_nonfinite", "eval.", "checkpoint.", "data.num_workers",
                  "data.read_threads", "data.prefetch", "init.")
# Keys added after runs were stored, with the value that reproduces those runs: a stored
# config without the key matches a current config holding that value.
ADDED_KEYS = {f"model.{key}": value for key, value in presets.ADDED_MODEL_KEYS.items()}
ADDED_KEYS.update({"data.mixture": [], "data.root": "", "data.exclude_eval_of": [],
                   "data.mixture_force_mixed_conventions": False,
                   "data.synthetic.gres": False, "data.synthetic.gres_multi_fraction": 0.25,
                   "data.synthetic.gres_no_target_fraction": 0.15,
                   "data.synthetic.object_scale": 1.0, "data.synthetic.ordinal_rate": 1.0,
                   "data.synthetic.max_objects": 6})


class CheckpointConfigError(ValueError):
    """The workdir holds a run of another config."""


def flat_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} of a ConfigDict / nested mapping; sequences as lists (JSON form)."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def config_json(config: Any) -> dict[str, Any]:
    """The config as plain JSON data (tuples -> lists)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(d))


def config_differences(stored: Mapping[str, Any], current: Any) -> list[str]:
    """Keys (outside RESUMABLE_KEYS) whose values differ, as 'key: old -> new' lines."""
    old, new = flat_config(stored), flat_config(config_json(current))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS):
            continue
        before = old.get(key, ADDED_KEYS.get(key, "<absent>"))
        if before != new.get(key, "<absent>"):
            diffs.append(f"{key}: {before!r} -> {new.get(key, '<absent>')!r}")
    return diffs


def check_config(workdir: str | os.PathLike, config: Any, allow_change: bool = False) -> None:
    """Record the run's config in WORKDIR/config.json, or check it against the stored one."""
    path = Path(workdir) / RUN_CONFIG
    if path.exists():
        stored = json.loads(path.read_text())
        stored_method = stored.get("model", {}).get("name", "magnet")
        if stored_method != config.model.name:
            # Not resumable even with allow_change: the parameter trees differ.
            raise CheckpointConfigError(
                f"workdir {workdir} holds a {stored_method!r} run, but model.name is "
                f"{config.model.name!r}; use another --workdir")
        diffs = config_differences(stored, config)
        if diffs and not allow_change:
            raise CheckpointConfigError(
                f"workdir {workdir} holds a run of another config ({len(diffs)} differing "
                f"keys: {'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}); use another "
                "--workdir, or pass --allow_config_change to continue it with this config")
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config_json(config), indent=1, sort_keys=True))
        os.replace(tmp, path)


def _best_value(metric: str):
    def get(metrics: Mapping[str, Any]) -> float:
        value = float(metrics.get(metric, float("nan")))
        return value if math.isfinite(value) else -math.inf
    return get


def use_single_host_array_saving() -> None:
    """On one process, save each array from one replica. orbax's default on CPU and TPU,
    replica-parallel saving, splits every replicated array over its replicas so that hosts
    share the writing: with one host there is nobody to share with, and each slice is a
    separate jitted `slice_in_dim` (one compile per shape and offset; a 400-array state over 8
    CPU devices took minutes to save instead of 1.6 s, docs/benchmarks.md)."""
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
            override=True)


class TrainCheckpoints:
    """Save and restore {state, data_iter, config} under WORKDIR/checkpoints."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 2,
                 keep_best: bool = True, best_metric: str = "val/oIoU",
                 async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"checkpoint.max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        use_single_host_array_saving()
        self.best_metric = best_metric
        policies: list[Any] = [preservation.LatestN(max_to_keep)]
        if keep_best:
            policies.append(preservation.BestN(get_metric_fn=_best_value(best_metric), n=1,
                                               keep_checkpoints_without_metrics=False))
        # best_fn also makes orbax write each step's metrics to disk (<step>/metrics), so the
        # ranking survives a restart and `evaluate --step best` can read it.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            best_fn=_best_value(best_metric) if keep_best else None,
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data_iter", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step() if self.best_metric else None

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter: Any, config: Any,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Start an (async) save of this step; metrics rank it for `keep_best`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data_iter=grain.checkpoint.CheckpointSave(data_iter),
                                  config=ocp.args.JsonSave(config_json(config)))
        # {} (ranked last) rather than None: orbax warns on every save without metrics.
        return self.manager.save(step, args=args, metrics=dict(metrics or {}), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """The state of `step` placed as `abstract_state` says (ShapeDtypeStructs with
        shardings: any mesh); `data_iter`, when given, continues where the saved one stopped."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def stored_config(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of a live (or abstract) state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)
