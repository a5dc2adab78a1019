"""Model parameters from any checkpoint directory, placed on this run's devices.

Accepted directories (evaluate, predict and export all read them through `load_model`):
  - a training workdir (WORKDIR/checkpoints/<step>/ written by `magnet_jax.train`): the model
    parameters of a step's train state are restored with orbax (a partial restore: the
    optimiser state and the Mask Grounding head stay on disk); `step` picks latest (default),
    best or a number;
  - WORKDIR/checkpoints itself, or one step directory inside it;
  - a params directory (`magnet_jax.convert official ...`, or WORKDIR/params at the end of
    training; checkpoint_io.py).
The restore target carries shardings of the given mesh (the model's logical axis rules), so a
checkpoint written on 8 devices with an fsdp mesh restores onto 1 CPU, and the reverse.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from magnet_jax import checkpoint_io, methods, sharding
from magnet_jax.models import abstract_params

# A training workdir's layout (written by training.checkpointing, which imports these): kept
# here so that inference reads workdirs without importing the training code and grain.
CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "config.json"


class RestoreError(ValueError):
    """The directory is not a usable checkpoint, or cannot be placed on these devices."""


@dataclasses.dataclass
class LoadedModel:
    config: ml_collections.ConfigDict      # the model section
    params: Any                            # placed on `mesh`
    path: str                              # what was restored
    kind: str                              # "train_state" | "params"
    step: int | None                       # the training step (None for a params directory)
    run_config: dict | None                # the training config, when restored from a run


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def _unfinished(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if "tmp" in p.name)


def _pick_step(checkpoints: Path, step: int | str | None) -> int:
    """The step directory to restore: latest (None), "best" (from the saved metrics) or a number."""
    manager = ocp.CheckpointManager(
        checkpoints, options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            extra = _unfinished(checkpoints)
            hint = f" (only unfinished saves: {', '.join(extra)})" if extra else ""
            raise RestoreError(f"{checkpoints} holds no complete checkpoint{hint}")
        if step is None or step == "latest":
            return steps[-1]
        if step == "best":
            return _best_step(checkpoints, steps)
        if int(step) not in steps:
            raise RestoreError(f"step {step} is not in {checkpoints} (steps: "
                               f"{', '.join(map(str, steps))})")
        return int(step)
    finally:
        manager.close()


def _best_step(checkpoints: Path, steps: list[int]) -> int:
    """The step with the highest saved val/oIoU (the metric the run ranks checkpoints by)."""
    best, best_value = None, None
    for s in steps:
        try:   # written by orbax when the run saved the step with its evaluation metrics
            metrics = json.loads((checkpoints / str(s) / "metrics" / "metrics").read_text())
        except (OSError, ValueError):
            continue
        value = metrics.get("val/oIoU")
        if value is not None and (best_value is None or value > best_value):
            best, best_value = s, value
    if best is None:
        raise RestoreError(f"no checkpoint in {checkpoints} was saved with val/oIoU; "
                           "give a step number")
    return best


def _run_config(step_dir: Path) -> dict:
    path = step_dir / "config" / "metadata"      # orbax JsonSave's file name
    if path.is_file():
        return json.loads(path.read_text())
    stored = step_dir.parent.parent / RUN_CONFIG
    if stored.is_file():
        return json.loads(stored.read_text())
    raise RestoreError(f"{step_dir} has no stored run config; is it a magnet_jax checkpoint?")


def abstract_model_params(model, image_size: int, max_tokens: int, mesh) -> Any:
    """ShapeDtypeStructs of the model parameters with this mesh's shardings."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        boxed = abstract_params(model, image_size, max_tokens, boxed=True)
        shardings = sharding.logical_shardings(boxed, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(boxed), shardings)


def _model_config(run_or_model: dict, dtype: str) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(checkpoint_io.tuples_from_json(run_or_model))
    cfg.dtype = dtype
    return cfg


def _build_model(cfg: ml_collections.ConfigDict, path: Path):
    """The stored config's method builds the model; an unknown one is a RestoreError."""
    try:
        return methods.build_model(cfg)
    except methods.MethodError:
        raise RestoreError(f"{path} holds a model {cfg.get('name')!r} that no method here "
                           f"builds; known methods: {', '.join(methods.METHODS)}") from None


def _placement_error(err: Exception, mesh) -> RestoreError:
    shape = dict(mesh.shape)
    return RestoreError(
        f"cannot place the checkpoint's parameters on a data={shape['data']} × "
        f"fsdp={shape['fsdp']} mesh of {mesh.size} devices ({str(err).splitlines()[0][:240]}); "
        "choose an fsdp size that divides the sharded parameter dimensions (fsdp=1 always works)")


def _restore_train_state(step_dir: Path, mesh, dtype: str) -> LoadedModel:
    run = _run_config(step_dir)
    if not isinstance(run.get("model"), dict) or "name" not in run["model"]:
        raise RestoreError(f"{step_dir}: the stored config has no model section")
    cfg = _model_config(run["model"], dtype)
    model = _build_model(cfg, step_dir)
    target = abstract_model_params(model, int(cfg.image_size), int(cfg.max_tokens), mesh)
    manager = ocp.CheckpointManager(
        step_dir.parent, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
        item_names=("state",))
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        restored = manager.restore(int(step_dir.name), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item={"params": target},
                                         restore_args={"params": restore_args},
                                         partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0][:300]
        if "shard" in msg.lower() or "divisible" in msg.lower():
            raise _placement_error(e, mesh) from None
        raise RestoreError(f"cannot restore the model parameters from {step_dir}: {msg} "
                           "(a checkpoint of another model or config?)") from None
    finally:
        manager.close()
    return LoadedModel(cfg, restored["state"]["params"], str(step_dir), "train_state",
                       int(step_dir.name), run)


def _restore_params_dir(path: Path, mesh, dtype: str) -> LoadedModel:
    try:
        cfg, record = checkpoint_io.read_config(str(path), expect_model=None)
    except (checkpoint_io.CheckpointError, FileNotFoundError) as e:
        raise RestoreError(str(e)) from None
    cfg.dtype = dtype
    model = _build_model(cfg, path)
    target = abstract_model_params(model, int(cfg.image_size), int(cfg.max_tokens), mesh)
    try:
        _, params = checkpoint_io.load_params(str(path), target, expect_model=None)
    except checkpoint_io.CheckpointError as e:
        msg = str(e)
        if "shard" in msg.lower() or "divisible" in msg.lower():
            raise _placement_error(e, mesh) from None
        raise RestoreError(msg) from None
    return LoadedModel(cfg, params, str(path), "params", None, None)


def load_model(path: str | os.PathLike, mesh=None, step: int | str | None = None,
               dtype: str = "float32") -> LoadedModel:
    """The model config and its parameters from `path` (module docstring), on `mesh`
    (default: every device on the data axis)."""
    path = Path(path).absolute()
    mesh = mesh if mesh is not None else sharding.make_mesh()
    if not path.exists():
        raise RestoreError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise RestoreError(f"checkpoint {path} is not a directory")
    if not any(path.iterdir()):
        raise RestoreError(f"checkpoint directory {path} is empty")
    if _is_step_dir(path):
        if step is not None:
            raise RestoreError(f"{path} is one step's directory; drop --step or point at "
                               "the workdir")
        return _restore_train_state(path, mesh, dtype)
    checkpoints = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    if any(p.name.isdigit() or "tmp" in p.name for p in checkpoints.iterdir()):
        return _restore_train_state(checkpoints / str(_pick_step(checkpoints, step)), mesh, dtype)
    if checkpoints != path:
        raise RestoreError(f"{checkpoints} holds no checkpoint")
    if (path / checkpoint_io.PARAMS).exists() or (path / checkpoint_io.COMPLETE).exists():
        if step is not None:
            raise RestoreError(f"{path} is a params directory (one set of weights); drop --step")
        return _restore_params_dir(path, mesh, dtype)
    raise RestoreError(f"{path} is neither a training workdir (checkpoints/<step>/) nor a params "
                       "directory (config.json, params/, COMPLETE)")
