"""`python -m magnet_jax.evaluate`: restore on any device count, both protocols, reports, bad input.

A micro-model training checkpoint (the initial state: its masks are arbitrary but not empty)
is written on one mesh and evaluated on another; the numbers must not depend on where it was
written or how many devices (or processes) evaluate it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from magnet_jax import evaluate, restore, sharding
from magnet_jax.data import records, synthetic
from tests.evaluation import runs

REPO = Path(__file__).resolve().parents[2]
DATA_SIZE = 48          # the records' size differs from the model's 32: "original" ≠ "magnet"


def one_device_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_one_device(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=one_device_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    synthetic.generate(out, num_train=8, num_val=7, num_heldout=0, image_size=DATA_SIZE, seed=3)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, data_dir):
    """A checkpoint written on the 8 devices of this session with a (4, 2) fsdp mesh, and its
    evaluation on that mesh."""
    workdir = tmp_path_factory.mktemp("run8")
    params = runs.write_checkpoint(workdir, data_dir, fsdp=2)
    out = workdir / "report8.json"
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "val", "--fsdp", "2",
                          "--out", str(out), "--save-overlays", "2"]) == 0
    return workdir, params, json.loads(out.read_text())


def test_restore_onto_another_mesh_gives_the_saved_values(fsdp_run):
    workdir, saved, _ = fsdp_run
    mesh = sharding.make_mesh(1, 8)
    loaded = restore.load_model(workdir, mesh)
    assert (loaded.kind, loaded.step) == ("train_state", runs.STEP)
    assert "mask_grounding" not in loaded.params            # training-only head left on disk
    flat_saved = dict(jax.tree_util.tree_leaves_with_path(saved))
    for path, leaf in jax.tree_util.tree_leaves_with_path(loaded.params):
        np.testing.assert_array_equal(np.asarray(leaf), flat_saved[path])
    # Shardings follow this mesh's rules: embedding rows over the 8 fsdp devices.
    word = loaded.params["language_model"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_checkpoint_of_8_devices_evaluates_the_same_on_1(fsdp_run, tmp_path):
    workdir, _, report8 = fsdp_run
    out = tmp_path / "report1.json"
    proc = run_one_device(["-m", "magnet_jax.evaluate", "--checkpoint", str(workdir),
                           "--split", "val", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report1 = json.loads(out.read_text())
    assert (report1["devices"], report8["devices"]) == (1, 8)
    assert report1["metrics"] == report8["metrics"]
    assert report1["metrics"]["count"] == report1["num_sentences"] > report1["num_refs"]
    assert 0 < report1["metrics"]["mIoU"] < 1
    assert read_csv(out.with_suffix(".csv")) == read_csv(Path(report8["csv"]))
    assert "oIoU" in proc.stdout and "prec@0.9" in proc.stdout     # the printed table


def test_checkpoint_of_1_device_restores_on_an_fsdp_mesh(data_dir, tmp_path):
    workdir = tmp_path / "run1"
    script = ("import sys, numpy as np, jax; from tests.evaluation import runs; "
              "p = runs.write_checkpoint(sys.argv[1], sys.argv[2], model_init=False); "
              "np.savez(sys.argv[3], **{jax.tree_util.keystr(k): v for k, v in "
              "jax.tree_util.tree_leaves_with_path(p)})")
    proc = run_one_device(["-c", script, str(workdir), str(data_dir), str(tmp_path / "p.npz")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = np.load(tmp_path / "p.npz")
    loaded = restore.load_model(workdir, sharding.make_mesh(4, 2))
    leaves = jax.tree_util.tree_leaves_with_path(loaded.params)
    assert len(leaves) == len(saved.files)
    for path, leaf in leaves:
        np.testing.assert_array_equal(np.asarray(leaf), saved[jax.tree_util.keystr(path)])
        assert leaf.sharding.mesh.shape == {"data": 4, "fsdp": 2}


def test_report_and_csv_contents(fsdp_run, data_dir):
    workdir, _, report = fsdp_run
    for key in ("protocol", "protocol_description", "gt_convention", "threshold", "image_size",
                "num_refs", "num_sentences", "num_empty_union", "checkpoint", "step",
                "matmul_precision", "metrics"):
        assert key in report
    assert report["step"] == runs.STEP and report["num_refs"] == 7
    rows = read_csv(Path(report["csv"]))
    assert len(rows) == report["metrics"]["count"]
    inter = np.array([int(r["intersection"]) for r in rows], np.int64)
    union = np.array([int(r["union"]) for r in rows], np.int64)
    ious = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    # The aggregates recomputed from the CSV by hand.
    assert report["metrics"]["oIoU"] == pytest.approx(inter.sum() / union.sum(), abs=1e-12)
    assert report["metrics"]["mIoU"] == pytest.approx(ious.mean(), abs=1e-12)
    assert report["metrics"]["prec@0.5"] == pytest.approx((ious >= 0.5).mean(), abs=1e-12)
    # Every sentence of the split once, with its text.
    meta = records.read_meta(data_dir, "val")
    assert len({(r["ref_id"], r["sent_id"]) for r in rows}) == sum(meta["sentence_counts"])
    assert all(r["sentence"] for r in rows)
    overlays = sorted((workdir / "report8-overlays").glob("*.png"))
    assert len(overlays) == 2


def test_original_protocol_matches_torch_upsampling(fsdp_run, data_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from magnet_jax.data import pipeline
    from magnet_jax.evaluation.evaluator import EVAL_KEYS, make_eval_step
    from magnet_jax.methods import method_of

    workdir, _, report_magnet = fsdp_run
    out = tmp_path / "original.json"
    assert evaluate.main(["--checkpoint", str(workdir), "--split", "val", "--protocol",
                          "original", "--fsdp", "2", "--out", str(out)]) == 0
    rows = read_csv(out.with_suffix(".csv"))
    # Independently: the model's stride-4 logits (the evaluation's compiled step, so its
    # compilation is reused), torch's bilinear align_corners=True to the record's size, and
    # the mask decoded with PIL (official convention: count == 1).
    mesh = sharding.make_mesh(4, 2)
    loaded = restore.load_model(workdir, mesh)
    method = method_of(loaded.config)
    step = make_eval_step(method, method.build_model(loaded.config),
                          jax.tree.map(lambda a: a.sharding, loaded.params), mesh)
    source = records.RecordSource(data_dir, "val")
    ds = pipeline.eval_dataset(data_dir, "val", image_size=32, global_batch=8)
    expected = []
    for b in (ds[i] for i in range(len(ds))):
        batch = pipeline.to_global({k: b[k] for k in EVAL_KEYS}, mesh)
        coarse = np.array(step(loaded.params, batch)[2])
        up = torch.nn.functional.interpolate(torch.from_numpy(coarse)[:, None],
                                             size=(DATA_SIZE, DATA_SIZE), mode="bilinear",
                                             align_corners=True)[:, 0].numpy()
        for i in np.flatnonzero(b["weight"]):
            rec = source[source.meta["ref_ids"].index(int(b["ref_id"][i]))]
            gt = np.asarray(Image.open(io.BytesIO(rec["mask_count_png"]))) == 1
            pred = up[i] > 0
            expected.append((int(b["ref_id"][i]), int(b["sent_id"][i]),
                             int((pred & gt).sum()), int((pred | gt).sum())))
    got = [(int(r["ref_id"]), int(r["sent_id"]), int(r["intersection"]), int(r["union"]))
           for r in rows]
    assert got == expected
    report = json.loads(out.read_text())
    assert report["protocol"] == "original"
    assert report["metrics"] != report_magnet["metrics"]     # 48 × 48 GT vs the 32 × 32 one


_TWO_PROCESS_EVAL = """
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from magnet_jax import evaluate
out = "{out}/report_" + sys.argv[2] + ".json"
assert evaluate.main(["--checkpoint", "{workdir}", "--split", "val", "--out", out,
                      "--batch-size", "4", "--fsdp", "2"]) == 0
if jax.process_index() == 0:
    print("REPORT " + open(out).read().replace("\\n", " "))
else:
    print("REPORT null")
"""


def test_two_processes_give_the_single_host_numbers(fsdp_run, tmp_path):
    from tests.multiprocess import run_two_processes

    workdir, _, report8 = fsdp_run
    script = _TWO_PROCESS_EVAL.replace("{out}", str(tmp_path)).replace("{workdir}", str(workdir))
    report0, report1 = run_two_processes(script, "REPORT", timeout=600)
    assert report1 is None and not (tmp_path / "report_1.json").exists()   # process 0 writes
    assert report0["processes"] == 2 and report0["devices"] == 4
    assert report0["metrics"] == report8["metrics"]
    assert read_csv(Path(report0["csv"])) == read_csv(Path(report8["csv"]))


# ---- bad input: one line, exit status 2, no report written --------------------------------

def _fails(args, capsys, tmp_path) -> str:
    out = tmp_path / "never.json"
    assert evaluate.main(args + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists() and not out.with_suffix(".csv").exists()
    return err


def test_empty_or_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "is empty" in _fails(["--checkpoint", str(tmp_path / "empty")], capsys, tmp_path)
    assert "does not exist" in _fails(["--checkpoint", str(tmp_path / "nope")], capsys, tmp_path)


def test_partial_checkpoints(tmp_path, capsys):
    params_dir = tmp_path / "params"
    (params_dir / "params").mkdir(parents=True)
    (params_dir / "config.json").write_text(json.dumps({"model": {"name": "magnet"}}))
    assert "partial checkpoint" in _fails(["--checkpoint", str(params_dir)], capsys, tmp_path)
    unfinished = tmp_path / "run" / "checkpoints" / "7.orbax-checkpoint-tmp-1"
    unfinished.mkdir(parents=True)
    err = _fails(["--checkpoint", str(tmp_path / "run")], capsys, tmp_path)
    assert "no complete checkpoint" in err and "7.orbax-checkpoint-tmp-1" in err


def test_checkpoint_of_another_model(tmp_path, capsys):
    other = tmp_path / "other"
    (other / "params").mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"model": {"name": "resnet"}}))
    (other / "COMPLETE").write_text("{}")
    assert "model 'resnet'" in _fails(["--checkpoint", str(other)], capsys, tmp_path)


def test_bad_split_step_and_device_count(fsdp_run, capsys, tmp_path):
    workdir = str(fsdp_run[0])
    err = _fails(["--checkpoint", workdir, "--split", "testB"], capsys, tmp_path)
    assert "split 'testB'" in err and "available: " in err and "val" in err
    assert "step 99" in _fails(["--checkpoint", workdir, "--step", "99"], capsys, tmp_path)
    assert "--fsdp 3" in _fails(["--checkpoint", workdir, "--fsdp", "3"], capsys, tmp_path)
    assert "--batch-size 12" in _fails(["--checkpoint", workdir, "--batch-size", "12"], capsys,
                                       tmp_path)


def test_reproduce_commands(fsdp_run, data_dir, tmp_path):
    """docs/reproduce.md: every evaluation command parses, one per published row, and the
    first runs with its checkpoint, data and output replaced by this test's."""
    import shlex

    lines = [l for l in (REPO / "docs" / "reproduce.md").read_text().splitlines()
             if l.startswith("python -m magnet_jax.evaluate ")]
    assert len(lines) == 9                                   # the 9 published numbers
    parsed = [evaluate._parse(shlex.split(l)[3:]) for l in lines]
    assert {(Path(a.checkpoint).name, a.split) for a in parsed} == {
        ("magnet_refcoco", "val"), ("magnet_refcoco", "testA"), ("magnet_refcoco", "testB"),
        ("magnet_refcoco+", "val"), ("magnet_refcoco+", "testA"), ("magnet_refcoco+", "testB"),
        ("magnet_refcocog_umd", "val"), ("magnet_refcocog_umd", "test"),
        ("magnet_refcocog_google", "val")}
    args = shlex.split(lines[0])[3:]
    replace = {"--checkpoint": str(fsdp_run[0]), "--data": str(data_dir),
               "--out": str(tmp_path / "row1.json")}
    args = [replace.get(args[i - 1], a) if i else a for i, a in enumerate(args)]
    assert evaluate.main(args + ["--fsdp", "2"]) == 0
    assert json.loads((tmp_path / "row1.json").read_text())["metrics"] == fsdp_run[2]["metrics"]
