"""Evaluate a checkpoint: `python -m magnet_jax.evaluate --checkpoint DIR --data DIR --split SPLIT
[--protocol {magnet,original}] [--out report.json] [--save-overlays N] [--step latest|best|N]
[--batch-size N] [--fsdp K] [--distributed]`.

--checkpoint is a training workdir (orbax train state of a step: latest, best by val/oIoU, or
a number), one step directory, or a params directory (converted official weights,
WORKDIR/params). The parameters are restored onto this run's devices (any count; `--fsdp K`
shards them over K devices). Every sentence of the split is evaluated once. Printed: a table
of oIoU, mIoU, precision@0.5-0.9 and the expression count; written: a JSON report with the
protocol description (default WORKDIR_OR_CHECKPOINT/eval/<split>-<protocol>.json) and a
per-expression CSV beside it (ref_id, sent_id, I, U, IoU, sentence), both only once the
evaluation has finished, each written under a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROTOCOL_TEXT = {
    "magnet": "official MagNet evaluation: stride-4 mask logits -> bilinear (align_corners=True) "
              "to the square input; ground truth resized to the input with nearest neighbour; "
              "foreground where sigmoid > 0.5",
    "original": "stride-4 mask logits -> bilinear (align_corners=True) to the original image "
                "size; ground truth at its native resolution; foreground where sigmoid > 0.5",
}
METRIC_ORDER = ("oIoU", "mIoU", "prec@0.5", "prec@0.6", "prec@0.7", "prec@0.8", "prec@0.9")


class EvaluateError(ValueError):
    """Bad input to the evaluation; reported as one line."""


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m magnet_jax.evaluate",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="training workdir, one of its step directories, or a params directory")
    p.add_argument("--data", help="converted records directory (default: the run's data)")
    p.add_argument("--split", default="val", help="split to evaluate (default val)")
    p.add_argument("--protocol", default="magnet", choices=("magnet", "original"))
    p.add_argument("--out", help="JSON report path (the CSV goes beside it)")
    p.add_argument("--save-overlays", type=int, default=0, metavar="N",
                   help="write overlays of the first N expressions")
    p.add_argument("--step", help="latest (default), best, or a step number (training workdirs)")
    p.add_argument("--batch-size", type=int, help="global batch (default 8, rounded up to a "
                   "multiple of the device count)")
    p.add_argument("--fsdp", type=int, default=1, help="devices the parameters are sharded over")
    p.add_argument("--convention", choices=("official", "union"),
                   help="ground-truth mask convention (default: the run's, else official)")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host runs)")
    return p.parse_args(argv)


def _data_dir(args, loaded) -> str:
    if args.data:
        return args.data
    run = loaded.run_config or {}
    if run.get("data", {}).get("dir"):
        return run["data"]["dir"]
    if loaded.kind == "train_state":   # synthetic runs keep their data in the workdir
        workdir = Path(loaded.path).parent.parent
        if (workdir / "synthetic_data").is_dir():
            return str(workdir / "synthetic_data")
    raise EvaluateError("--data is required: the checkpoint does not name its data directory")


def _check_split(data_dir: str, split: str) -> None:
    from magnet_jax.data import records

    if not Path(data_dir).is_dir():
        raise EvaluateError(f"data directory {data_dir} does not exist")
    splits = records.available_splits(data_dir)
    if not splits:
        raise EvaluateError(f"{data_dir} holds no converted split (python -m magnet_jax.data.convert)")
    if split not in splits:
        raise EvaluateError(f"split {split!r} is not in {data_dir} (available: {', '.join(splits)})")


def _default_out(loaded, split: str, protocol: str) -> Path:
    base = Path(loaded.path)
    if loaded.kind == "train_state":
        return base.parent.parent / "eval" / f"step{loaded.step}-{split}-{protocol}.json"
    return base / "eval" / f"{split}-{protocol}.json"


def _batch_size(requested: int | None, num_devices: int) -> int:
    if requested is None:
        return num_devices * math.ceil(8 / num_devices)
    if requested < 1 or requested % num_devices:
        raise EvaluateError(f"--batch-size {requested} is not a positive multiple of the "
                            f"{num_devices} devices")
    return requested


def _sentences(data_dir: str, split: str, rows) -> list[str]:
    """The raw sentence of every row (for the CSV); rows of one ref are consecutive."""
    from magnet_jax.evaluation.evaluator import RecordsByRef

    by_ref = RecordsByRef(data_dir, split)
    out, cache = [], {}
    for ref_id, sent_id in zip(rows["ref_id"], rows["sent_id"]):
        if ref_id not in cache:
            rec = by_ref(ref_id)
            cache = {ref_id: dict(zip((int(s) for s in rec["sent_ids"]), rec["raw"]))}
        out.append(cache[ref_id].get(int(sent_id), ""))
    return out


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: Path, rows, sentences: list[str]) -> None:
    from magnet_jax.evaluation.metrics import iou

    ious = iou(rows["intersection"], rows["union"])

    def write(f):
        w = csv.writer(f)
        w.writerow(["ref_id", "sent_id", "intersection", "union", "iou", "sentence"])
        for k in range(len(ious)):
            w.writerow([int(rows["ref_id"][k]), int(rows["sent_id"][k]),
                        int(rows["intersection"][k]), int(rows["union"][k]),
                        f"{ious[k]:.6f}", sentences[k]])
    _write_atomic(path, write)


def format_table(metrics: dict, title: str) -> str:
    header = " | ".join(f"{k:>8}" for k in METRIC_ORDER + ("count",))
    values = " | ".join([f"{100 * metrics[k]:8.2f}" for k in METRIC_ORDER] +
                        [f"{metrics['count']:8d}"])
    return f"{title}\n{header}\n{'-' * len(header)}\n{values}"


def evaluate(args) -> dict:
    import jax

    from magnet_jax import restore, sharding
    from magnet_jax.data import records
    from magnet_jax.evaluation.evaluator import evaluate_split, make_eval_step
    from magnet_jax.methods import method_of

    n = jax.device_count()
    if args.fsdp < 1 or n % args.fsdp:
        raise EvaluateError(f"--fsdp {args.fsdp} does not divide the {n} devices")
    batch = _batch_size(args.batch_size, n)
    mesh = sharding.make_mesh(n // args.fsdp, args.fsdp)
    step = args.step if args.step in (None, "latest", "best") else _int(args.step, "--step")
    loaded = restore.load_model(args.checkpoint, mesh, step=step)
    data_dir = _data_dir(args, loaded)
    _check_split(data_dir, args.split)
    run = loaded.run_config or {}
    convention = args.convention or run.get("data", {}).get("convention", "official")
    out = Path(args.out) if args.out else _default_out(loaded, args.split, args.protocol)

    method = method_of(loaded.config)
    model = method.build_model(loaded.config)
    params_sharding = jax.tree.map(lambda a: a.sharding, loaded.params)
    extra_keys = tuple(method.extra_input_specs(loaded.config, int(loaded.config.image_size)))
    eval_step = make_eval_step(method, model, params_sharding, mesh, extra_keys)
    start = time.time()
    result = evaluate_split(
        eval_step, loaded.params, data_dir, args.split, image_size=int(loaded.config.image_size),
        global_batch=batch, mesh=mesh, convention=convention, protocol=args.protocol,
        num_overlays=args.save_overlays, overlay_dir=out.with_suffix("").with_name(
            out.stem + "-overlays"), collect_rows=True, progress=True,
        tokenizer=method.text_tokenizer(loaded.config),
        data_kwargs=method.data_kwargs(loaded.config), extra_keys=extra_keys)
    seconds = time.time() - start
    meta = records.read_meta(data_dir, args.split)
    report = {
        "protocol": args.protocol,
        "protocol_description": PROTOCOL_TEXT[args.protocol],
        "gt_convention": convention,
        "threshold": float(loaded.config.get("mask_threshold", 0.5)),
        # The method's own inputs from the records (e.g. MaIL's instance source): traceable.
        "data_options": {k: repr(v) for k, v in method.data_kwargs(loaded.config).items()},
        "image_size": int(loaded.config.image_size),
        "split_rule": "every sentence of every ref of the split, once",
        "data": str(Path(data_dir).absolute()),
        "dataset": meta.get("dataset"), "partition": meta.get("split_by"), "split": args.split,
        "num_refs": int(meta.get("num_records", len(meta.get("ref_ids", [])))),
        "num_sentences": int(result.metrics["count"]),
        "num_empty_union": int(result.metrics["num_empty_union"]),
        "method": str(loaded.config.name),
        "checkpoint": loaded.path, "checkpoint_kind": loaded.kind, "step": loaded.step,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
        "devices": n, "processes": jax.process_count(), "platform": jax.devices()[0].platform,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "batch_size": batch,
        "jax_version": jax.__version__, "seconds": round(seconds, 2),
        "metrics": {k: result.metrics[k] for k in METRIC_ORDER + ("count",)},
        "csv": str(out.with_suffix(".csv").absolute()),
    }
    if jax.process_index() == 0:
        write_csv(out.with_suffix(".csv"), result.rows,
                  _sentences(data_dir, args.split, result.rows))
        _write_atomic(out, lambda f: json.dump(report, f, indent=2))
        report["report"] = str(out.absolute())
    return report


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise EvaluateError(f"{flag} must be latest, best or a step number, got {text!r}") from None


def main(argv=None) -> int:
    args = _parse(argv)
    from magnet_jax import compilation_cache
    compilation_cache.enable()
    if args.distributed:
        import jax
        jax.distributed.initialize()
    logging.getLogger("absl").setLevel(logging.ERROR)   # orbax's read-only manager notices
    from magnet_jax.checkpoint_io import CheckpointError
    from magnet_jax.restore import RestoreError
    try:
        report = evaluate(args)
    except (EvaluateError, RestoreError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax
    if jax.process_index() == 0:
        step = f" step {report['step']}" if report["step"] is not None else ""
        title = (f"{report['dataset']} {report['split']} ({report['protocol']} protocol), "
                 f"{report['checkpoint']}{step}, {report['seconds']:.0f} s")
        print(format_table(report["metrics"], title))
        print(f"report {report['report']}\nper expression {report['csv']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
