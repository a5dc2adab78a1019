"""oIoU, mIoU and prec@0.5 per expression kind of the synthetic data, from evaluate's CSVs.

    python -m tools.per_kind REPORT.csv [REPORT.csv ...]

Each CSV is the per-sentence file `python -m magnet_jax.evaluate` writes beside its JSON
report (intersection, union, iou, sentence). The kind (attribute, ordinal, relation) is read
from the sentence (magnet_jax.data.synthetic.expression_kind). One markdown row per CSV and kind.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from magnet_jax.data.synthetic import EXPRESSION_KINDS, expression_kind


def per_kind(path: str | Path) -> dict[str, dict[str, float]]:
    """kind (and "all") -> count, oIoU (ΣI / ΣU), mIoU (mean IoU), prec@0.5."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"intersection", "union", "iou", "sentence"} <= set(rows[0]):
        raise ValueError(f"{path} is not a per-sentence CSV of magnet_jax.evaluate")
    groups: dict[str, list[dict]] = {"all": rows}
    for row in rows:
        groups.setdefault(expression_kind(row["sentence"]), []).append(row)
    out = {}
    for kind in ("all",) + EXPRESSION_KINDS:
        group = groups.get(kind, [])
        if not group:
            continue
        inter = sum(int(r["intersection"]) for r in group)
        union = sum(int(r["union"]) for r in group)
        ious = [float(r["iou"]) for r in group]
        out[kind] = dict(count=len(group), oIoU=inter / union if union else 0.0,
                         mIoU=sum(ious) / len(ious),
                         prec50=sum(i >= 0.5 for i in ious) / len(ious))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="per-sentence CSVs of magnet_jax.evaluate")
    args = parser.parse_args(argv)
    print("| csv | kind | sentences | oIoU | mIoU | prec@0.5 |")
    print("|---|---|---|---|---|---|")
    for path in args.csv:
        try:
            table = per_kind(path)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for kind, m in table.items():
            print(f"| {path} | {kind} | {m['count']} | {m['oIoU']:.4f} | {m['mIoU']:.4f} | "
                  f"{m['prec50']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
