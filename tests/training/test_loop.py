"""The training loop: resume equals an uninterrupted run, preemption, non-finite stops, bad input.

Tiny model at 32×32 on a few synthetic examples, compiled at XLA optimisation level 0.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from configs import magnet as magnet_configs
from magnet_jax.data import pipeline
from magnet_jax.training import checkpointing, loop
from tests.training.models import micro_model_config

FAST = {"xla_backend_optimization_level": 0}
REPO = Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
    config = magnet_configs.get_config("tiny")
    config.model = micro_model_config()
    config.data.synthetic.update(dict(num_train=24, num_val=6, num_heldout=0, image_size=32))
    config.data.eval_splits = ("val",)
    config.train.update(dict(global_batch_size=8, num_steps=4, log_every_steps=1,
                             progress_bar=False))
    config.optim.warmup_steps = 1
    config.eval.update(dict(every_steps=0, batch_size=8, num_overlays=2, at_end=True))
    config.checkpoint.update(dict(every_steps=2, max_to_keep=2, async_save=True))
    config.mg.weight = 0.0
    config.cal.update(dict(weight=0.5, num_fg=8, num_bg=8))
    return with_overrides(config, overrides)


def with_overrides(config, overrides: dict):
    """Set dotted keys ("train.num_steps": 4) of a config in place; returns it."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def train_losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    """One synthetic dataset for every run of this module (data.dir set explicitly)."""
    from magnet_jax.data import synthetic
    out = tmp_path_factory.mktemp("data")
    synthetic.generate(out, num_train=24, num_val=6, num_heldout=6, image_size=32, seed=0)
    return str(out)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shared_data):
    workdir = tmp_path_factory.mktemp("full")
    result = loop.train(tiny_config(**{"data.dir": shared_data}), workdir,
                        compiler_options=FAST)
    return workdir, result


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_overlays_and_params(uninterrupted):
    workdir, result = uninterrupted
    assert result.stopped == "done" and result.step == 4
    losses = train_losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4] and all(np.isfinite(list(losses.values())))
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val/oIoU" in r]
    assert evals and evals[-1]["step"] == 4
    assert {"val/mIoU", "val/prec@0.5", "val/prec@0.9"} <= set(evals[-1])
    assert {"train/loss_seg", "train/loss_cal", "train/grad_norm"} <= set(rows[0])
    assert len(list((workdir / "overlays" / "step_0000004").glob("val_*.png"))) == 2
    assert (workdir / "curves.png").stat().st_size > 0
    assert list(workdir.glob("events.out.tfevents.*"))
    steps = checkpointing.TrainCheckpoints(workdir).all_steps()
    assert 4 in steps and len(steps) <= 3          # last 2 + the best
    assert (workdir / "params" / "COMPLETE").exists()


@pytest.mark.slow
def test_resume_continues_the_same_loss_curve(uninterrupted, shared_data, tmp_path):
    """Stop after step 2 (checkpoint), start again in the same workdir: the logged losses of
    steps 1-4 equal the uninterrupted run's (same state, data-iterator position and RNG)."""
    full_dir, _ = uninterrupted
    config = tiny_config(**{"data.dir": shared_data})
    first = loop.train(config, tmp_path, stop_after_steps=2, compiler_options=FAST)
    assert first.stopped == "paused" and first.step == 2
    assert not (tmp_path / "params").exists()
    second = loop.train(config, tmp_path, compiler_options=FAST)
    assert second.step == 4 and second.stopped == "done"
    expected, got = train_losses(full_dir), train_losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)],
                               [expected[s] for s in range(1, 5)], rtol=1e-6)


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_and_batch_ids(shared_data, tmp_path, monkeypatch):
    real = pipeline.to_global

    def poisoned(batch, mesh):
        if poisoned.calls == 2:                       # the third batch: step 3
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        poisoned.calls += 1
        return real(batch, mesh)

    poisoned.calls = 0
    monkeypatch.setattr(pipeline, "to_global", poisoned)
    config = tiny_config(**{"data.dir": shared_data})
    with pytest.raises(loop.NonFiniteLossError, match=r"at step 3; batch ref_id/sent_id"):
        loop.train(config, tmp_path, compiler_options=FAST)
    # Step 2 was saved before the bad step; nothing at or after step 3 was.
    assert checkpointing.TrainCheckpoints(tmp_path).all_steps() == [2]


def test_workdir_of_another_config_is_refused(tmp_path):
    checkpointing.check_config(tmp_path, tiny_config())
    # Resumable keys may change ...
    checkpointing.check_config(tmp_path, tiny_config(**{"train.num_steps": 10,
                                                        "eval.every_steps": 5}))
    # ... others may not, unless allowed.
    with pytest.raises(checkpointing.CheckpointConfigError,
                       match=r"another config .*optim\.lr: 0\.001 -> 0\.5"):
        checkpointing.check_config(tmp_path, tiny_config(**{"optim.lr": 0.5}))
    checkpointing.check_config(tmp_path, tiny_config(**{"optim.lr": 0.5}), allow_change=True)
    stored = json.loads((tmp_path / checkpointing.RUN_CONFIG).read_text())
    assert stored["optim"]["lr"] == 0.5


def test_bad_input_is_one_clear_error(tmp_path, shared_data):
    with pytest.raises(loop.ConfigError, match="data.dir .*does not exist"):
        loop.prepare_data(tiny_config(**{"data.dir": str(tmp_path / "nope")}), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(loop.ConfigError, match="split 'train' is not readable"):
        loop.prepare_data(tiny_config(**{"data.dir": str(tmp_path / "empty")}), tmp_path)
    with pytest.raises(loop.ConfigError, match="split 'test' is not readable"):
        loop.prepare_data(tiny_config(**{"data.dir": shared_data,
                                         "data.eval_splits": ("test",)}), tmp_path)
    with pytest.raises(loop.ConfigError, match=r"global_batch_size=12 is not divisible by the "
                                               r"8 devices"):
        loop.make_run_mesh(tiny_config(**{"train.global_batch_size": 12}))
    with pytest.raises(loop.ConfigError, match="accumulation_steps=3"):
        loop.make_run_mesh(tiny_config(**{"train.accumulation_steps": 3}))
    with pytest.raises(loop.ConfigError, match="compute_dtype"):
        loop.model_from_config(tiny_config(**{"train.compute_dtype": "float16"}))


def test_unknown_config_key_names_the_nearest(capsys):
    from magnet_jax import train
    with pytest.raises(SystemExit, match=r"unknown config key 'optim\.lrr'; did you mean "
                                         r"--config\.optim\.lr\?"):
        train.check_overrides(["--config.optim.lrr=1"])
    with pytest.raises(SystemExit, match="does not exist"):
        train.check_overrides(["--config", "configs/none.py"])
    train.check_overrides(["--config=configs/refcoco.py", "--config.train.num_epochs=2"])


def test_dataset_configs_are_the_recipe():
    from configs import refcoco, refcocog_google
    c = refcoco.get_config()
    assert (c.model.image_size, c.model.swin.embed_dim, c.model.bert.num_layers) == (480, 128, 12)
    assert (c.train.global_batch_size, c.train.num_epochs, c.optim.lr) == (32, 40, 5e-5)
    assert c.mg.weight == 0.5 and c.cal.weight == 0.5 and c.optim.text_trainable == "lavt"
    assert refcocog_google.get_config().train.epoch_refs == 44_822


@pytest.mark.slow
# Outside CI (pytest -m extended), for CI's 30 minutes; run it when touching the loop's
# signal handling or checkpoint saving.
@pytest.mark.extended
def test_sigterm_saves_and_stops_at_the_step_boundary(shared_data, tmp_path, monkeypatch):
    real = pipeline.to_global

    def preempted(batch, mesh):
        preempted.calls += 1
        if preempted.calls == 2:                      # TPU preemption notice during step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, mesh)

    preempted.calls = 0
    monkeypatch.setattr(pipeline, "to_global", preempted)
    config = tiny_config(**{"data.dir": shared_data, "checkpoint.every_steps": 0})
    before = signal.getsignal(signal.SIGTERM)
    result = loop.train(config, tmp_path, compiler_options=FAST)
    assert (result.stopped, result.step) == ("preempted", 2)
    assert checkpointing.TrainCheckpoints(tmp_path).all_steps() == [2]
    assert signal.getsignal(signal.SIGTERM) == before           # handler restored


def test_a_finished_run_says_where_to_look(tmp_path):
    from magnet_jax.train import where_to_look
    (tmp_path / "overlays" / "step_0000600").mkdir(parents=True)
    (tmp_path / "overlays" / "step_0001800").mkdir()
    (tmp_path / "curves.png").write_bytes(b"png")
    text = where_to_look(tmp_path)
    assert f"{tmp_path}/overlays/step_0001800/" in text and "step_0000600" not in text
    assert str(tmp_path / "curves.png") in text
    assert f"python -m magnet_jax.demo --checkpoint {tmp_path}" in text
    assert f"python -m magnet_jax.evaluate --checkpoint {tmp_path} --step best" in text
