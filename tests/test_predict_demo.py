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
