"""Metric writing without TensorFlow: JSON lines plus TensorBoard event files (process 0 only).

`clu.metric_writers` imports TensorFlow (`jax_stack.md` §1), so magnet_jax writes

    WORKDIR/metrics.jsonl     one object per `write_scalars` call: {"step": int, "key": float, ...}
    WORKDIR/events.out.tfevents.*   the same scalars through tensorboardX (protobuf + numpy only)

Only process 0 writes; on the other processes every method is a no-op, so callers need no
`if jax.process_index() == 0` of their own. Lines are flushed per call so an interrupted run
keeps every logged step. Non-finite values are written as JSON's NaN / Infinity extensions
(Python's json reads them back); they are kept rather than dropped so a diverging run is visible.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"

_log = logging.getLogger(__name__)


def _scalar(key: str, value: Any) -> float:
    """A Python float from a number, numpy/jax scalar or 0-d/size-1 array; else a clear error."""
    if isinstance(value, (str, bytes)) or value is None:
        raise ValueError(f"metric {key!r} is not a scalar number: {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except Exception as e:  # anything numpy cannot read is not a scalar
        raise ValueError(f"metric {key!r} is not a scalar number: {type(value).__name__}") from e
    if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"metric {key!r} is not a scalar number: shape {arr.shape}, "
                         f"dtype {arr.dtype}")
    return float(arr)


class MetricWriter:
    """`write_scalars(step, {name: value})` to metrics.jsonl and TensorBoard; close() at the end.

    tensorboard=False (or tensorboardX not installed, with a warning) writes JSON lines only.
    `is_writer` overrides the process-0 rule (tests, tools).
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
                 is_writer: bool | None = None):
        if is_writer is None:
            import jax

            is_writer = jax.process_index() == 0
        self.workdir = Path(workdir)
        self.is_writer = bool(is_writer)
        self._jsonl = None
        self._tb = None
        if not self.is_writer:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                _log.warning("tensorboardX is not installed; writing %s only", METRICS_FILE)
            else:
                self._tb = SummaryWriter(logdir=str(self.workdir), flush_secs=30)

    @property
    def metrics_path(self) -> Path:
        return self.workdir / METRICS_FILE

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write one JSON line and one TensorBoard scalar per key; all values must be scalars."""
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            step = _scalar("step", step)
            if not step.is_integer():
                raise ValueError(f"step must be an integer, got {step}")
        step = int(step)
        # Validate everything before writing anything: no half-written record.
        values = {str(k): _scalar(str(k), v) for k, v in scalars.items()}
        if "step" in values:
            raise ValueError("metric name 'step' is reserved for the step number")
        if not self.is_writer:
            return
        if self._jsonl is None:
            raise ValueError(f"MetricWriter for {self.workdir} is closed")
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=step)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close; safe to call twice."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of WORKDIR/metrics.jsonl, in order (for tools and tests)."""
    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {workdir}")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


__all__ = ["METRICS_FILE", "MetricWriter", "read_metrics"]
