"""TrainCheckpoints: the best step survives a restart (orbax keeps the metrics on disk)."""

import grain
import jax.numpy as jnp

from magnet_jax.training.checkpointing import TrainCheckpoints


def _save(ckpt, step, metrics=None):
    state = {"params": {"w": jnp.full((3,), float(step))}, "step": jnp.asarray(step)}
    ckpt.save(step, state, iter(grain.MapDataset.range(4).to_iter_dataset()), {"name": "t"},
              metrics=metrics)
    ckpt.wait()


def test_best_checkpoint_is_kept_after_a_restart(tmp_path):
    ckpt = TrainCheckpoints(tmp_path, max_to_keep=1, async_save=False)
    _save(ckpt, 1, {"val/oIoU": 0.5})
    _save(ckpt, 2, {"val/oIoU": 0.3})
    _save(ckpt, 3)                      # a preemption save: no evaluation at this step
    ckpt.close()
    assert sorted(ckpt.all_steps()) == [1, 3]

    resumed = TrainCheckpoints(tmp_path, max_to_keep=1, async_save=False)
    assert resumed.best_step() == 1
    _save(resumed, 4)
    assert sorted(resumed.all_steps()) == [1, 4]     # the best of the first session survives
    resumed.close()


def test_a_key_added_later_matches_its_old_behaviour():
    """A run stored before model.fusion.lang_gate_init existed resumes under the default
    ("zeros", what it ran with) and is refused under "normal"."""
    from configs import magnet
    from magnet_jax.training.checkpointing import config_differences, config_json

    current = magnet.get_config("tiny")
    stored = config_json(current)
    del stored["model"]["fusion"]["lang_gate_init"]
    assert config_differences(stored, current) == []
    current.model.fusion.lang_gate_init = "normal"
    assert config_differences(stored, current) == [
        "model.fusion.lang_gate_init: 'zeros' -> 'normal'"]


def test_how_the_graph_is_compiled_does_not_make_another_run():
    """model.remat and model.scan_layers change the compiled program, not the parameters: a
    run stored before scan_layers existed (or with it off) resumes with either setting; a
    change of the model itself is still refused."""
    from configs import magnet
    from magnet_jax.training.checkpointing import config_differences, config_json

    current = magnet.get_config("tiny")
    stored = config_json(current)
    del stored["model"]["scan_layers"]
    stored["model"]["remat"] = not current.model.remat
    current.model.scan_layers = False
    assert config_differences(stored, current) == []
    current.model.max_tokens += 1
    assert [d.split(":")[0] for d in config_differences(stored, current)] == ["model.max_tokens"]
