"""`predict --demo` picks the trained default run when there is one (no model is built here)."""

from __future__ import annotations

import pytest

from magnet_jax import predict


class _Chosen(Exception):
    pass


@pytest.fixture
def chosen(monkeypatch):
    def from_checkpoint(directory, *args, step=None, **kwargs):
        raise _Chosen("trained", directory, step)

    def random_model(*args, **kwargs):
        raise _Chosen("random")

    monkeypatch.setattr(predict.Predictor, "from_checkpoint", staticmethod(from_checkpoint))
    monkeypatch.setattr(predict, "demo_predictor", random_model)


def test_without_a_default_run_it_falls_back_to_random_weights(chosen, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workdir" / "synthetic" / "checkpoints").mkdir(parents=True)  # nothing saved
    assert not predict.has_checkpoint(predict.DEFAULT_RUN)
    with pytest.raises(_Chosen) as got:
        predict.main(["--demo", "--out", "m.png"])
    assert got.value.args == ("random",)


def test_a_default_run_with_a_checkpoint_is_used(chosen, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workdir" / "synthetic" / "checkpoints" / "600").mkdir(parents=True)
    assert predict.has_checkpoint(predict.DEFAULT_RUN)
    with pytest.raises(_Chosen) as got:
        predict.main(["--demo", "--out", "m.png"])
    assert got.value.args == ("trained", predict.DEFAULT_RUN, "best")


def test_the_demo_scene_follows_the_default_run_style(tmp_path, monkeypatch):
    """The held-out scene `predict --demo` shows is drawn with the run's own generator style."""
    import json
    import types

    from magnet_jax.data import synthetic
    from magnet_jax.restore import RUN_CONFIG

    monkeypatch.chdir(tmp_path)
    run = tmp_path / predict.DEFAULT_RUN
    run.mkdir(parents=True)
    style = dict(object_scale=1.5, ordinal_rate=0.5, max_objects=3)
    (run / RUN_CONFIG).write_text(json.dumps(
        {"data": {"synthetic": dict(style, seed=2, image_size=48)}}))
    path, sentence = predict.default_run_sample(types.SimpleNamespace(image_size=64),
                                                tmp_path / "out")
    want = synthetic.make_example(2, "heldout", 1, 48, **style)
    assert open(path, "rb").read() == want["image_jpeg"] and sentence == want["sent"][0]
    base = synthetic.make_example(2, "heldout", 1, 48)
    assert want["image_jpeg"] != base["image_jpeg"]
