"""MetricWriter: JSON lines round trip, TensorBoard event files, process-0 rule, bad values."""

from __future__ import annotations

import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from magnet_jax.writers import METRICS_FILE, MetricWriter, read_metrics


def _read_event_scalars(path) -> list[tuple[int, str, float]]:
    """Parse a TFRecord event file by hand (no TensorFlow/tensorboard needed)."""
    from tensorboardX.proto import event_pb2

    out = []
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12                                   # length + its masked crc32c
        event = event_pb2.Event.FromString(data[pos:pos + length])
        pos += length + 4                           # payload + its masked crc32c
        for v in event.summary.value:
            out.append((event.step, v.tag, v.simple_value))
    return out


def test_jsonl_round_trip(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False, is_writer=True) as w:
        w.write_scalars(1, {"train/loss": np.float32(0.5), "train/lr": 5e-5})
        w.write_scalars(np.int64(2), {"val/oIoU": jnp.asarray(0.75), "count": 7,
                                      "flag": np.bool_(True), "nan": float("nan")})
    rows = read_metrics(tmp_path)
    assert rows[0] == {"step": 1, "train/loss": 0.5, "train/lr": 5e-5}
    assert rows[1]["step"] == 2 and rows[1]["val/oIoU"] == 0.75 and rows[1]["count"] == 7.0
    assert isinstance(rows[1]["count"], float) and rows[1]["flag"] == 1.0
    assert math.isnan(rows[1]["nan"])
    # Appends across writers (resume keeps the earlier lines).
    with MetricWriter(tmp_path, tensorboard=False, is_writer=True) as w:
        w.write_scalars(3, {"train/loss": 0.25})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_event_file_written_and_readable(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricWriter(tmp_path, is_writer=True) as w:
        w.write_scalars(10, {"train/loss": 1.5, "val/mIoU": 0.25})
        w.write_scalars(20, {"train/loss": 0.75})
    files = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    scalars = _read_event_scalars(files[0])
    assert scalars == [(10, "train/loss", 1.5), (10, "val/mIoU", 0.25), (20, "train/loss", 0.75)]


@pytest.mark.parametrize("value", [np.zeros(3), [1.0, 2.0], "0.5", None, {"a": 1}])
def test_non_scalars_rejected_and_nothing_written(tmp_path, value):
    with MetricWriter(tmp_path, tensorboard=False, is_writer=True) as w:
        with pytest.raises(ValueError, match="metric 'bad' is not a scalar"):
            w.write_scalars(1, {"good": 1.0, "bad": value})
    assert (tmp_path / METRICS_FILE).read_text() == ""


def test_bad_step_and_reserved_key(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False, is_writer=True) as w:
        with pytest.raises(ValueError, match="step must be an integer"):
            w.write_scalars(1.5, {"x": 1.0})
        with pytest.raises(ValueError, match="reserved"):
            w.write_scalars(1, {"step": 1.0})


def test_only_process_zero_writes(tmp_path):
    with MetricWriter(tmp_path / "other", is_writer=False) as w:
        w.write_scalars(1, {"x": 1.0})
        with pytest.raises(ValueError):          # still validates on every process
            w.write_scalars(1, {"x": np.ones(2)})
    assert not (tmp_path / "other").exists()
    # Default rule: this test runs as process 0.
    with MetricWriter(tmp_path / "zero", tensorboard=False) as w:
        w.write_scalars(1, {"x": 1.0})
    assert read_metrics(tmp_path / "zero") == [{"step": 1, "x": 1.0}]


def test_write_after_close_is_an_error(tmp_path):
    w = MetricWriter(tmp_path, tensorboard=False, is_writer=True)
    w.close()
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write_scalars(1, {"x": 1.0})


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=METRICS_FILE):
        read_metrics(tmp_path)
