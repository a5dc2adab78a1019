"""The forward benchmark runs and reports consistent figures (speed itself is not tested)."""

from __future__ import annotations

from magnet_jax.bench import bench_forward
from magnet_jax.models.presets import tiny_model_config


def test_bench_forward_reports_throughput():
    result = bench_forward(tiny_model_config(64), "tiny", batch_size=2, iters=2, seed=0)
    assert result["what"] == "forward" and result["batch_size"] == 2
    assert result["images_per_s"] > 0 and result["compile_s"] > 0
    assert abs(result["images_per_s"] - 2 / result["step_s"]) / result["images_per_s"] < 0.01
    assert result["peak_rss_gb"] > 0


def test_bench_accepts_dashed_flags():
    from absl import flags

    parsed = flags.FLAGS
    old = parsed.batch_size
    try:
        parsed["batch-size"].parse("3")
        assert parsed.batch_size == 3
    finally:
        parsed.batch_size = old
