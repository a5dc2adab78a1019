"""End-to-end parity against tensors produced by the official MagNet code.

The official code is AGPL-3.0 and is never committed, nor is a script that runs it; its
outputs are produced outside this repository (docs/parity.md says how). Point
MAGNET_OFFICIAL_REFERENCE at a directory holding pairs NAME/ (a checkpoint converted with
`python -m magnet_jax.convert official`) and NAME.npz (the official outputs on the inputs
stored in the same file); each pair must meet the project target. Skipped when unset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REFERENCE_DIR = os.environ.get("MAGNET_OFFICIAL_REFERENCE")


def _pairs():
    if not REFERENCE_DIR:
        return []
    root = Path(REFERENCE_DIR)
    return sorted(p.stem for p in root.glob("*.npz") if (root / p.stem).is_dir())


@pytest.mark.parity
@pytest.mark.slow
@pytest.mark.skipif(not REFERENCE_DIR, reason="MAGNET_OFFICIAL_REFERENCE is not set")
@pytest.mark.parametrize("name", _pairs() or ["<none>"])
def test_logits_match_the_official_model(name):
    if name == "<none>":
        pytest.fail(f"no NAME.npz + NAME/ pairs in {REFERENCE_DIR}")
    from tools.compare_dumps import compare
    root = Path(REFERENCE_DIR)
    report = compare(str(root / name), str(root / f"{name}.npz"))
    assert report["max_abs_logit"] <= 1e-4
    assert report["min_mask_agreement"] >= 0.9999
