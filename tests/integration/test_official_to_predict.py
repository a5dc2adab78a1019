"""End to end: a checkpoint with the released key layout -> `convert official` -> `predict`.

The checkpoint is synthesised from random Linen params by the converter's inverse map (no
official code), saved with torch as {'model': state_dict} like the released files, and must
give back exactly the logits of the model it came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from PIL import Image  # noqa: E402

from magnet_jax import convert, predict  # noqa: E402
from magnet_jax.assets import SAMPLE_IMAGE  # noqa: E402
from magnet_jax.data import images as image_io  # noqa: E402
from magnet_jax.data.tokenizer import load_tokenizer  # noqa: E402
from magnet_jax.models import build_model, mask_logits_at, random_params  # noqa: E402
from magnet_jax.models.presets import tiny_model_config  # noqa: E402
from magnet_jax.weights.official_magnet import params_to_official  # noqa: E402

IMAGE_SIZE = 64
TEXT = "the red circle on the left"


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    cfg = tiny_model_config(IMAGE_SIZE)
    params = random_params(build_model(cfg), IMAGE_SIZE, seed=3)
    sd = params_to_official(jax.tree.map(np.asarray, params), cfg)
    root = tmp_path_factory.mktemp("official")
    src = root / "magnet_tiny.pth"
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, src)
    dst = root / "converted"
    rc = convert.main(["official", str(src), str(dst), "--image-size", str(IMAGE_SIZE),
                       "--bert-heads", str(cfg.bert.num_heads)])
    assert rc in (0, None)
    return cfg, params, src, dst


@pytest.fixture(scope="module")
def reference_logits(tiny_official):
    cfg, params, _, _ = tiny_official
    model = build_model(cfg)
    tok = load_tokenizer(None).encode(TEXT)
    pixels = image_io.preprocess_image(image_io.load_image_rgb(SAMPLE_IMAGE), IMAGE_SIZE)[None]
    out = jax.jit(lambda p, i, d, a: model.apply({"params": p}, i, d, a))(
        params, jnp.asarray(pixels), jnp.asarray(tok.ids[None]), jnp.asarray(tok.attention_mask[None]))
    return np.asarray(mask_logits_at(out, (IMAGE_SIZE, IMAGE_SIZE)))[0]


@pytest.mark.slow
def test_converted_checkpoint_predicts_the_same_logits(tiny_official, reference_logits, tmp_path):
    _, _, _, dst = tiny_official
    out, logits_path = tmp_path / "mask.png", tmp_path / "logits.npy"
    overlay = tmp_path / "overlay.png"
    rc = predict.main(["--checkpoint", str(dst), "--image", SAMPLE_IMAGE, "--text", TEXT,
                       "--out", str(out), "--overlay", str(overlay), "--save-logits", str(logits_path)])
    assert rc == 0
    logits = np.load(logits_path)
    assert logits.shape == (IMAGE_SIZE, IMAGE_SIZE) and logits.dtype == np.float32
    # Same weights through two differently fused XLA programs: equal up to float32 rounding.
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-6, atol=1e-6)
    original = Image.open(SAMPLE_IMAGE)
    mask = np.asarray(Image.open(out))
    assert mask.shape == (original.height, original.width)
    assert set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == original.size


def _run_predict(capsys, args):
    rc = predict.main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_predict_bad_inputs_give_one_line_errors(tiny_official, tmp_path, capsys):
    _, _, src, dst = tiny_official
    base = ["--image", SAMPLE_IMAGE, "--text", TEXT, "--out", str(tmp_path / "m.png")]

    rc, err = _run_predict(capsys, ["--checkpoint", str(tmp_path / "nope")] + base)
    assert rc == 2 and "nope" in err and len(err.splitlines()) == 1

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["--checkpoint", str(dst), "--image", str(corrupt), "--text", TEXT,
            "--out", str(tmp_path / "m.png")]
    rc, err = _run_predict(capsys, args)
    assert rc == 2 and "corrupt.jpg" in err and len(err.splitlines()) == 1

    args = ["--checkpoint", str(dst), "--image", SAMPLE_IMAGE, "--text", "   ",
            "--out", str(tmp_path / "m.png")]
    rc, err = _run_predict(capsys, args)
    assert rc == 2 and "empty" in err and len(err.splitlines()) == 1

    rc, err = _run_predict(capsys, ["--checkpoint", str(dst), "--tokenizer",
                                    str(tmp_path / "missing_vocab.txt")] + base)
    assert rc == 2 and "missing_vocab.txt" in err and len(err.splitlines()) == 1

    # A .pth file is not a converted checkpoint directory.
    rc, err = _run_predict(capsys, ["--checkpoint", str(src)] + base)
    assert rc == 2 and len(err.splitlines()) == 1
    assert not (tmp_path / "m.png").exists()


def test_convert_rejects_truncated_and_foreign_files(tiny_official, tmp_path, capsys):
    _, _, src, _ = tiny_official
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    rc = convert.main(["official", str(truncated), str(tmp_path / "out1")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "truncated.pth" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out1").exists()

    foreign = tmp_path / "swin_only.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(8, 3, 4, 4)}}, foreign)
    rc = convert.main(["official", str(foreign), str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "MagNet" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out2").exists()


def test_folder_list_and_batches_give_the_single_predictions(tiny_official, tmp_path):
    """A folder and a list file through --out-dir, and Predictor.predict_batch: each mask and
    logit equals the one-at-a-time prediction, with one compilation per batch bucket."""
    import json

    _, _, _, dst = tiny_official
    folder = tmp_path / "images"
    folder.mkdir()
    sample = Image.open(SAMPLE_IMAGE).convert("RGB")
    sample.save(folder / "a.png")
    sample.resize((90, 70)).save(folder / "b.jpg", quality=95)
    texts = [TEXT, "the blue square"]

    predictor = predict.Predictor.from_checkpoint(str(dst), max_batch=4)
    single = {(name, t): predictor.predict(str(folder / name), t)
              for name in ("a.png", "b.jpg") for t in texts}
    batched = predictor.predict_batch([(str(folder / "a.png"), texts),
                                       (str(folder / "b.jpg"), texts)])
    for (name, per_image) in zip(("a.png", "b.jpg"), batched):
        for t, got in zip(texts, per_image):
            want = single[(name, t)]
            np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert got.mask.shape == want.mask.shape
            assert (got.mask != want.mask).mean() < 1e-3
    assert predictor.compiled_batches == {1, 4}
    assert predictor._forward._cache_size() == 2        # compiled once per bucket

    out = tmp_path / "folder_out"
    assert predict.main(["--checkpoint", str(dst), "--image", str(folder), "--text", texts[0],
                         "--text", texts[1], "--out-dir", str(out), "--batch-size", "4"]) == 0
    rows = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert [(Path(r["image"]).name, r["sentence"]) for r in rows] == \
        [(n, t) for n in ("a.png", "b.jpg") for t in texts]
    for r in rows:
        mask = np.asarray(Image.open(out / r["mask"])) > 0
        want = single[(Path(r["image"]).name, r["sentence"])].mask
        assert mask.shape == want.shape and (mask != want).mean() < 1e-3
        assert (out / r["overlay"]).is_file()

    listing = tmp_path / "pairs.tsv"
    listing.write_text(f"# image<TAB>sentence\nimages/b.jpg\t{texts[1]}\nimages/a.png\t{texts[0]}\n")
    out2 = tmp_path / "list_out"
    assert predict.main(["--checkpoint", str(dst), "--list", str(listing),
                         "--out-dir", str(out2)]) == 0
    rows2 = [json.loads(l) for l in (out2 / "predictions.jsonl").read_text().splitlines()]
    assert [(Path(r["image"]).name, r["sentence"]) for r in rows2] == \
        [("b.jpg", texts[1]), ("a.png", texts[0])]


def test_bad_list_file_is_one_line(tiny_official, tmp_path, capsys):
    _, _, _, dst = tiny_official
    listing = tmp_path / "pairs.tsv"
    listing.write_text("no tab on this line\n")
    rc, err = _run_predict(capsys, ["--checkpoint", str(dst), "--list", str(listing),
                                    "--out-dir", str(tmp_path / "o")])
    assert rc == 2 and "pairs.tsv:1" in err and len(err.splitlines()) == 1
