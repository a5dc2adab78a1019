"""JMCELN through the method interface: the same train, restore, evaluate and export paths as
MagNet, on an 8-device fsdp mesh and on 1 device, and the errors for mixed-up methods."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import jmceln as jmceln_configs
from configs import magnet as magnet_configs
from magnet_jax import evaluate, methods, restore, sharding
from magnet_jax import export as export_lib
from magnet_jax.checkpoint_io import save_params
from magnet_jax.models import abstract_params, build_model, random_params
from magnet_jax.training import checkpointing, loop
from tests.methods.runs import micro_run_settings, one_device_losses
from tests.training.test_loop import (FAST, shared_data, train_losses,  # noqa: F401
                                      with_overrides)

STEPS = 3


def micro_jmceln_config(data_dir: str = "", **overrides):
    """configs/jmceln.py:tiny with the micro trunk of the loop tests (one block per stage)."""
    config = jmceln_configs.get_config("tiny")
    config.model.image_size = 32
    config.model.swin.depths = (1, 1, 1, 1)
    config.model.pixel_decoder.num_layers = 1
    config.model.jmceln.update(dict(num_embeddings=4, ffn_dim=64))
    micro_run_settings(config, data_dir, STEPS, num_overlays=0)
    return with_overrides(config, overrides)


def one_device_mesh():
    return sharding.make_mesh(1, 1, jax.devices()[:1])


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, shared_data):
    """STEPS steps of JMCELN on the 8 devices as a (4, 2) data × fsdp mesh."""
    workdir = tmp_path_factory.mktemp("jmceln8")
    result = loop.train(micro_jmceln_config(shared_data), workdir, compiler_options=FAST)
    return workdir, result


@pytest.mark.slow
def test_trains_evaluates_and_exports_its_own_parameters(fsdp_run):
    workdir, result = fsdp_run
    assert result.stopped == "done" and result.step == STEPS
    losses = train_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(np.isfinite(list(losses.values())))
    assert 0.0 <= result.eval_metrics["val/oIoU"] <= 1.0
    loaded = restore.load_model(workdir / loop.PARAMS_DIR, one_device_mesh())
    assert loaded.config.name == "jmceln"
    assert set(loaded.params) == {"image_model", "language_model", "pixel_decoder",
                                  "context_decoder"}
    assert "cross_attn_2" in loaded.params["context_decoder"]      # one layer per stage


@pytest.mark.slow
# Outside CI (pytest -m extended): the 1-device = 8-device property is the framework's,
# checked in CI for MagNet (tests/training/test_step.py, test_loop.py).
@pytest.mark.extended
def test_one_device_run_gives_the_fsdp_losses(fsdp_run, shared_data, tmp_path):
    """The same config on 1 device (a fresh process) logs the 8-device run's losses."""
    workdir8, _ = fsdp_run
    one = one_device_losses("tests.methods.test_jmceln:micro_jmceln_config", shared_data,
                            str(tmp_path / "one"))
    eight = train_losses(workdir8)
    assert sorted(one) == [1, 2]
    np.testing.assert_allclose([one[1], one[2]], [eight[1], eight[2]], rtol=1e-5)


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh_and_evaluates_as_the_loop(fsdp_run, tmp_path):
    workdir, result = fsdp_run
    loaded = restore.load_model(workdir, sharding.make_mesh(1, 8))
    assert (loaded.kind, loaded.step) == ("train_state", STEPS)
    final = restore.load_model(workdir / loop.PARAMS_DIR, sharding.make_mesh(8, 1))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(final.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "val", "--fsdp", "2",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["method"] == "jmceln"
    for name in ("oIoU", "mIoU", "prec@0.5"):
        np.testing.assert_allclose(report["metrics"][name], result.eval_metrics[f"val/{name}"],
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_export_and_predictor_give_the_models_logits(fsdp_run):
    workdir, _ = fsdp_run
    loaded = restore.load_model(workdir / loop.PARAMS_DIR, one_device_mesh())
    method = methods.method_of(loaded.config)
    model = method.build_model(loaded.config)
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(1000, 2000, (2, 20)).astype(np.int32)
    att = (np.arange(20)[None] < np.array([[7], [20]])).astype(np.int32)
    direct = jax.jit(lambda p, *x: method.infer(model, p, *x, (32, 32))[0])(
        loaded.params, image, ids, att)
    exported = export_lib.export_model(loaded.config, loaded.params)
    served = exported.call(loaded.params, image, ids, att)
    np.testing.assert_allclose(np.asarray(served), np.asarray(direct), atol=1e-5)
    assert np.asarray(direct).std() > 0       # not a constant map
    # The Predictor (predict's CLI and API) runs the same inference function.
    from magnet_jax.predict import Predictor
    predictor = Predictor(loaded.config, loaded.params, max_batch=2)
    logits, _, _ = predictor._run(image, ids, att)
    np.testing.assert_allclose(logits, np.asarray(direct), atol=1e-5)


def test_model_shapes_and_parameter_tree():
    """eval_shape only: the JMCELN tree has MagNet's trunk and no MagNet decoder."""
    cfg = micro_jmceln_config().model
    model = build_model(cfg)
    params = abstract_params(model, 32)
    assert "context_decoder" in params and "predictor" not in params and "lang_proj" not in params
    magnet = build_model(magnet_configs.get_config("tiny").model)
    magnet_params = abstract_params(magnet, 64)
    # The trunk's Swin block and BERT embeddings have MagNet's names and shapes at equal widths.
    assert (jax.tree.structure(params["language_model"]["embeddings"])
            == jax.tree.structure(magnet_params["language_model"]["embeddings"]))
    inputs = (jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32),
              jax.ShapeDtypeStruct((2, 20), np.int32), jax.ShapeDtypeStruct((2, 20), np.int32))
    out = jax.eval_shape(lambda p, *x: model.apply({"params": p}, *x), params, *inputs)
    assert out["pred_masks"].shape == (2, 1, 8, 8)
    assert len(out["aux_outputs"]) == 2 and len(out["raw_masks"]) == 3


def test_unknown_method_lists_the_known_ones():
    cfg = micro_jmceln_config().model
    cfg.name = "lavt"
    with pytest.raises(ValueError,
                       match=r"unknown model.name 'lavt'; known methods: magnet, jmceln"):
        build_model(cfg)


def test_a_section_of_another_method_is_refused(tmp_path):
    config = micro_jmceln_config(str(tmp_path))
    config.mg = magnet_configs.get_config("tiny").mg
    with pytest.raises(loop.ConfigError, match="'mg' belongs to method 'magnet'.*'jmceln'"):
        loop.model_from_config(config)
    magnet = magnet_configs.get_config("tiny")
    magnet.model.jmceln = micro_jmceln_config().model.jmceln
    with pytest.raises(loop.ConfigError, match="'model.jmceln' belongs to method 'jmceln'"):
        loop.model_from_config(magnet)


def test_an_override_of_another_methods_key_names_the_method():
    from magnet_jax import train
    with pytest.raises(SystemExit, match="config key 'mg.weight' belongs to method 'magnet', "
                                         "but this config's model.name is 'jmceln'"):
        train.check_overrides(["--config", "configs/jmceln.py:synthetic", "--config.mg.weight=0"])
    with pytest.raises(SystemExit, match="'model.jmceln.pan' belongs to method 'jmceln'"):
        train.check_overrides(["--config.model.jmceln.pan=gate"])
    train.check_overrides(["--config=configs/jmceln.py:tiny", "--config.model.jmceln.pan=gate"])


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    """MagNet weights as JMCELN's init, and a MagNet workdir resumed as JMCELN: one line
    naming both methods."""
    magnet_cfg = magnet_configs.get_config("tiny").model
    magnet_cfg.training_heads = False
    params = random_params(build_model(magnet_cfg), 64)
    save_params(str(tmp_path / "magnet_params"), params, magnet_cfg)
    config = micro_jmceln_config(str(tmp_path), **{"init.params": str(tmp_path / "magnet_params")})
    with pytest.raises(loop.ConfigError) as err:
        loop.load_pretrained(config, {}, {})
    assert "holds a 'magnet' checkpoint, but model.name is 'jmceln'" in str(err.value)
    assert "\n" not in str(err.value)
    workdir = tmp_path / "run"
    checkpointing.check_config(workdir, magnet_configs.get_config("tiny"))
    with pytest.raises(checkpointing.CheckpointConfigError,
                       match="holds a 'magnet' run, but model.name is 'jmceln'"):
        checkpointing.check_config(workdir, config)


@pytest.mark.parametrize("key,value,message", [
    ("model.jmceln.pan", "both", "model.jmceln.pan must be one of filter, gate, none"),
    ("jmceln.stage_weights", (1.0, 1.0), "jmceln.stage_weights has 2 entries but "
                                          "model.jmceln.num_stages is 3"),
    ("loss.class_weight", 1.0, "loss.class_weight must be 0 for JMCELN"),
])
def test_bad_jmceln_settings_are_one_clear_error(key, value, message):
    config = micro_jmceln_config(**{key: value})
    with pytest.raises(ValueError, match=message):
        method, _, model = loop.model_from_config(config)
        loop.objective_from_config(config, method, model)
