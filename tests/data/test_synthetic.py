"""The built-in synthetic dataset: determinism, held-out pairs, exact masks, clean text."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from magnet_jax.data import records, synthetic
from magnet_jax.data.tokenizer import load_tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, num_train=40, num_val=10, num_heldout=10, image_size=SIZE, seed=0)
    return out


def _files(d) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_same_seed_gives_identical_bytes(data_dir, tmp_path):
    again = tmp_path / "again"
    synthetic.main(["--out", str(again), "--num-train", "40", "--num-val", "10",
                    "--num-heldout", "10", "--image-size", str(SIZE), "--seed", "0"])
    assert _files(again) == _files(data_dir)
    other = tmp_path / "other"
    synthetic.generate(other, num_train=40, num_val=10, num_heldout=10, image_size=SIZE, seed=1)
    assert _files(other)["train.array_record-00000-of-00008"] != \
        _files(data_dir)["train.array_record-00000-of-00008"]


def test_example_does_not_depend_on_dataset_size():
    a = synthetic.make_example(3, "val", 7, SIZE)
    b = synthetic.make_example(3, "val", 7, SIZE)
    assert a["image_jpeg"] == b["image_jpeg"] and a["raw"] == b["raw"]
    assert synthetic.make_example(3, "train", 7, SIZE)["image_jpeg"] != a["image_jpeg"]


def test_meta_and_record_fields(data_dir):
    for split, n in (("train", 40), ("val", 10), ("heldout", 10)):
        meta = records.read_meta(data_dir, split)
        assert (meta["dataset"], meta["split_by"], meta["num_records"]) == ("synthetic", "seed0", n)
        assert meta["counts"]["sentences"] == sum(meta["sentence_counts"])
        src = records.RecordSource(data_dir, split)
        ids = [src[i]["ref_id"] for i in range(len(src))]
        assert ids == meta["ref_ids"] and len(set(ids)) == n
        assert [len(src[i]["sent_ids"]) for i in range(n)] == meta["sentence_counts"]


def test_heldout_pairs_never_in_train_or_val():
    for split in ("train", "val"):
        for i in range(150):
            ex = synthetic.make_example(0, split, i, SIZE)
            pairs = {(o["colour"], o["shape"]) for o in ex["synthetic"]["objects"]}
            assert not pairs & synthetic.HELDOUT_PAIRS, (split, i, pairs)
            for s in ex["sent"]:  # nor in the text
                for c, sh in synthetic.HELDOUT_PAIRS:
                    assert f"{c} {sh}" not in s
    seen = set()
    for i in range(60):
        ex = synthetic.make_example(0, "heldout", i, SIZE)
        objs, t = ex["synthetic"]["objects"], ex["synthetic"]["target"]
        pair = (objs[t]["colour"], objs[t]["shape"])
        assert pair in synthetic.HELDOUT_PAIRS
        seen.add(pair)
    assert len(seen) >= 4  # the split spreads over the held-out pairs


def test_masks_are_the_visible_target(data_dir):
    src = records.RecordSource(data_dir, "train")
    for i in range(len(src)):
        rec = src[i]
        official = records.mask_from_count_png(rec["mask_count_png"], "official")
        union = records.mask_from_count_png(rec["mask_count_png"], "union")
        np.testing.assert_array_equal(official, union)  # counts are 0/1
        assert official.shape == (rec["height"], rec["width"]) == (SIZE, SIZE)
        assert official.sum() == rec["area"] > 0
        x, y, w, h = rec["bbox"].astype(int)
        inside = np.zeros_like(official)
        inside[y:y + h, x:x + w] = 1
        assert official[inside == 0].sum() == 0
    for i in range(30):
        ex = synthetic.make_example(0, "train", i, SIZE)
        objs, t = ex["synthetic"]["objects"], ex["synthetic"]["target"]
        mask = records.mask_from_count_png(ex["mask_count_png"]).astype(bool)
        o = objs[t]
        full = synthetic._rasterise(o["shape"], o["cx"], o["cy"], o["r"], SIZE)
        assert mask.any() and not (mask & ~full).any()
        assert mask.sum() >= synthetic._MIN_VISIBLE * full.sum()
        img = np.asarray(Image.open(io.BytesIO(ex["image_jpeg"])).convert("RGB"), np.float32)
        interior = mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) \
            & np.roll(mask, -1, 1)
        if interior.sum() >= 5:  # flat colour + noise: the masked pixels have the target's
            mean = img[interior].mean(axis=0)
            assert np.abs(mean - synthetic.COLOURS[o["colour"]]).max() < 30, (i, mean)


_RELATION = re.compile(r"\b(left of|right of|above|below|from the)\b|most\b")


def test_sentences_describe_the_target_uniquely():
    for i in range(80):
        ex = synthetic.make_example(0, "train", i, SIZE)
        objs, t = ex["synthetic"]["objects"], ex["synthetic"]["target"]
        target = objs[t]
        assert 1 <= len(ex["sent"]) <= 3 and len(set(ex["sent"])) == len(ex["sent"])
        for s in ex["sent"]:
            words = s.split()
            head = next(w for w in words if w in synthetic.SHAPES)
            assert head == target["shape"], s
            adjs = words[:words.index(head)]
            assert all(a not in synthetic.COLOURS or a == target["colour"] for a in adjs), s
            assert all(a not in synthetic.SIZES or a == target["size"] for a in adjs), s
            if not _RELATION.search(s):  # a plain attribute phrase must single the target out
                size = next((a for a in adjs if a in synthetic.SIZES), None)
                colour = next((a for a in adjs if a in synthetic.COLOURS), None)
                matching = [o for o in objs if o["shape"] == head
                            and colour in (None, o["colour"]) and size in (None, o["size"])]
                assert len(matching) == 1, (s, objs)


def test_distractors_of_the_same_shape_are_common():
    with_distractor = 0
    for i in range(100):
        ex = synthetic.make_example(0, "train", i, SIZE)
        objs, t = ex["synthetic"]["objects"], ex["synthetic"]["target"]
        with_distractor += sum(o["shape"] == objs[t]["shape"] for o in objs) > 1
    assert with_distractor >= 50


def test_text_tokenises_without_unk(data_dir, tokenizer):
    for split in ("train", "val", "heldout"):
        src = records.RecordSource(data_dir, split)
        for i in range(len(src)):
            rec = src[i]
            assert rec["raw"] != rec["sent"] or all(r == r.lower() for r in rec["raw"])
            enc = tokenizer.batch_encode(rec["raw"], warn=False)
            np.testing.assert_array_equal(rec["input_ids"], enc.ids)
            np.testing.assert_array_equal(rec["attention_mask"], enc.attention_mask)
            assert not (rec["input_ids"] == tokenizer.unk_id).any()
            assert not enc.truncated.any()
            for s in rec["sent"]:
                assert s == s.lower() and re.fullmatch(r"[a-z ]+", s), s


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        synthetic.make_example(0, "test", 0)
    with pytest.raises(ValueError, match="image_size"):
        synthetic.generate("/nonexistent", num_train=1, image_size=8)


def test_relation_sentences_hold_in_the_scene():
    holds = {"left of": lambda a, b: a["cx"] < b["cx"],
             "to the right of": lambda a, b: a["cx"] > b["cx"],
             "above": lambda a, b: a["cy"] < b["cy"],
             "below": lambda a, b: a["cy"] > b["cy"]}
    checked = 0
    for i in range(80):
        ex = synthetic.make_example(0, "train", i, SIZE)
        objs, t = ex["synthetic"]["objects"], ex["synthetic"]["target"]
        for s in ex["sent"]:
            phrase = next((p for p in holds if f" {p} the " in s), None)
            if phrase is None:
                continue
            landmark_words = s.split(f" {phrase} the ")[1].split()
            landmarks = [o for o in objs if o["shape"] == landmark_words[-1]
                         and all(w in (o["size"], o["colour"]) for w in landmark_words[:-1])]
            assert len(landmarks) == 1, s  # the landmark is unique
            assert holds[phrase](objs[t], landmarks[0]), s
            checked += 1
    assert checked >= 10


def test_inspect_reads_synthetic_records(tmp_path, capsys):
    import json

    from magnet_jax.data import inspect as inspect_cli
    from magnet_jax.data.synthetic import generate

    generate(tmp_path / "syn", num_train=4, num_val=3, num_heldout=2, image_size=64, seed=1)
    assert inspect_cli.main([str(tmp_path / "syn"), "--split", "val"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(line["mask_sum"] > 0 for line in lines)


def test_expression_kind_names_the_generator_of_each_sentence():
    # The single-target kinds (multi and no_target: tests/data/test_synthetic_gres.py).
    seen = {kind: 0 for kind in ("attribute", "ordinal", "relation")}
    for i in range(60):
        rng = np.random.default_rng([0, 7, i])
        objs, t = synthetic._scene(rng, "train", SIZE)
        for kind, exprs in (("attribute", synthetic._attribute_exprs(objs, t)),
                            ("ordinal", synthetic._ordinal_exprs(objs, t, SIZE)),
                            ("relation", synthetic._relation_exprs(objs, t, SIZE))):
            for sentence in exprs:
                assert synthetic.expression_kind(sentence) == kind, sentence
                assert synthetic.expression_kind(sentence.capitalize() + ".") == kind
                seen[kind] += 1
    assert min(seen.values()) > 5, seen


def test_instance_fields_are_every_visible_object(data_dir):
    """--with-instances fields: one instance per object, the target's is the record's mask."""
    for split in ("train", "val", "heldout"):
        assert records.read_meta(data_dir, split)["with_instances"] is True
    src = records.RecordSource(data_dir, "train")
    all_ids = []
    for i in range(len(src)):
        rec = src[i]
        n = len(rec["instance_count_pngs"])
        assert 3 <= n <= 6
        assert len(rec["instance_ann_ids"]) == len(rec["instance_category_ids"]) == n
        assert rec["instance_category_names"] == [
            synthetic.SHAPES[c - 1] for c in rec["instance_category_ids"]]
        assert not rec["instance_iscrowd"].any()
        ids = list(rec["instance_ann_ids"])
        assert ids.count(rec["ann_id"]) == 1
        all_ids += ids
        t = ids.index(rec["ann_id"])
        assert rec["instance_category_ids"][t] == rec["category_id"]
        assert rec["instance_count_pngs"][t] == rec["mask_count_png"]
        masks = [records.count_from_png(p) for p in rec["instance_count_pngs"]]
        for m in masks:
            assert m.shape == (SIZE, SIZE) and set(np.unique(m)) == {0, 1}
        assert (np.sum(masks, axis=0) <= 1).all()  # visible parts do not overlap
    assert len(set(all_ids)) == len(all_ids)  # unique over the split
    ex = synthetic.make_example(0, "train", 3, SIZE)
    objs = ex["synthetic"]["objects"]
    assert ex["instance_category_names"] == [o["shape"] for o in objs]  # drawing order


def test_object_scale_and_ordinal_rate():
    base = [synthetic.make_example(0, "val", i, SIZE) for i in range(40)]
    scaled = [synthetic.make_example(0, "val", i, SIZE, object_scale=1.3) for i in range(40)]
    radii = [o["r"] / SIZE for ex in scaled for o in ex["synthetic"]["objects"]]
    assert min(radii) >= 0.07 * 1.3 - 1e-6 and max(radii) <= 0.20 * 1.3 + 1e-6
    assert max(radii) > 0.20                     # beyond the base range
    assert np.mean([ex["area"] for ex in scaled]) > 1.4 * np.mean([ex["area"] for ex in base])
    kinds = [synthetic.expression_kind(s) for ex in base for s in ex["sent"]]
    assert "ordinal" in kinds
    none = [synthetic.make_example(0, "val", i, SIZE, ordinal_rate=0.0) for i in range(40)]
    assert not [s for ex in none for s in ex["sent"] if synthetic.expression_kind(s) == "ordinal"]
    # Rate 1 draws nothing more: the base data, byte for byte.
    same = synthetic.make_example(0, "val", 5, SIZE, ordinal_rate=1.0, object_scale=1.0)
    assert same["image_jpeg"] == base[5]["image_jpeg"] and same["raw"] == base[5]["raw"]
    with pytest.raises(ValueError, match="object_scale"):
        synthetic.make_example(0, "val", 0, SIZE, object_scale=3.0)
    with pytest.raises(ValueError, match="ordinal_rate"):
        synthetic.make_example(0, "val", 0, SIZE, ordinal_rate=1.5)


def test_max_objects():
    base = [synthetic.make_example(0, "val", i, SIZE) for i in range(60)]
    fewer = [synthetic.make_example(0, "val", i, SIZE, max_objects=3) for i in range(60)]
    counts = [len(ex["synthetic"]["objects"]) for ex in fewer]
    assert max(counts) <= 3 and max(len(ex["synthetic"]["objects"]) for ex in base) > 3
    # Every kind is still drawn with three objects at most.
    kinds = {synthetic.expression_kind(s) for ex in fewer for s in ex["sent"]}
    assert kinds == {"attribute", "ordinal", "relation"}
    # The cap of 6 is the base generator, byte for byte.
    same = synthetic.make_example(0, "val", 7, SIZE, max_objects=6)
    assert same["image_jpeg"] == base[7]["image_jpeg"] and same["raw"] == base[7]["raw"]
    for bad in (2, 7, 4.5):
        with pytest.raises(ValueError, match="max_objects"):
            synthetic.make_example(0, "val", 0, SIZE, max_objects=bad)


def test_workdir_data_of_another_style_is_refused(tmp_path):
    """A workdir holding the synthetic data of another generator setting (an older default)
    is a one-line error, not a silent run on other data."""
    from configs import magnet
    from magnet_jax.training import loop

    config = magnet.get_config("tiny")
    config.data.synthetic.update(dict(num_train=4, num_val=2, num_heldout=2, image_size=32))
    loop.prepare_data(config, tmp_path)
    meta = json.loads(records.meta_path(tmp_path / loop.SYNTHETIC_DIR, "train").read_text())
    assert meta["style"] == {"object_scale": 1.0, "ordinal_rate": 1.0, "max_objects": 6}
    config.data.synthetic.object_scale = 1.3
    with pytest.raises(loop.ConfigError, match=r"object_scale 1\.0 \(config 1\.3\)"):
        loop.prepare_data(config, tmp_path)
    config.data.synthetic.object_scale = 1.0
    config.data.synthetic.max_objects = 4
    with pytest.raises(loop.ConfigError, match=r"max_objects 6 \(config 4\)"):
        loop.prepare_data(config, tmp_path)
