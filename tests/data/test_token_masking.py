"""Mask Grounding token masking: statistics, special tokens, min_selected, pipeline resume."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from magnet_jax.data import pipeline, synthetic
from magnet_jax.data.token_masking import FIRST_RANDOM_ID, SPECIAL_IDS, MaskTokens

L = 20


def _corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] w... [SEP] [PAD]...; some [UNK]/[MASK] inside, some truncated (no [SEP])."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, L), np.int32)
    att = np.zeros((n, L), np.int32)
    for i in range(n):
        k = int(rng.integers(1, L + 1))          # real tokens incl. [CLS] (and [SEP] if fits)
        words = rng.integers(999, 30522, size=k)
        words[rng.random(k) < 0.05] = 100        # [UNK]
        words[rng.random(k) < 0.02] = 103        # a literal [MASK] in the input
        row = np.concatenate([[101], words, [102]])[:L]
        ids[i, :len(row)] = row
        att[i, :len(row)] = 1
    return ids, att


def _run(masker: MaskTokens, ids: np.ndarray, att: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = [masker({"ids": i, "att": a}, rng) for i, a in zip(ids, att)]
    return (np.stack([o["mg_ids"] for o in out]), np.stack([o["mg_targets"] for o in out]), out)


def test_statistics_on_a_large_corpus():
    ids, att = _corpus(20000)
    mg_ids, targets, out = _run(MaskTokens(), ids, att)
    eligible = ~np.isin(ids, SPECIAL_IDS) & (att == 1)
    selected = targets != -1
    rate = selected.sum() / eligible.sum()
    assert abs(rate - 0.15) < 0.005, rate
    masked = (mg_ids == 103) & selected
    assert abs(masked.sum() / selected.sum() - 0.9) < 0.01
    # The rest of the selected tokens are kept unchanged (p_random = 0).
    np.testing.assert_array_equal(mg_ids[selected & ~masked], ids[selected & ~masked])
    np.testing.assert_array_equal(targets[selected], ids[selected])
    np.testing.assert_array_equal(mg_ids[~selected], ids[~selected])
    assert mg_ids.dtype == np.int32 and targets.dtype == np.int32 and mg_ids.shape == (20000, L)
    # `ids` unchanged in the returned example.
    np.testing.assert_array_equal(np.stack([o["ids"] for o in out]), ids)


def test_random_replacement_in_range():
    ids, att = _corpus(5000, seed=1)
    mg_ids, targets, _ = _run(MaskTokens(p_select=0.4, p_mask=0.5, p_random=0.4), ids, att)
    selected = targets != -1
    masked = selected & (mg_ids == 103)
    changed = selected & ~masked & (mg_ids != ids)
    assert abs(masked.sum() / selected.sum() - 0.5) < 0.02
    # Random draws rarely hit the original id, so about 40 % are changed.
    assert abs(changed.sum() / selected.sum() - 0.4) < 0.02
    assert mg_ids[changed].min() >= FIRST_RANDOM_ID and mg_ids[changed].max() <= 30521


def test_special_tokens_never_selected():
    ids, att = _corpus(3000, seed=2)
    mg_ids, targets, _ = _run(MaskTokens(p_select=1.0, p_mask=0.5, p_random=0.5), ids, att)
    special = np.isin(ids, SPECIAL_IDS)
    assert (targets[special] == -1).all()
    np.testing.assert_array_equal(mg_ids[special], ids[special])
    assert (targets[~special & (att == 1)] != -1).all()      # p_select = 1 selects all others


def test_min_selected_forces_one_when_possible():
    ids, att = _corpus(3000, seed=3)
    ids[0] = [101, 102] + [0] * (L - 2)                 # no eligible token at all
    att[0] = [1, 1] + [0] * (L - 2)
    _, plain, _ = _run(MaskTokens(), ids, att)
    mg_ids, targets, _ = _run(MaskTokens(min_selected=1), ids, att)
    has_eligible = (~np.isin(ids, SPECIAL_IDS) & (att == 1)).any(1)
    assert ((plain != -1).sum(1)[has_eligible] == 0).any()   # the case exists without the switch
    assert ((targets != -1).sum(1)[has_eligible] >= 1).all()
    assert (targets[0] == -1).all() and np.array_equal(mg_ids[0], ids[0])
    # Forced tokens still follow p_mask (roughly 90 % [MASK]).
    sel = targets != -1
    assert 0.85 < ((mg_ids == 103) & sel).sum() / sel.sum() < 0.95


def test_deterministic_given_the_generator_and_picklable():
    ids, att = _corpus(50, seed=4)
    a = _run(MaskTokens(p_random=0.1), ids, att, seed=7)
    b = _run(pickle.loads(pickle.dumps(MaskTokens(p_random=0.1))), ids, att, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("kw", [dict(p_select=1.5), dict(p_mask=0.8, p_random=0.3),
                                dict(min_selected=-1), dict(vocab_size=500)])
def test_bad_settings_rejected(kw):
    with pytest.raises(ValueError):
        MaskTokens(**kw)


def test_missing_fields_rejected():
    with pytest.raises(ValueError, match="'ids' and 'att'"):
        MaskTokens()({"image": 0}, np.random.default_rng(0))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_mg")
    synthetic.generate(out, num_train=16, num_val=4, num_heldout=2, image_size=32, seed=0,
                       num_shards=1)
    return out


def _train(data_dir, seed=0):
    return pipeline.train_dataset(data_dir, "train", image_size=16, global_batch=4, seed=seed,
                                  mask_tokens=MaskTokens(p_select=0.5, p_random=0.1),
                                  process_index=0, process_count=1)


def test_pipeline_masks_deterministically_and_resumes(data_dir):
    ds = _train(data_dir)
    b0 = ds[0]
    assert b0["mg_ids"].shape == (4, L) and b0["mg_targets"].dtype == np.int32
    sel = b0["mg_targets"] != -1
    assert sel.any()
    np.testing.assert_array_equal(b0["mg_targets"][sel], b0["ids"][sel])
    np.testing.assert_array_equal(_train(data_dir)[0]["mg_ids"], b0["mg_ids"])
    # Each epoch (4 batches of 4 over 16 refs) draws fresh masks for the same sentence.
    def by_sentence(batches):
        return {(int(r), int(s)): t for b in batches
                for r, s, t in zip(b["ref_id"], b["sent_id"], b["mg_targets"])}
    e0, e1 = by_sentence(ds[i] for i in range(4)), by_sentence(ds[i] for i in range(4, 8))
    common = [k for k in e0 if k in e1]
    assert common and any(not np.array_equal(e0[k], e1[k]) for k in common)

    it = pipeline.make_iterator(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = pipeline.make_iterator(_train(data_dir))
    it2.set_state(state)
    for w in want:
        got = next(it2)
        for k in ("ids", "mg_ids", "mg_targets", "ref_id"):
            np.testing.assert_array_equal(got[k], w[k])
