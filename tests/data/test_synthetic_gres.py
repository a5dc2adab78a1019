"""The synthetic generalised-RIS splits (gres_train / gres_val / gres_heldout): the switch
leaves the ordinary splits byte-identical; multi-target and no-target records mean what they
say (checked by an independent reading of each expression against the scene)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from magnet_jax.data import records, synthetic

SIZE = 32
NUM = dict(num_train=20, num_val=8, num_heldout=6)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The same seed with the switch off and on."""
    off = tmp_path_factory.mktemp("syn_off")
    on = tmp_path_factory.mktemp("syn_on")
    synthetic.generate(off, **NUM, image_size=SIZE, seed=0)
    synthetic.generate(on, **NUM, image_size=SIZE, seed=0, gres=True)
    return off, on


def _files(d, prefix: str = "") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name.startswith(prefix)}


def _ordinary(d) -> dict[str, bytes]:
    return {k: v for k, v in _files(d).items() if not k.startswith("gres_")}


def test_switch_leaves_the_ordinary_splits_byte_identical(dirs, tmp_path):
    off, on = dirs
    assert not _files(off, "gres_")
    assert _ordinary(on) == _files(off)  # shards and meta.json, byte for byte
    assert set(records.available_splits(on)) == set(synthetic.SPLITS + synthetic.GRES_SPLITS)
    other = tmp_path / "other_fractions"
    synthetic.generate(other, **NUM, image_size=SIZE, seed=0, gres=True,
                       gres_multi_fraction=0.5, gres_no_target_fraction=0.4)
    assert _ordinary(other) == _files(off)
    assert _files(other, "gres_train") != _files(on, "gres_train")


def test_same_seed_gives_identical_gres_bytes(dirs, tmp_path):
    _, on = dirs
    again = tmp_path / "again"
    synthetic.main(["--out", str(again), "--num-train", "20", "--num-val", "8",
                    "--num-heldout", "6", "--image-size", str(SIZE), "--seed", "0", "--gres"])
    assert _files(again) == _files(on)
    a = synthetic.make_example(4, "gres_val", 3, SIZE)
    b = synthetic.make_example(4, "gres_val", 3, SIZE)
    assert a["image_jpeg"] == b["image_jpeg"] and a["raw"] == b["raw"]
    assert synthetic.make_example(4, "val", 3, SIZE)["image_jpeg"] != a["image_jpeg"]


def test_meta_counts_and_fractions(dirs):
    _, on = dirs
    for split, n in (("gres_train", 20), ("gres_val", 8), ("gres_heldout", 6)):
        meta = records.read_meta(on, split)
        counts = meta["counts"]
        assert meta["num_records"] == counts["refs"] == n
        assert meta["gres"]["base_split"] == split[len("gres_"):]
        src = records.RecordSource(on, split)
        recs = [src[i] for i in range(n)]
        kinds = ["no_target" if r["no_target"] else
                 "multi_target" if len(r["target_ann_ids"]) > 1 else "single_target"
                 for r in recs]
        for k in synthetic.GRES_KINDS:
            assert counts[f"{k}_refs"] == kinds.count(k)
            assert counts[f"{k}_sentences"] == sum(
                len(r["sent"]) for r, kk in zip(recs, kinds) if kk == k)
        assert sum(counts[f"{k}_sentences"] for k in synthetic.GRES_KINDS) == counts["sentences"]
        assert abs(counts["multi_target_refs"] - 0.25 * n) <= 3
        assert abs(counts["no_target_refs"] - 0.15 * n) <= 3
    for mf, nf in ((0.25, 0.15), (0.5, 0.3), (0.0, 0.2)):
        kinds = [synthetic.gres_kind(i, mf, nf) for i in range(1000)]
        for n in (7, 40, 333, 1000):  # any prefix: within 3 records of n x fraction
            assert abs(kinds[:n].count("multi_target") - mf * n) <= 3
            assert abs(kinds[:n].count("no_target") - nf * n) <= 3


def test_gres_record_fields(dirs):
    _, on = dirs
    all_refs = []
    for split in synthetic.GRES_SPLITS:
        src = records.RecordSource(on, split)
        for i in range(len(src)):
            rec = src[i]
            all_refs.append(rec["ref_id"])
            n = len(rec["target_ann_ids"])
            assert len(rec["target_category_ids"]) == len(rec["target_iscrowd"]) == n
            assert rec["target_bboxes"].shape == (n, 4) and not rec["target_iscrowd"].any()
            mask = records.mask_from_count_png(rec["mask_count_png"])
            np.testing.assert_array_equal(mask, records.mask_from_count_png(
                rec["mask_count_png"], "union"))
            inst = dict(zip(rec["instance_ann_ids"].tolist(),
                            [records.count_from_png(p) for p in rec["instance_count_pngs"]]))
            cats = dict(zip(rec["instance_ann_ids"].tolist(), rec["instance_category_ids"]))
            assert rec["area"] == mask.sum()
            if rec["no_target"]:
                assert n == 0 and not mask.any() and rec["ann_id"] == rec["category_id"] == -1
                assert not rec["bbox"].any()
                continue
            assert rec["ann_id"] == rec["target_ann_ids"][0]
            assert rec["category_id"] == rec["target_category_ids"][0]
            union = np.zeros_like(mask)
            for a, c, box in zip(rec["target_ann_ids"], rec["target_category_ids"],
                                 rec["target_bboxes"]):
                m = inst[int(a)]  # the targets are instances of the record
                assert cats[int(a)] == c and m.any()
                ys, xs = np.nonzero(m)
                np.testing.assert_array_equal(
                    box, [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1])
                union |= m
            np.testing.assert_array_equal(mask, union)
    assert len(set(all_refs)) == len(all_refs)
    train = records.RecordSource(on, "train")[0]
    assert not {"no_target", "target_ann_ids"} & set(train)  # ordinary records unchanged


# ---------------------------------------------------------------------------------------------
# An independent reading of the expressions: which objects of the scene does each refer to?

_HOLDS = {"left of": lambda a, b: a["cx"] < b["cx"],
          "to the right of": lambda a, b: a["cx"] > b["cx"],
          "above": lambda a, b: a["cy"] < b["cy"],
          "below": lambda a, b: a["cy"] > b["cy"]}
_KEYS = {"left": ("cx", False), "right": ("cx", True), "top": ("cy", False),
         "bottom": ("cy", True)}
_ORDINALS = ("first", "second", "third", "fourth")
_SINGULAR = {"circles": "circle", "squares": "square", "triangles": "triangle",
             "stars": "star", "diamonds": "diamond", "crosses": "cross"}


def _group(words: list[str], objs: list[dict]) -> tuple[list[int], bool]:
    """Objects fitting "[size] [colour] shape(s)"; whether the noun is plural."""
    *adjs, noun = words
    shape = _SINGULAR.get(noun, noun)
    assert shape in synthetic.SHAPES and len(adjs) <= 2, words
    assert all(a in synthetic.SIZES or a in synthetic.COLOURS for a in adjs), words
    size = next((a for a in adjs if a in synthetic.SIZES), None)
    colour = next((a for a in adjs if a in synthetic.COLOURS), None)
    return [i for i, o in enumerate(objs) if o["shape"] == shape and colour in (None, o["colour"])
            and size in (None, o["size"])], noun != shape


def _refers_to(sentence: str, objs: list[dict]) -> set[int]:
    for phrase, holds in _HOLDS.items():
        if f" {phrase} the " in sentence:
            head, landmark = sentence.split(f" {phrase} the ")
            lands, plural = _group(landmark.split(), objs)
            assert len(lands) == 1 and not plural, sentence  # a unique landmark
            words = head.split()
            assert words[0] == "the", sentence
            group, plural = _group(words[1:], objs)
            held = {i for i in group if i != lands[0] and holds(objs[i], objs[lands[0]])}
            assert len(held) != 1 if plural else len(held) <= 1, sentence  # number agrees
            return held
    if m := re.fullmatch(r"the (first|second|third|fourth) (.+) from the (\w+)", sentence):
        group, plural = _group(m[2].split(), objs)
        key, rev = _KEYS[m[3]]
        ranked = sorted(group, key=lambda i: objs[i][key], reverse=rev)
        k = _ORDINALS.index(m[1])
        return {ranked[k]} if k < len(ranked) else set()
    if m := re.fullmatch(r"the (left|right)most (.+)", sentence):
        group, plural = _group(m[2].split(), objs)
        key, rev = _KEYS[m[1]]
        return {sorted(group, key=lambda i: objs[i][key], reverse=rev)[0]}
    if m := re.fullmatch(r"(all the|both|the two|the three) (.+)", sentence):
        group, plural = _group(m[2].split(), objs)
        assert plural, sentence
        if m[1] in ("both", "the two"):
            assert len(group) == 2, sentence
        if m[1] == "the three":
            assert len(group) == 3, sentence
        assert len(group) != 1, sentence
        return set(group)
    m = re.fullmatch(r"the (.+)", sentence)
    assert m, sentence
    group, plural = _group(m[1].split(), objs)
    assert not plural and len(group) <= 1, sentence  # a singular description names one or none
    return set(group)


def _visible(objs: list[dict]) -> list[np.ndarray]:
    full = [synthetic._rasterise(o["shape"], o["cx"], o["cy"], o["r"], SIZE) for o in objs]
    out = []
    for i, f in enumerate(full):
        later = np.zeros_like(f)
        for g in full[i + 1:]:
            later |= g
        out.append(f & ~later)
    return out


@pytest.mark.parametrize("split", synthetic.GRES_SPLITS)
def test_every_expression_refers_to_exactly_the_targets(split):
    seen = {k: 0 for k in synthetic.GRES_KINDS}
    for i in range(70):
        ex = synthetic.make_example(1, split, i, SIZE)
        syn = ex["synthetic"]
        objs, targets = syn["objects"], syn["targets"]
        kind = syn["gres_kind"]
        seen[kind] += 1
        assert kind == synthetic.gres_kind(i)
        assert 1 <= len(ex["sent"]) <= 3 and len(set(ex["sent"])) == len(ex["sent"])
        for s in ex["sent"]:
            assert _refers_to(s, objs) == set(targets), (split, i, s, objs)
        mask = records.mask_from_count_png(ex["mask_count_png"]).astype(bool)
        union = np.zeros((SIZE, SIZE), bool)
        for t in targets:
            union |= _visible(objs)[t]
        np.testing.assert_array_equal(mask, union)
        if kind == "no_target":
            assert targets == [] and not mask.any() and ex["no_target"] == 1
        elif kind == "multi_target":
            assert len(targets) >= 2 and ex["no_target"] == 0
            assert all(_visible(objs)[t].any() for t in targets)
        else:
            assert len(targets) == 1 and ex["no_target"] == 0
    assert min(seen.values()) >= 8, seen


def test_ordinary_expressions_read_the_same_way():
    """The reader agrees with the ordinary generators too (one target each)."""
    for split in synthetic.SPLITS:
        for i in range(30):
            ex = synthetic.make_example(1, split, i, SIZE)
            for s in ex["sent"]:
                assert _refers_to(s, ex["synthetic"]["objects"]) == {ex["synthetic"]["target"]}


def test_held_out_pairs_in_the_gres_splits():
    heldout_text = [f"{c} {sh}" for c, sh in synthetic.HELDOUT_PAIRS] + \
        [f"{c} {synthetic._PLURALS[sh]}" for c, sh in synthetic.HELDOUT_PAIRS]
    for split in ("gres_train", "gres_val"):
        for i in range(60):
            ex = synthetic.make_example(0, split, i, SIZE)
            pairs = {(o["colour"], o["shape"]) for o in ex["synthetic"]["objects"]}
            assert not pairs & synthetic.HELDOUT_PAIRS, (split, i)
            assert not any(h in s for s in ex["sent"] for h in heldout_text), ex["sent"]
    for i in range(60):
        ex = synthetic.make_example(0, "gres_heldout", i, SIZE)
        objs = ex["synthetic"]["objects"]
        for t in ex["synthetic"]["targets"]:
            assert (objs[t]["colour"], objs[t]["shape"]) in synthetic.HELDOUT_PAIRS
        if ex["synthetic"]["gres_kind"] != "single_target":  # the phrase names a held-out pair
            for s in ex["sent"]:
                head = s.split(" left of ")[0].split(" to the right of ")[0]
                head = head.split(" above ")[0].split(" below ")[0]
                assert any(h in head for h in heldout_text), s


def test_expression_kinds_of_the_gres_sentences():
    counts = {k: 0 for k in synthetic.EXPRESSION_KINDS}
    for i in range(80):
        ex = synthetic.make_example(0, "gres_train", i, SIZE)
        kind = ex["synthetic"]["gres_kind"]
        for raw, sent in zip(ex["raw"], ex["sent"]):
            got = synthetic.expression_kind(raw, no_target=ex["no_target"])
            assert got == synthetic.expression_kind(sent, ex["no_target"])
            counts[got] += 1
            if kind == "multi_target":
                assert got == "multi", raw
            elif kind == "no_target":
                assert got == "no_target"
            else:
                assert got in ("attribute", "ordinal", "relation"), raw
                assert synthetic.expression_kind(raw) == got
    assert min(counts.values()) > 5, counts
    assert synthetic.expression_kind("All the red circles!") == "multi"
    assert synthetic.expression_kind("both crosses, left of the star") == "multi"
    assert synthetic.expression_kind("the purple hexagon", no_target=1) == "no_target"


def test_bad_fractions_and_config_keys():
    with pytest.raises(ValueError, match="fractions"):
        synthetic.generate("/nonexistent", num_train=1, image_size=32, gres=True,
                           gres_multi_fraction=0.8, gres_no_target_fraction=0.3)
    with pytest.raises(ValueError, match="fractions"):
        synthetic.make_example(0, "gres_train", 0, SIZE, no_target_fraction=-0.1)
    from configs import magnet

    syn = magnet.get_config("synthetic").data.synthetic
    kwargs = synthetic.generate_kwargs(syn)
    assert kwargs["gres"] is False  # off by default
    assert (kwargs["gres_multi_fraction"], kwargs["gres_no_target_fraction"]) == (
        synthetic.GRES_MULTI_FRACTION, synthetic.GRES_NO_TARGET_FRACTION)
    old = {k: syn[k] for k in ("num_train", "num_val", "num_heldout", "image_size", "seed")}
    # Configs from before the keys: gres off, the generator's base style.
    assert synthetic.generate_kwargs(old) == dict(kwargs, object_scale=1.0, ordinal_rate=1.0,
                                                      max_objects=6)


def test_evaluator_sees_a_generalised_split(dirs):
    from magnet_jax.evaluation.evaluator import has_no_target_field

    _, on = dirs
    assert has_no_target_field(str(on), "gres_val")
    assert not has_no_target_field(str(on), "val")
