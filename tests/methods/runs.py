"""What the method tests share: the micro run settings and the 1-device rerun of a method's
micro config in a fresh process (8 simulated devices cannot be undone in this one)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.evaluation.test_evaluate import one_device_env
from tests.training.test_loop import REPO


def micro_run_settings(config, data_dir: str, steps: int, num_overlays: int = 0):
    """A few steps on a 32-px synthetic set, batch 8 on a (4, 2) data × fsdp mesh, one
    evaluation and one synchronous checkpoint at the end."""
    config.data.dir = data_dir
    config.data.synthetic.update(dict(num_train=24, num_val=6, num_heldout=0, image_size=32))
    config.data.eval_splits = ("val",)
    config.train.update(dict(global_batch_size=8, num_steps=steps, log_every_steps=1,
                             progress_bar=False, mesh_fsdp=2))
    config.optim.warmup_steps = 1
    config.eval.update(dict(every_steps=0, batch_size=8, num_overlays=num_overlays,
                            at_end=True))
    config.checkpoint.update(dict(every_steps=0, max_to_keep=1, async_save=False))
    return config


def one_device_losses(config_function: str, data_dir: str, workdir: str,
                      steps: int = 2) -> dict[int, float]:
    """Train `module:function(data_dir, **{'train.mesh_fsdp': 1})` for `steps` steps on one
    CPU device in a fresh process; its logged train losses by step."""
    module, function = config_function.split(":")
    code = (
        "import json, sys\n"
        "import jax\n"
        "jax.config.update('jax_default_matmul_precision', 'highest')   # as conftest.py\n"
        "from pathlib import Path\n"
        "from magnet_jax.training import loop\n"
        f"from {module} import {function} as make_config\n"
        "from tests.training.test_loop import FAST, train_losses\n"
        "config = make_config(sys.argv[1], **{'train.mesh_fsdp': 1})\n"
        f"loop.train(config, sys.argv[2], compiler_options=FAST, stop_after_steps={steps})\n"
        "print('LOSSES', json.dumps(train_losses(Path(sys.argv[2]))))\n")
    proc = subprocess.run([sys.executable, "-c", code, data_dir, workdir], env=one_device_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("LOSSES ")][-1]
    return {int(k): v for k, v in json.loads(line[len("LOSSES "):]).items()}
