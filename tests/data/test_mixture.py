"""Dataset mixtures: the overlap filter's known answer, determinism, resume, weights, bad input.

The fixture is four tiny converted datasets under one root (the layout of configs/magnet.py's
all448), with hand-picked COCO image ids so that some train images are another dataset's
val/test images (LEAKS below). Records are 16×16; no model is compiled.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from magnet_jax.data import mixture, pipeline, records

SIZE = 16
# dir -> (dataset, split_by, {split: [(ref_id, image_id, sentences), ...]})
DATASETS = {
    "refcoco_unc": ("refcoco", "unc", {
        "train": [(1, 101, 1), (2, 101, 2), (3, 102, 1), (4, 103, 3), (5, 104, 1), (6, 105, 2),
                  (7, 106, 1), (8, 107, 1)],
        "val": [(31, 201, 1), (32, 202, 1)], "testA": [(33, 203, 1)], "testB": [(34, 204, 2)]}),
    "refcocop_unc": ("refcoco+", "unc", {
        "train": [(11, 101, 2), (12, 201, 1), (13, 108, 1), (14, 109, 2), (15, 203, 3)],
        "val": [(41, 205, 1)], "testA": [(42, 206, 1)], "testB": [(43, 207, 1)]}),
    "refcocog_umd": ("refcocog", "umd", {
        "train": [(21, 202, 2), (22, 205, 1), (23, 205, 2), (24, 110, 1), (25, 111, 1),
                  (26, 112, 2)],
        "val": [(51, 103, 1)], "test": [(52, 208, 2)]}),
    "refcocog_google": ("refcocog", "google", {
        "train": [(61, 109, 1), (62, 300, 1)], "val": [(63, 104, 1), (64, 109, 1)]}),
}
MIX = ("refcoco_unc", "refcocop_unc", "refcocog_umd")
# Known answer, worked out by hand from DATASETS: {train split: (removed ref ids, sentences,
# images)} with refcocog_google's val excluded too ...
LEAKS = {
    "refcoco/train": ({4, 5}, 3 + 1, 2),             # 103: G-Ref umd val; 104: G-Ref google val
    "refcoco+/train": ({12, 14, 15}, 1 + 2 + 3, 3),  # 201: RefCOCO val; 109: google val; 203: testA
    "refcocog_umd/train": ({21, 22, 23}, 2 + 1 + 2, 2),  # 202: RefCOCO val; 205: RefCOCO+ val
}
# ... and without it (refcocog is then the only G-Ref dataset: no partition in its name).
LEAKS_WITHOUT_GOOGLE = {
    "refcoco/train": ({4}, 3, 1),
    "refcoco+/train": ({12, 15}, 1 + 3, 2),
    "refcocog/train": ({21, 22, 23}, 5, 2),
}


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def _record(tok, dataset, split_by, split, ref_id, image_id, num_sentences) -> dict:
    count = np.zeros((SIZE, SIZE), np.uint8)
    count[2:9, 3:12] = 1
    raws = [f"thing {ref_id} number {k}" for k in range(num_sentences)]
    enc = tok.batch_encode(raws, warn=False)
    return {
        "schema_version": records.SCHEMA_VERSION, "dataset": dataset, "split_by": split_by,
        "split": split, "ref_id": ref_id, "ann_id": 1000 + ref_id, "image_id": image_id,
        "category_id": 1, "image_file": f"COCO_train2014_{image_id:012d}.jpg",
        "image_jpeg": _jpeg(image_id), "height": SIZE, "width": SIZE,
        "bbox": np.asarray([3, 2, 9, 7], np.float32), "area": 63.0, "iscrowd": 0,
        "mask_count_png": records.count_png(count), "num_polygons": 1, "overlap_pixels": 0,
        "sent_ids": np.arange(num_sentences, dtype=np.int64) + 100 * ref_id,
        "raw": raws, "sent": raws, "input_ids": enc.ids.astype(np.int32),
        "attention_mask": enc.attention_mask.astype(np.int8),
        "num_wordpieces": (enc.num_pieces + 2).astype(np.int32),
    }


def write_dataset(out_dir, dataset, split_by, splits, convention="official"):
    from magnet_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(None)
    for split, refs in splits.items():
        recs = [_record(tok, dataset, split_by, split, *r) for r in refs]
        records.write_shards(iter(recs), out_dir, split, 2 if split == "train" else 1,
                             meta={"dataset": dataset, "split_by": split_by,
                                   "mask_convention": convention})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    for name, (dataset, split_by, splits) in DATASETS.items():
        write_dataset(root / name, dataset, split_by, splits)
    return root


def _removed(report, name):
    r = report["train"][name]["removed"]
    return r["refs"], r["sentences"], r["images"]


def _check_known_answer(report, mix, leaks):
    assert set(report["train"]) == set(leaks)
    for name, (refs, sentences, images) in leaks.items():
        assert _removed(report, name) == (len(refs), sentences, images), name
        total = report["train"][name]["total"]["refs"]
        assert report["train"][name]["kept"]["refs"] == total - len(refs)
    if mix is not None:
        for d, (name, (refs, _, _)) in zip(mix.datasets, leaks.items()):
            meta = records.read_meta(d.dir, "train")
            kept = {meta["ref_ids"][i] for i in d.keep}
            assert kept == set(meta["ref_ids"]) - refs and not kept & refs, name


def test_overlap_filter_known_answer(root):
    mix = mixture.build_mixture([(m, None) for m in MIX], root=str(root),
                                exclude_eval_of=("refcocog_google",))
    assert [d.name for d in mix.datasets] == ["refcoco", "refcoco+", "refcocog_umd"]
    assert mix.excluded == [("refcocog_google", str(root / "refcocog_google"))]
    _check_known_answer(mix.report, mix, LEAKS)
    assert mix.report["train"]["refcoco+/train"]["overlap_images"] == {
        "refcoco/val": 1, "refcoco/testA": 1, "refcoco/testB": 0, "refcoco+/val": 0,
        "refcoco+/testA": 0, "refcoco+/testB": 0, "refcocog_umd/val": 0,
        "refcocog_umd/test": 0, "refcocog_google/val": 1}
    # Default weights: the kept refs (8 - 2, 5 - 3, 6 - 3), normalised in the report.
    assert [d.weight for d in mix.datasets] == [6.0, 2.0, 3.0]
    assert mix.num_train_refs == 11
    assert mix.report["datasets"]["refcoco"]["weight"] == pytest.approx(6 / 11)

    plain = mixture.build_mixture([(m, None) for m in MIX], root=str(root))
    _check_known_answer(plain.report, plain, LEAKS_WITHOUT_GOOGLE)
    table = mixture.format_table(mix.report)
    assert "refcoco+/train" in table and "11 distinct images in 9 val/test splits" in table


def test_filter_log_lines(root, caplog):
    with caplog.at_level("INFO", logger="magnet_jax.data.mixture"):
        mixture.build_mixture([(m, None) for m in MIX], root=str(root),
                              exclude_eval_of=("refcocog_google",))
    assert ("overlap filter: refcoco+/train: removed 3 of 5 refs, 6 of 9 sentences, 3 of 5 "
            "images") in caplog.text


def test_image_ids_from_records_when_meta_lacks_them(root, tmp_path):
    """meta.json written before image_ids existed: the ids come from the records, and
    --add-image-ids stores them."""
    import shutil

    old = tmp_path / "old"
    for name in DATASETS:
        shutil.copytree(root / name, old / name)
        for split in records.available_splits(old / name):
            path = records.meta_path(old / name, split)
            meta = json.loads(path.read_text())
            del meta["image_ids"]
            path.write_text(json.dumps(meta))
    assert "image_ids" not in records.read_meta(old / "refcoco_unc", "train")
    mix = mixture.build_mixture([(m, None) for m in MIX], root=str(old),
                                exclude_eval_of=("refcocog_google",))
    _check_known_answer(mix.report, mix, LEAKS)
    assert mixture.main(["--add-image-ids", str(old / "refcoco_unc")]) == 0
    meta = records.read_meta(old / "refcoco_unc", "train")
    assert meta["image_ids"] == records.read_meta(root / "refcoco_unc", "train")["image_ids"]


def test_cli_report(root, capsys):
    dirs = [str(root / m) for m in MIX]
    assert mixture.main(["--report", *dirs, "--exclude-eval-of",
                         str(root / "refcocog_google")]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[:out.index("\ntrain split")])
    _check_known_answer(report, None, LEAKS)
    assert "refcocog_umd/train" in out.split("\ntrain split")[1]
    assert mixture.main(["--report", str(root / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"error: dataset directory {root / 'nope'} does " \
                                              "not exist"


def test_counts_from_refer_pickles_match_the_converted(root, tmp_path):
    folders = {"refcoco": "refcoco", "refcoco+": "refcoco+", "refcocog": "refcocog"}
    for dataset, split_by, splits in DATASETS.values():
        refs = [{"ref_id": r, "image_id": i, "split": split, "ann_id": 1000 + r,
                 "sentences": [{"sent_id": 100 * r + k, "raw": "x", "sent": "x"}
                               for k in range(n)]}
                for split, rows in splits.items() for r, i, n in rows]
        (tmp_path / folders[dataset]).mkdir(exist_ok=True)
        with open(tmp_path / folders[dataset] / f"refs({split_by}).p", "wb") as f:
            pickle.dump(refs, f, protocol=2)
    report = mixture.refer_overlap_report(
        tmp_path, [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")],
        exclude_eval_of=[("refcocog", "google")])
    _check_known_answer(report, None, LEAKS)
    converted = mixture.build_mixture([(m, None) for m in MIX], root=str(root),
                                      exclude_eval_of=("refcocog_google",)).report
    assert report["train"] == converted["train"]
    assert mixture.main(["--refer-root", str(tmp_path), "--report", "refcoco:unc",
                         "refcoco+:unc", "--json-only"]) == 0


# --------------------------------------------------------------------------------------------
# The train stream


def _mix(root, **kw):
    return mixture.build_mixture([(m, None) for m in MIX], root=str(root),
                                 exclude_eval_of=("refcocog_google",), **kw)


def _train(mix, seed=0, batch=4, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return mixture.train_dataset(mix, image_size=SIZE, global_batch=batch, seed=seed, **kw)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches(root):
    mix = _mix(root)
    a, b, c = _train(mix), _train(_mix(root)), _train(mix, seed=1)
    for i in range(4):
        assert _equal(a[i], b[i])
    firsts = lambda ds: [(int(d), int(r)) for i in range(4)  # noqa: E731
                         for d, r in zip(ds[i]["dataset_index"], ds[i]["ref_id"])]
    assert firsts(a) != firsts(c)
    assert a[0]["image"].shape == (4, SIZE, SIZE, 3) and a[0]["dataset_index"].dtype == np.int32


def test_weights_and_filter_in_the_stream(root):
    """Default weights 6:2:3 (kept refs); every kept ref, no removed one, each equally often."""
    mix = _mix(root)
    ds = _train(mix, batch=11)
    seen = [(int(d), int(r)) for i in range(30)
            for d, r in zip(ds[i]["dataset_index"], ds[i]["ref_id"])]
    per_dataset = np.bincount([d for d, _ in seen], minlength=3)
    np.testing.assert_allclose(per_dataset / len(seen), [6 / 11, 2 / 11, 3 / 11], atol=0.01)
    removed = {(k, r) for k, (refs, _, _) in enumerate(LEAKS.values()) for r in refs}
    assert not set(seen) & removed
    kept = {(k, int(r)) for k, d in enumerate(mix.datasets)
            for r in np.asarray(records.read_meta(d.dir, "train")["ref_ids"])[d.keep]}
    assert set(seen) == kept
    counts = np.asarray([seen.count(x) for x in kept])
    assert counts.min() >= 27 and counts.max() <= 33   # 330 draws over 11 refs: ~30 each

    given = mixture.build_mixture([(MIX[0], 1.0), (MIX[1], 3.0)], root=str(root))
    ds = _train(given, batch=8)
    idx = np.concatenate([ds[i]["dataset_index"] for i in range(50)])
    assert abs(np.mean(idx == 1) - 0.75) < 0.02


def test_sentence_sampling_weights_by_sentences(root):
    mix = _mix(root, sample="sentence")
    assert [d.weight for d in mix.datasets] == [d.kept_sentences for d in mix.datasets]
    ds = _train(mix, sample="sentence", batch=2)
    assert ds[0]["sent_id"].shape == (2,)


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_resumes_exactly(root, workers):
    mix = _mix(root)
    it = pipeline.make_iterator(_train(mix, augment=pipeline.Augment()), workers)
    try:
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
    finally:
        if workers:
            it.close()
    fresh = pipeline.make_iterator(_train(_mix(root), augment=pipeline.Augment()), workers)
    try:
        fresh.set_state(state)
        got = [next(fresh) for _ in range(3)]
    finally:
        if workers:
            fresh.close()
    assert all(_equal(e, g) for e, g in zip(expected, got))


def test_iterator_state_through_orbax(root, tmp_path):
    """The loop's checkpoint item (grain.checkpoint.CheckpointSave) restores the next batches."""
    import grain
    import orbax.checkpoint as ocp

    it = pipeline.make_iterator(_train(_mix(root)), 0)
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    fresh = pipeline.make_iterator(_train(_mix(root)), 0)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(2, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert all(_equal(next(fresh), e) for e in expected)


def test_process_slices_partition_the_stream(root):
    mix = _mix(root)
    one = _train(mix, batch=4)
    both = [_train(mix, batch=4, process_index=p, process_count=2) for p in range(2)]
    global_ids = [(int(d), int(r)) for i in range(3)
                  for d, r in zip(one[i]["dataset_index"], one[i]["ref_id"])]
    # Process p takes elements p, p + 2, ... of the global stream.
    for p in range(2):
        local = [(int(d), int(r)) for i in range(3)
                 for d, r in zip(both[p][i]["dataset_index"], both[p][i]["ref_id"])]
        assert local[:6] == global_ids[p::2][:6]


# --------------------------------------------------------------------------------------------
# Bad input, config and loop wiring


def test_bad_input_is_one_clear_error(root, tmp_path):
    with pytest.raises(mixture.MixtureError, match=r"^data.mixture: dataset directory "
                                                   r".*/nope does not exist$"):
        mixture.build_mixture([("nope", None)], root=str(root))
    with pytest.raises(mixture.MixtureError, match=r"data.exclude_eval_of: dataset directory "
                                                   r".*/gone does not exist"):
        mixture.build_mixture([(MIX[0], None)], root=str(root), exclude_eval_of=("gone",))
    union = tmp_path / "union"
    write_dataset(union, "refcoco", "unc", {"train": [(1, 900, 1)], "val": [(2, 901, 1)],
                                            "testA": [(3, 902, 1)], "testB": [(4, 903, 1)]},
                  convention="union")
    with pytest.raises(mixture.MixtureError) as err:
        mixture.build_mixture([(MIX[0], None), (str(union), None)], root=str(root))
    msg = str(err.value)
    assert "\n" not in msg and str(root / MIX[0]) in msg and str(union) in msg
    assert "'official'" in msg and "'union'" in msg and "mixture_force_mixed_conventions" in msg
    forced = mixture.build_mixture([(MIX[0], None), (str(union), None)], root=str(root),
                                   force_mixed_conventions=True)
    assert [d.convention for d in forced.datasets] == ["official", "union"]
    # A known partition missing one of its val/test splits would leak that split's images.
    partial = tmp_path / "partial"
    write_dataset(partial, "refcocog", "umd", {"train": [(1, 910, 1)], "val": [(2, 911, 1)]})
    with pytest.raises(mixture.MixtureError, match=r"lacks the converted refcocog umd split "
                                                   r"'test'"):
        mixture.build_mixture([(str(partial), None)])
    with pytest.raises(mixture.MixtureError, match="listed twice"):
        mixture.build_mixture([(MIX[0], None), (MIX[0], None)], root=str(root))
    with pytest.raises(mixture.MixtureError, match=r"weights missing for refcocop_unc"):
        mixture.parse_entries([("refcoco_unc", 2.0), "refcocop_unc"])
    with pytest.raises(mixture.MixtureError, match=r"weight -1 of refcoco_unc is not a "
                                                   r"positive number"):
        mixture.parse_entries([("refcoco_unc", -1)])
    with pytest.raises(mixture.MixtureError, match=r"entry \('a', 1, 2\) is neither"):
        mixture.parse_entries([("a", 1, 2)])
    with pytest.raises(mixture.MixtureError, match="no dataset of the mixture has split 'heldout'"):
        _mix(root).eval_targets(("val", "heldout"))


def test_all448_config_builds_the_mixture(root):
    from configs import magnet as magnet_configs
    from magnet_jax.training import loop

    config = magnet_configs.get_config("all448")
    assert config.model.image_size == 448 and config.data.dir == ""
    config.data.root = str(root)
    mix = loop.prepare_mixture(config)
    assert [d.name for d in mix.datasets] == ["refcoco", "refcoco+", "refcocog_umd"]
    _check_known_answer(mix.report, mix, LEAKS)
    assert loop.eval_targets(config, "", mix) == [
        ("refcoco/val", str(root / "refcoco_unc"), "val"),
        ("refcoco+/val", str(root / "refcocop_unc"), "val"),
        ("refcocog_umd/val", str(root / "refcocog_umd"), "val")]
    assert loop.num_train_steps(config, "", mix) == 40 * 11 // 32
    # Weights given on the command line (ml_collections parses the tuple literal).
    config.data.mixture = (("refcoco_unc", 1.0), ("refcocog_umd", 1.0))
    assert [d.weight for d in loop.prepare_mixture(config).datasets] == [1.0, 1.0]

    config.checkpoint.best_metric = "val/oIoU"
    with pytest.raises(loop.ConfigError, match=r"best_metric 'val/oIoU' is no evaluation"):
        loop.prepare_mixture(config)
    config.checkpoint.best_metric = "refcoco/val/oIoU"
    config.data.dir = str(root / "refcoco_unc")
    with pytest.raises(loop.ConfigError, match="set data.dir or data.mixture, not both"):
        loop.prepare_mixture(config)
    config.data.mixture = ()
    with pytest.raises(loop.ConfigError, match="exclude_eval_of needs data.mixture"):
        loop.prepare_mixture(config)
    config.data.exclude_eval_of = ()
    assert loop.prepare_mixture(config) is None
    for arg in ("official", "swin_tiny", "refcoco"):
        assert not magnet_configs.get_config(arg).data.mixture


def test_old_run_configs_without_mixture_keys_still_resume(tmp_path):
    from configs import magnet as magnet_configs
    from magnet_jax.training import checkpointing

    config = magnet_configs.get_config("tiny")
    stored = checkpointing.config_json(config)
    for key in ("mixture", "root", "exclude_eval_of", "mixture_force_mixed_conventions"):
        del stored["data"][key]
    assert checkpointing.config_differences(stored, config) == []
    config.data.mixture = ("a",)
    assert checkpointing.config_differences(stored, config) == ["data.mixture: [] -> ['a']"]
