"""A random training batch of a config's objective: what `bench` times the train step on and
what the training loop traces once to find the train state's layout (training/layout.py)."""

from __future__ import annotations

import numpy as np

from magnet_jax.methods import method_of


def _smallest_vocab(node) -> int:
    """The smallest `vocab_size` in a model config (BERT's, CLIP's text tower's, ...)."""
    if not isinstance(node, dict):
        return 1 << 30
    own = node.get("vocab_size", 1 << 30)
    return min([int(own)] + [_smallest_vocab(v) for v in node.values()])


def random_train_batch(config, objective, batch_size: int, seed: int) -> dict:
    """A random training batch with the keys the objective reads (the base keys, and the
    masked-sentence keys of Mask Grounding)."""
    rng = np.random.default_rng(seed)
    size, n = config.model.image_size, config.model.max_tokens
    mask = np.zeros((batch_size, size, size), np.float32)
    mask[:, size // 4: size // 2, size // 3: 2 * size // 3] = 1
    att = (np.arange(n)[None] < rng.integers(4, n + 1, (batch_size, 1))).astype(np.int32)
    vocab = _smallest_vocab(config.model.to_dict())
    low, high = (1000, 2000) if vocab >= 2000 else (1, vocab - 1)   # ids every table holds
    ids = (rng.integers(low, high, (batch_size, n)) * att).astype(np.int32)
    ids[:, 0] = 101
    targets = np.where((rng.random((batch_size, n)) < 0.15) & (att == 1), ids, -1).astype(np.int32)
    targets[:, 0] = -1
    batch = dict(image=rng.standard_normal((batch_size, size, size, 3)).astype(np.float32),
                 mask=mask, ids=ids, att=att, weight=np.ones((batch_size,), np.float32),
                 no_target=np.zeros((batch_size,), np.int32),
                 mg_ids=np.where(targets >= 0, 103, ids).astype(np.int32), mg_targets=targets)
    for name, (shape, dtype) in method_of(config.model).extra_input_specs(
            config.model, size).items():
        # Random 0/1 masks and all-valid bits: the method's extra inputs at full use.
        batch[name] = (rng.random((batch_size,) + tuple(shape)) < 0.3).astype(dtype) \
            if len(shape) > 1 else np.ones((batch_size,) + tuple(shape), dtype)
    missing = [k for k in objective.batch_keys if k not in batch]
    if missing:
        raise ValueError(f"no random batch arrays for {', '.join(missing)}")
    return {k: batch[k] for k in objective.batch_keys}


__all__ = ["random_train_batch"]
