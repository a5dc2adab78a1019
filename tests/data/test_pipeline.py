"""grain pipelines: determinism, epochs, resume, process sharding, eval coverage, global arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from magnet_jax.data import pipeline, records, synthetic
from magnet_jax.sharding import make_mesh

SIZE = 32
NUM_TRAIN = 48


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, num_train=NUM_TRAIN, num_val=13, num_heldout=4, image_size=64, seed=0,
                       num_shards=4)
    return out


def _train(data_dir, seed=0, batch=8, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.train_dataset(data_dir, "train", image_size=SIZE, global_batch=batch,
                                  seed=seed, **kw)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches(data_dir):
    a, b, c = _train(data_dir, 0), _train(data_dir, 0), _train(data_dir, 1)
    for i in range(3):
        assert _equal(a[i], b[i])
    assert not np.array_equal(a[0]["ref_id"], c[0]["ref_id"])
    assert a[0]["image"].shape == (8, SIZE, SIZE, 3) and a[0]["weight"].tolist() == [1.0] * 8


def test_epochs_visit_every_ref_once_in_new_orders(data_dir):
    ds = _train(data_dir)
    per_epoch = NUM_TRAIN // 8
    epochs = [np.concatenate([ds[e * per_epoch + i]["ref_id"] for i in range(per_epoch)])
              for e in range(3)]
    all_refs = sorted(records.read_meta(data_dir, "train")["ref_ids"])
    for ids in epochs:
        assert sorted(ids.tolist()) == all_refs
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_sentence_sampling_varies_across_epochs(data_dir):
    ds = _train(data_dir)
    per_epoch = NUM_TRAIN // 8
    picks: dict[int, set] = {}
    for i in range(per_epoch * 6):
        b = ds[i]
        for r, s in zip(b["ref_id"].tolist(), b["sent_id"].tolist()):
            picks.setdefault(r, set()).add(s)
    counts = dict(zip(records.read_meta(data_dir, "train")["ref_ids"],
                      records.read_meta(data_dir, "train")["sentence_counts"]))
    multi = [r for r, n in counts.items() if n > 1]
    assert multi and sum(len(picks[r]) > 1 for r in multi) >= len(multi) // 2


def test_sample_sentence_mode_covers_every_sentence(data_dir):
    ds = _train(data_dir, sample="sentence", batch=4)
    total = sum(records.read_meta(data_dir, "train")["sentence_counts"])
    seen = np.concatenate([ds[i]["sent_id"] for i in range(total // 4)])
    assert len(set(seen.tolist())) == len(seen) == total // 4 * 4


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_resumes_exactly(data_dir, workers):
    ds = _train(data_dir, augment=pipeline.Augment())
    it = pipeline.make_iterator(ds, workers)
    try:
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(2)]
    finally:
        if workers:
            it.close()
    it2 = pipeline.make_iterator(_train(data_dir, augment=pipeline.Augment()), workers)
    try:
        it2.set_state(state)
        got = [next(it2) for _ in range(2)]
    finally:
        if workers:
            it2.close()
    assert all(_equal(e, g) for e, g in zip(expected, got))
    assert _equal(expected[0], ds[3])  # iterators follow the MapDataset's order


def test_process_sharding_without_overlap_or_loss(data_dir):
    per_process = NUM_TRAIN // 8  # batches of 4 per process, global batch 8
    shards = []
    for pi in range(2):
        ds = _train(data_dir, process_index=pi, process_count=2)
        ids = np.concatenate([ds[i]["ref_id"] for i in range(per_process)])
        assert ds[0]["ref_id"].shape == (4,)
        shards.append(set(ids.tolist()))
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(records.read_meta(data_dir, "train")["ref_ids"])
    with pytest.raises(ValueError, match="multiple"):
        _train(data_dir, batch=7, process_index=0, process_count=2)


def test_eval_covers_every_sentence_once_with_padding(data_dir):
    src = records.RecordSource(data_dir, "val")
    want = {(src[i]["ref_id"], int(s)) for i in range(len(src)) for s in src[i]["sent_ids"]}
    batch = 8
    n_batches = pipeline.eval_num_batches(len(want), batch)
    real, pads = [], 0
    for pi in range(2):
        ds = pipeline.eval_dataset(data_dir, "val", image_size=SIZE, global_batch=batch,
                                   process_index=pi, process_count=2)
        assert len(ds) == n_batches
        for b in ds:
            w = b["weight"]
            real += list(zip(b["ref_id"][w == 1].tolist(), b["sent_id"][w == 1].tolist()))
            pads += int((w == 0).sum())
    assert len(real) == len(set(real)) and set(real) == want
    assert pads == n_batches * batch - len(want) > 0
    # Padding only in the last global batch.
    ds = pipeline.eval_dataset(data_dir, "val", image_size=SIZE, global_batch=batch,
                               process_index=0, process_count=1)
    assert all(ds[i]["weight"].min() == 1 for i in range(n_batches - 1))


def test_global_arrays_on_the_mesh(data_dir):
    mesh = make_mesh()
    assert mesh.devices.size == 8
    host = _train(data_dir, batch=16)[0]
    batch = pipeline.to_global(host, mesh)
    for k, v in batch.items():
        assert isinstance(v, jax.Array) and v.shape == host[k].shape
        assert len(v.addressable_shards) == 8
        assert v.addressable_shards[0].data.shape[0] == 2
        np.testing.assert_array_equal(np.asarray(v), host[k])


def test_iterator_state_through_orbax(data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = pipeline.make_iterator(_train(data_dir), 0)
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = next(it)
    fresh = pipeline.make_iterator(_train(data_dir), 0)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(2, args=ocp.args.Composite(
            data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert _equal(next(fresh), expected)
