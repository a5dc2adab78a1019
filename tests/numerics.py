"""Error measures shared by the tests that compare against a reference implementation."""

from __future__ import annotations

import numpy as np

RTOL = 1e-5   # project target for float32 module parity (max |Δ| / max |ref|)


def rel_err(got, ref) -> float:
    """max |got − ref| / max |ref|, in float64; shapes must agree."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def check(name: str, got, ref, tol: float = RTOL) -> float:
    """Assert rel_err ≤ tol; prints the measured value (visible with pytest -s)."""
    err = rel_err(got, ref)
    print(f"{name}: rel err {err:.3e}")
    assert err <= tol, f"{name}: rel err {err:.3e} > {tol:g}"
    return err


def torch_to_numpy(t) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)
