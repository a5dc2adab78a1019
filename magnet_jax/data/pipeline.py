"""grain input pipelines over the record shards (`data_formats.md` §7.3, `jax_stack.md` §6).

Training (`train_dataset`): records -> seeded shuffle, re-shuffled every epoch -> repeat
forever -> this process's slice `[process_index::process_count]` of the global stream (every
element goes to exactly one process) -> one sentence per ref per epoch, drawn with the
example's seeded generator (`sample="ref"`, LAVT/MagNet: epoch = number of refs; or
`sample="sentence"`: every sentence once per epoch) -> decode/resize/normalise -> per-process
batches of global_batch / process_count, remainder dropped (the stream is infinite).

Evaluation (`eval_dataset`): a flat (record, sentence) index built from meta.json's per-ref
sentence counts (no image is read to build it), padded to whole global batches with
weight-0 copies of the first sentence, in order, each global batch a contiguous block of the
index: every sentence of every ref exactly once with weight 1.

`make_iterator` turns a dataset into a checkpointable iterator (`get_state`/`set_state`, or
`grain.checkpoint.CheckpointSave/Restore` inside orbax); `to_global` turns a host batch into
global `jax.Array`s sharded over the mesh's batch axes.
"""

from __future__ import annotations

import math
import os
from typing import Any

import grain
import numpy as np

from magnet_jax.data import records
from magnet_jax.data.instances import InstanceSpec, check_split_has_instances
from magnet_jax.data.token_masking import MaskTokens
from magnet_jax.data.transforms import Augment, PickSentence, Preprocess

SAMPLES = ("ref", "sentence")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """This process's (index, count); explicit values simulate several hosts in tests."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process index/count {process_index}/{process_count}")
    return int(process_index), int(process_count)


def _per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not a positive multiple of the "
                         f"{process_count} processes")
    return global_batch // process_count


class SentenceSource:
    """Random-access (record, sentence) pairs; indices past the real ones are weight-0 padding.

    Item i < len(pairs): {record, sent_index, weight 1}; i >= len(pairs): pair 0 with weight 0.
    Picklable (the record source opens its files lazily in each process).
    """

    def __init__(self, source: records.RecordSource, length: int | None = None):
        counts = source.meta["sentence_counts"]
        self.source = source
        self.records = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self.sentences = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) \
            if counts else np.zeros((0,), np.int64)
        self.num_real = len(self.records)
        self.length = self.num_real if length is None else int(length)
        if self.length < self.num_real or (self.length and not self.num_real):
            raise ValueError(f"cannot index {self.length} items over {self.num_real} sentences")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        real = i < self.num_real
        k = i if real else 0
        return {"record": self.source[int(self.records[k])],
                    "sent_index": int(self.sentences[k]), "weight": 1.0 if real else 0.0}


def train_dataset(out_dir: str | os.PathLike, split: str = "train", *, image_size: int,
                  global_batch: int, seed: int, convention: str = "official",
                  augment: Augment | None = None, sample: str = "ref",
                  mask_tokens: MaskTokens | None = None, tokenizer: Any = None,
                  instances: InstanceSpec | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
    """Infinite training stream of per-process batches (dicts of stacked numpy arrays).

    `mask_tokens` adds the Mask Grounding inputs `mg_ids`/`mg_targets` (token_masking.py);
    `tokenizer` (a method's own, e.g. CLIP's) re-encodes each sentence instead of the stored ids.
    `instances` (MaIL) adds `instance_masks` (K, S, S) and `instance_valid` (K,); the split must
    hold them (`instances.check_split_has_instances`).
    """
    if sample not in SAMPLES:
        raise ValueError(f"unknown sample {sample!r}; expected one of {', '.join(SAMPLES)}")
    pi, pc = _process(process_index, process_count)
    batch = _per_process_batch(global_batch, pc)
    if instances is not None:
        check_split_has_instances(out_dir, split, instances)
    source = records.RecordSource(out_dir, split)
    if sample == "ref":
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)[pi::pc]
        ds = ds.random_map(PickSentence())
    else:
        ds = grain.MapDataset.source(SentenceSource(source)).seed(seed).shuffle().repeat(None)
        ds = ds[pi::pc]
    prep = Preprocess(image_size, convention, augment, tokenizer, instances)
    return examples_to_batches(ds, prep, random=augment is not None, mask_tokens=mask_tokens,
                               batch=batch)


def examples_to_batches(ds: grain.MapDataset, prep, *, random: bool,
                        mask_tokens: MaskTokens | None, batch: int) -> grain.MapDataset:
    """{record, sent_index, weight} items -> preprocessed, optionally token-masked batches.

    Shared by `train_dataset` and the dataset mixtures (mixture.py); `random`: `prep` takes the
    element's rng (augmentation)."""
    ds = ds.random_map(prep) if random else ds.map(prep)
    if mask_tokens is not None:
        # Seeded per element index of the repeated stream: deterministic per (seed, epoch, example).
        ds = ds.random_map(mask_tokens)
    return ds.batch(batch, drop_remainder=True)


def eval_num_batches(num_sentences: int, global_batch: int) -> int:
    return math.ceil(num_sentences / global_batch)


def eval_dataset(out_dir: str | os.PathLike, split: str, *, image_size: int, global_batch: int,
                 convention: str = "official", tokenizer: Any = None,
                 instances: InstanceSpec | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
    """Finite evaluation batches: every sentence once, the last global batch padded (weight 0).

    `instances` as for `train_dataset`."""
    pi, pc = _process(process_index, process_count)
    batch = _per_process_batch(global_batch, pc)
    if instances is not None:
        check_split_has_instances(out_dir, split, instances)
    source = records.RecordSource(out_dir, split)
    num = int(sum(source.meta["sentence_counts"]))
    if num == 0:
        raise ValueError(f"split {split!r} in {out_dir} has no sentences")
    padded = eval_num_batches(num, global_batch) * global_batch
    ds = grain.MapDataset.source(SentenceSource(source, padded))[pi::pc]
    return ds.map(Preprocess(image_size, convention, None, tokenizer, instances)).batch(
        batch, drop_remainder=True)


def make_iterator(ds: grain.MapDataset, num_workers: int = 0, *, read_threads: int = 2,
                  prefetch_buffer: int = 8, worker_buffer: int = 2) -> grain.DatasetIterator:
    """A checkpointable iterator; worker processes decode when num_workers > 0.

    With workers, call `it.close()` when done (`jax_stack.md` §6.3); the caller must run under
    `absl.app.run` (or mark absl flags parsed) and behind an `if __name__ == "__main__"` guard.
    """
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=prefetch_buffer))
    if num_workers > 0:
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=worker_buffer))
    return iter(it_ds)


def to_global(batch: dict[str, np.ndarray], mesh) -> dict[str, Any]:
    """Host batch -> global jax.Arrays, batch dimension sharded over the mesh's batch axes."""
    import jax

    from magnet_jax.sharding import batch_sharding

    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
