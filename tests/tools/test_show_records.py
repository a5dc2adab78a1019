"""The record viewer renders a grid of overlays and rejects bad requests clearly."""

from __future__ import annotations

import numpy as np
from PIL import Image

from magnet_jax.data.synthetic import generate
from tools import show_records


def test_show_records_renders_a_grid(tmp_path, capsys):
    generate(tmp_path / "syn", num_train=5, num_val=2, num_heldout=2, image_size=64, seed=2)
    out = tmp_path / "grid.png"
    assert show_records.main([str(tmp_path / "syn"), "--split", "train", "--out", str(out),
                              "--num", "5", "--cell", "128"]) == 0
    grid = Image.open(out)
    assert grid.width == 4 * 128 and grid.height > 2 * 128
    # The overlay paints the referred object red: some strongly red pixels exist.
    rgb = np.asarray(grid.convert("RGB")).astype(int)
    assert ((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum() > 50

    bad = show_records.main([str(tmp_path / "syn"), "--split", "train", "--out", str(out),
                             "--start", "99"])
    assert bad == 2 and "no records in train" in capsys.readouterr().err
