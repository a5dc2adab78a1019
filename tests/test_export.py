"""jax.export of the inference function (magnet_jax.export) and its model-free loader
(magnet_jax.serving): same logits as the direct jit(model.apply) path, at two batch sizes from one
symbolic-batch export; a saved export runs in a process where flax and the model code cannot be
imported; partial directories are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from magnet_jax import export as export_lib
from magnet_jax import serving
from magnet_jax.models import build_model, mask_logits_at, random_params
from tests.training.models import micro_model_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SIZES = (1, 3)


def _inputs(batch: int, image_size: int, max_tokens: int, seed: int):
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    ids = rng.integers(1000, 30000, (batch, max_tokens)).astype(np.int32)
    att = np.zeros((batch, max_tokens), np.int32)
    for row, length in enumerate(rng.integers(3, max_tokens + 1, batch)):
        att[row, :length] = 1
    ids[att == 0] = 0
    return image, ids, att


@pytest.fixture(scope="module")
def exported_model():
    """The micro model (32x32, inference heads only), random params, one symbolic-batch export,
    and the direct path's logits for each batch size."""
    cfg = micro_model_config()
    cfg.training_heads = False
    model = build_model(cfg)
    params = random_params(model, cfg.image_size, seed=0)
    size = cfg.image_size

    @jax.jit
    def direct(params, image, ids, att):
        outputs = model.apply({"params": params}, image, ids, att, train=False)
        return mask_logits_at(outputs, (size, size))

    # One direct compile: the batch of 1 is the first row of the batch of 3 (rows are
    # independent; the direct path's B=1 and B=3 first rows differ by ~2e-8).
    largest = max(BATCH_SIZES)
    batch_inputs = _inputs(largest, size, cfg.max_tokens, seed=0)
    batch_logits = np.asarray(direct(params, *batch_inputs))
    inputs = {b: tuple(x[:b] for x in batch_inputs) for b in BATCH_SIZES}
    expected = {b: batch_logits[:b] for b in BATCH_SIZES}
    exported = export_lib.export_model(cfg, params)
    return {"cfg": cfg, "params": params, "exported": exported, "inputs": inputs,
            "expected": expected}


@pytest.fixture(scope="module")
def saved_dir(exported_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "magnet"
    return export_lib.save_export(out, exported_model["exported"], exported_model["params"],
                                  exported_model["cfg"])


def test_symbolic_batch_export_matches_direct_logits(exported_model):
    exported = jax.export.deserialize(bytearray(exported_model["exported"].serialize()))
    assert jax.export.is_symbolic_dim(exported.in_avals[-1].shape[0])
    call = jax.jit(exported.call)
    for batch in BATCH_SIZES:
        got = np.asarray(call(exported_model["params"], *exported_model["inputs"][batch]))
        want = exported_model["expected"][batch]
        assert got.shape == want.shape == (batch, 32, 32) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_saved_export_round_trip(exported_model, saved_dir):
    assert sorted(os.listdir(saved_dir)) == sorted(
        [serving.MODEL_FILE, serving.PARAMS_FILE, serving.METADATA_FILE, serving.COMPLETE])
    with open(os.path.join(saved_dir, serving.METADATA_FILE)) as f:
        metadata = json.load(f)
    assert metadata["inputs"]["image"] == {**metadata["inputs"]["image"],
                                           "shape": ["batch", 32, 32, 3], "dtype": "float32"}
    assert metadata["inputs"]["ids"]["dtype"] == metadata["inputs"]["att"]["dtype"] == "int32"
    assert (metadata["image_size"], metadata["max_tokens"], metadata["batch_size"]) == (32, 20, None)
    assert metadata["platforms"] == ["cpu"] and metadata["model"]["swin"]["depths"] == [1, 1, 1, 1]

    model = serving.load_export(saved_dir)
    for batch in BATCH_SIZES:
        got = np.asarray(model(*exported_model["inputs"][batch]))
        np.testing.assert_allclose(got, exported_model["expected"][batch], rtol=0, atol=1e-5)
    with pytest.raises(serving.ExportError, match=r"image must be \(B, 32, 32, 3\)"):
        model(np.zeros((1, 64, 64, 3), np.float32), *exported_model["inputs"][1][1:])


_MODEL_FREE_SCRIPT = """
import sys
for blocked in ("flax", "magnet_jax.models", "ml_collections", "orbax"):
    sys.modules[blocked] = None  # any import of them now raises ImportError
import numpy as np
from magnet_jax.serving import load_export
directory, inputs, out = sys.argv[1:4]
with np.load(inputs) as arrays:
    logits = load_export(directory)(arrays["image"], arrays["ids"], arrays["att"])
np.save(out, np.asarray(logits))
"""


def test_load_export_needs_no_model_code(exported_model, saved_dir, tmp_path):
    image, ids, att = exported_model["inputs"][3]
    np.savez(tmp_path / "inputs.npz", image=image, ids=ids, att=att)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run(
        [sys.executable, "-c", _MODEL_FREE_SCRIPT, saved_dir, str(tmp_path / "inputs.npz"),
         str(tmp_path / "logits.npy")], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), exported_model["expected"][3],
                               rtol=0, atol=1e-5)


def test_partial_or_missing_export_is_refused(saved_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(saved_dir, partial)
    os.remove(partial / serving.COMPLETE)
    with pytest.raises(serving.ExportError, match="partial export"):
        serving.load_export(partial)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        serving.load_export(tmp_path / "nowhere")
    no_params = tmp_path / "no_params"
    shutil.copytree(saved_dir, no_params)
    os.remove(no_params / serving.PARAMS_FILE)
    with pytest.raises(serving.ExportError, match="has no params.npz"):
        serving.load_export(no_params)


def test_save_export_refuses_params_of_another_shape(exported_model, tmp_path):
    params = jax.tree.map(np.asarray, exported_model["params"])
    params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    with pytest.raises(serving.ExportError, match=r"unexpected \(1\): extra/kernel"):
        export_lib.save_export(tmp_path / "bad", exported_model["exported"], params,
                               exported_model["cfg"])
    assert not os.path.exists(tmp_path / "bad")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert export_lib.main(["--checkpoint", str(tmp_path / "missing"),
                            "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        export_lib.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out"),
                         "--platforms", ","])
    assert exit_info.value.code == 2


def test_cli_exports_a_checkpoint(exported_model, tmp_path, capsys):
    from magnet_jax import checkpoint_io
    checkpoint = checkpoint_io.save_params(tmp_path / "ckpt", exported_model["params"],
                                           exported_model["cfg"])
    out = tmp_path / "exported"
    assert export_lib.main(["--checkpoint", checkpoint, "--out", str(out), "--batch-size", "2",
                            "--platforms", "cpu,cuda,tpu"]) == 0
    assert str(out) in capsys.readouterr().out
    with open(out / serving.METADATA_FILE) as f:
        metadata = json.load(f)
    assert metadata["batch_size"] == 2 and metadata["platforms"] == ["cpu", "cuda", "tpu"]
    assert metadata["inputs"]["ids"]["shape"] == [2, 20]
