"""Train a method (MagNet by default): `python -m magnet_jax.train [--config
configs/NAME.py[:ARG]] [--workdir DIR] [--config.key=value ...]`; `model.name` in the config
picks the method (docs/methods.md).

With no arguments it trains the built-in synthetic default (configs/magnet.py:synthetic) in
./workdir/synthetic: the data is generated on first use, no download. Rerunning the same
command resumes the run from its last checkpoint. See magnet_jax/training/loop.py for what the
workdir holds.

Multi-host (TPU pod slice, SLURM): pass --distributed to call jax.distributed.initialize() first
(it reads the coordinator from the environment), and run the same command on every host.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "magnet.py") + ":synthetic"

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand: the config flag applies --config.KEY overrides while being defined,
    so `check_overrides` must run first to name an unknown key with a suggestion."""
    config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Training config file[:ARG], e.g. configs/refcoco.py.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (default workdir/<config name>).")
    flags.DEFINE_bool("allow_config_change", False,
                      "Continue a workdir whose stored config differs from this one.")
    flags.DEFINE_bool("distributed", False,
                      "Call jax.distributed.initialize() first (multi-host runs).")


def _all_keys(config, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        out.append(name)
        if hasattr(value, "items"):
            out.extend(_all_keys(value, name + "."))
    return out


def check_overrides(argv: list[str]) -> None:
    """Fail on an unknown --config.KEY before absl does, naming the nearest known key."""
    from ml_collections.config_flags import config_flags as cf  # the loader of the flag

    config_arg = DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            config_arg = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            config_arg = argv[i + 1]
    path, _, arg = config_arg.partition(":")
    if not Path(path).is_file():
        raise SystemExit(f"error: --config {path} does not exist")
    try:
        module = cf._LoadConfigModule("config", path)  # pylint: disable=protected-access
        config = module.get_config(*([arg] if arg else []))
    except ValueError as e:
        raise SystemExit(f"error: --config {config_arg}: {e}") from None
    known = _all_keys(config)
    for arg in argv:
        m = re.match(r"--config\.([^=\s]+)", arg)
        if m and m.group(1) not in known:
            from magnet_jax.methods import owner_of_key
            owner = owner_of_key(m.group(1), config.model.get("name"))
            if owner is not None:
                raise SystemExit(f"error: config key {m.group(1)!r} belongs to method {owner!r}, "
                                 f"but this config's model.name is {config.model.name!r}")
            near = difflib.get_close_matches(m.group(1), known, n=1, cutoff=0.5)
            hint = f"; did you mean --config.{near[0]}?" if near else ""
            raise SystemExit(f"error: unknown config key {m.group(1)!r}{hint}")


def _quiet_logs() -> None:
    """Our progress at INFO on stderr; orbax's and grain's per-save chatter only at WARNING."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("magnet_jax")
    ours.setLevel(logging.INFO)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    ours.addHandler(handler)
    ours.propagate = False


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from magnet_jax import compilation_cache
    compilation_cache.enable()
    if FLAGS.distributed:
        import jax
        jax.distributed.initialize()
    from magnet_jax.training import loop
    from magnet_jax.training.checkpointing import CheckpointConfigError

    _quiet_logs()
    config = FLAGS.config
    workdir = FLAGS.workdir or str(Path("workdir") / config.name)
    try:
        result = loop.train(config, workdir, allow_config_change=FLAGS.allow_config_change)
    except (loop.ConfigError, CheckpointConfigError, loop.NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None
    summary = "  ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items()
                        if k.endswith(("/oIoU", "/mIoU", "/gres/gIoU", "/gres/N-acc")))
    print(f"{result.stopped} at step {result.step} in {result.seconds / 60:.1f} min; "
          f"{summary}; workdir {Path(workdir).absolute()}", flush=True)
    if result.stopped == "done":
        print(where_to_look(Path(workdir)), flush=True)


def where_to_look(workdir: Path) -> str:
    """What a finished run leaves to look at, and the commands that use it."""
    lines = ["", "Where to look:"]
    overlays = sorted((workdir / "overlays").glob("step_*"))
    if overlays:
        lines.append(f"  overlays (prediction | ground truth)  {overlays[-1]}/")
    if (workdir / "curves.png").exists():
        lines.append(f"  loss and metric curves                {workdir / 'curves.png'}")
    lines.append(f"  metrics, one JSON line per log        {workdir / 'metrics.jsonl'}")
    lines += [
        "  evaluate the best checkpoint:  python -m magnet_jax.evaluate "
        f"--checkpoint {workdir} --step best",
        f"  try it in the browser:         python -m magnet_jax.demo --checkpoint {workdir}",
        f"  predict one image:             python -m magnet_jax.predict --checkpoint {workdir} "
        "--image IMG --text \"the red circle\" --out mask.png --overlay overlay.png",
    ]
    return "\n".join(lines)


def run() -> None:
    check_overrides(sys.argv[1:])
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
