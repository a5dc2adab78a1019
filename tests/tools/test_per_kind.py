"""tools.per_kind: per-kind oIoU / mIoU from an evaluate CSV, by hand-computed values."""

from __future__ import annotations

import csv

import pytest

from tools import per_kind


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ref_id", "sent_id", "intersection", "union", "iou", "sentence"])
        for i, (inter, union, sentence) in enumerate(rows):
            w.writerow([i, i, inter, union, f"{inter / union:.6f}", sentence])


def test_groups_by_kind_with_hand_computed_metrics(tmp_path, capsys):
    path = tmp_path / "val.csv"
    _write(path, [(30, 40, "The large green star."),
                  (10, 40, "the small red circle left of the blue square"),
                  (0, 20, "the second triangle from the right"),
                  (20, 20, "the leftmost red cross")])
    table = per_kind.per_kind(path)
    assert table["attribute"]["count"] == 1 and table["attribute"]["oIoU"] == pytest.approx(0.75)
    assert table["relation"]["mIoU"] == pytest.approx(0.25)
    assert table["ordinal"]["count"] == 2
    assert table["ordinal"]["oIoU"] == pytest.approx(20 / 40)
    assert table["ordinal"]["mIoU"] == pytest.approx(0.5)
    assert table["ordinal"]["prec50"] == pytest.approx(0.5)
    assert table["all"]["oIoU"] == pytest.approx(60 / 120)
    assert per_kind.main([str(path)]) == 0
    assert "| ordinal | 2 | 0.5000 | 0.5000 | 0.5000 |" in capsys.readouterr().out


def test_a_file_that_is_not_an_evaluate_csv(tmp_path, capsys):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    assert per_kind.main([str(path)]) == 2
    assert "is not a per-sentence CSV" in capsys.readouterr().err
