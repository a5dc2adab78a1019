"""BERT-style token masking for the Mask Grounding task (`training_objectives.md` §3.2).

`MaskTokens` is a grain `random_map` over the examples of `transforms.Preprocess`. It runs on
the host with the example's seeded generator, so the masking is deterministic per
(seed, epoch, example) and is restored exactly with the iterator state. It adds

    mg_ids      int32 (L,)  `ids` with the selected tokens replaced ([MASK], random or kept)
    mg_targets  int32 (L,)  the original id at selected positions, -1 elsewhere (ignored)

and leaves `ids` untouched for the segmentation path. Masking happens after truncation to
20 tokens, so a sentence may have lost its [SEP]; that does not matter here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# bert-base-uncased: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103. Never selected.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
SPECIAL_IDS = (PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID)
# Ids 1-99 and 104-998 are [unusedN]; random replacements come from the real word pieces.
FIRST_RANDOM_ID = 999
IGNORE_TARGET = -1


@dataclasses.dataclass(frozen=True)
class MaskTokens:
    """random_map: example with `ids`/`att` -> the same example plus `mg_ids`, `mg_targets`.

    For each eligible token (not special, attention 1) draw u ~ U(0, 1); u < p_select selects
    it, and with u' = u / p_select: u' < p_mask -> [MASK], u' < p_mask + p_random -> a random
    id in [999, vocab_size), else unchanged. `min_selected` tops the selection up with the
    eligible tokens of smallest u (each forced token draws its own fresh u') when a sentence
    would otherwise have fewer selected tokens.
    """

    p_select: float = 0.15
    p_mask: float = 0.9
    p_random: float = 0.0
    min_selected: int = 0
    vocab_size: int = 30522
    mask_id: int = MASK_ID

    def __post_init__(self):
        if not 0.0 <= self.p_select <= 1.0:
            raise ValueError(f"p_select must be in [0, 1], got {self.p_select}")
        if self.p_mask < 0 or self.p_random < 0 or self.p_mask + self.p_random > 1.0 + 1e-9:
            raise ValueError(f"p_mask and p_random must be >= 0 with sum <= 1, got "
                             f"{self.p_mask} and {self.p_random}")
        if self.min_selected < 0:
            raise ValueError(f"min_selected must be >= 0, got {self.min_selected}")
        if self.vocab_size <= FIRST_RANDOM_ID:
            raise ValueError(f"vocab_size must exceed {FIRST_RANDOM_ID}, got {self.vocab_size}")

    def mask(self, ids: np.ndarray, att: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(mg_ids, mg_targets) for one sentence; `ids` is not modified."""
        ids = np.asarray(ids, np.int32)
        n = ids.shape[0]
        # Fixed-size draws every call, so the generator's use does not depend on the sentence.
        u = rng.random(n)
        fresh = rng.random(n)
        random_ids = rng.integers(FIRST_RANDOM_ID, self.vocab_size, size=n, dtype=np.int64)

        eligible = ~np.isin(ids, SPECIAL_IDS) & (np.asarray(att) != 0)
        selected = eligible & (u < self.p_select)
        # u / p_select is uniform on [0, 1) given selection (spec §3.2).
        action = np.where(selected, u / max(self.p_select, 1e-12), 1.0)

        shortfall = self.min_selected - int(selected.sum())
        if shortfall > 0:
            candidates = np.flatnonzero(eligible & ~selected)
            forced = candidates[np.argsort(u[candidates], kind="stable")[:shortfall]]
            selected[forced] = True
            # u of a forced token is >= p_select, so u' would always mean "keep": redraw it.
            action[forced] = fresh[forced]

        mg_ids = ids.copy()
        to_mask = selected & (action < self.p_mask)
        to_random = selected & ~to_mask & (action < self.p_mask + self.p_random)
        mg_ids[to_mask] = self.mask_id
        mg_ids[to_random] = random_ids[to_random]
        targets = np.where(selected, ids, IGNORE_TARGET).astype(np.int32)
        return mg_ids.astype(np.int32), targets

    def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        if "ids" not in example or "att" not in example:
            raise ValueError("MaskTokens needs an example with 'ids' and 'att' "
                             f"(got keys {sorted(example)})")
        mg_ids, targets = self.mask(example["ids"], example["att"], rng)
        return {**example, "mg_ids": mg_ids, "mg_targets": targets}
