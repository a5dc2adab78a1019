"""Convert external weights once into magnet_jax params directories (`checkpoint_io`).

  python -m magnet_jax.convert official SRC.pth DST_DIR [--image-size N] [--overwrite]
  python -m magnet_jax.convert bert HF_DIR DST_DIR [--overwrite] [--trusted]
  python -m magnet_jax.convert swin SRC DST_DIR [--overwrite] [--trusted]

`official`: an official MagNet checkpoint (magnet_refcoco.pth, ...). The architecture is
inferred from the tensor shapes; the image size is not stored (480 for the single-dataset
checkpoints, 448 for magnet_all.pth). Every tensor is checked against jax.eval_shape of the
Linen model, and the output directory holds the full MagNet params tree. The official files
pickle an argparse.Namespace next to the weights: that class is allow-listed for
weights_only loading, and if anything else blocks it the file is loaded with
weights_only=False (the official checkpoints are treated as trusted input).
`bert`: a local Hugging Face BERT directory -> tree rooted at language_model/{embeddings,encoder}
(config name 'bert'; load with `load_params(dir, expect_model='bert')`).
`swin`: an ImageNet Swin checkpoint, Microsoft or timm layout -> tree rooted at
image_model/{patch_embed,layers_s/...} (config name 'swin').

Errors are one line on stderr ("error: ...") with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from magnet_jax import checkpoint_io
from magnet_jax.weights import common


def _log(msg: str) -> None:
    print(msg, flush=True)


_ABSTRACT_CACHE: dict[str, Any] = {}


def model_abstract_params(model_cfg) -> dict[str, Any]:
    """Unboxed abstract params (ShapeDtypeStructs) of the Linen model for `model_cfg` (memoised
    per config: tracing the full model takes seconds)."""
    key = json.dumps(model_cfg.to_dict(), sort_keys=True, default=str)
    if key not in _ABSTRACT_CACHE:
        _ABSTRACT_CACHE[key] = _model_abstract_params(model_cfg)
    return _ABSTRACT_CACHE[key]


def _model_abstract_params(model_cfg) -> dict[str, Any]:
    from magnet_jax.models import abstract_params, build_model
    return abstract_params(build_model(model_cfg), int(model_cfg.image_size),
                           int(model_cfg.max_tokens))


def _summary(kind: str, consumed: int, ignored: int, total: int, params, cfg: dict) -> None:
    _log(f"{kind}: {total} source tensors, {consumed} consumed, {ignored} ignored; "
         f"{len(common.flatten_tree(params))} Linen leaves, {common.count_params(params):,} parameters")
    _log("config: " + json.dumps(cfg, sort_keys=True))


def convert_official(src: str, dst: str, image_size: int = 480, overwrite: bool = False,
                     bert_num_heads: int | None = None, check_model: bool = True) -> str:
    from magnet_jax.weights import official_magnet  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    _log(f"reading {src}")
    sd = common.load_torch_state_dict(src, trusted=True)
    official_magnet.require_official_checkpoint(sd)
    _log(f"converting {len(sd)} tensors")
    result = official_magnet.convert_official(sd, image_size=image_size, bert_num_heads=bert_num_heads)
    cfg = result.config
    if check_model:
        _log("checking shapes against jax.eval_shape of the Linen model")
        common.check_against_abstract(result.params, model_abstract_params(cfg),
                                      what=f"converted {src}")
    _summary("official", len(result.consumed), len(result.ignored), result.num_source_keys,
             result.params, cfg.to_dict())
    _log(f"image size {image_size} (not stored in the checkpoint; set with --image-size)")
    _log("dead-key forensics: " + json.dumps(official_magnet.forensics(sd)))
    _log(f"saving to {dst}")
    out = checkpoint_io.save_params(
        dst, result.params, cfg, overwrite=overwrite,
        extra=dict(kind="official", file=os.path.abspath(src), image_size=image_size))
    _log(f"done in {time.time() - t0:.1f}s: {out}")
    return out


def _convert_pretrained(kind: str, root: str, import_fn, src: str, dst: str, overwrite: bool,
                        trusted: bool) -> str:
    """Shared flow of the pretrained-trunk importers: read, map, report, save under `root`."""
    t0 = time.time()
    _log(f"reading {src}")
    params, trunk_cfg, acc = import_fn(src, trusted=trusted, return_report=True)
    tree = {root: params}
    layout = getattr(acc, "layout", None)
    _summary(f"{kind} ({layout} layout)" if layout else kind, len(acc.consumed), len(acc.ignored),
             len(acc.sd), tree, trunk_cfg)
    _log(f"saving to {dst}")
    extra = dict(kind=kind, source=os.path.abspath(src))
    if layout:
        extra["layout"] = layout
    out = checkpoint_io.save_params(dst, tree, {"name": kind, kind: trunk_cfg}, extra=extra,
                                    overwrite=overwrite)
    _log(f"done in {time.time() - t0:.1f}s: {out}")
    return out


def convert_bert(src: str, dst: str, overwrite: bool = False, trusted: bool = False) -> str:
    """A local Hugging Face BERT directory -> params rooted at language_model/."""
    from magnet_jax.weights import bert
    return _convert_pretrained("bert", "language_model", bert.import_bert, src, dst, overwrite,
                               trusted)


def convert_swin(src: str, dst: str, overwrite: bool = False, trusted: bool = False) -> str:
    """An ImageNet Swin checkpoint (Microsoft or timm layout) -> params rooted at image_model/."""
    from magnet_jax.weights import swin
    return _convert_pretrained("swin", "image_model", swin.import_swin, src, dst, overwrite, trusted)


_TRUSTED_HELP = ("allow a .pth/.bin that pickles non-tensor objects (torch.load with "
                 "weights_only=False: runs code from the file; trusted sources only)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magnet_jax.convert",
                                description="Convert external weights into magnet_jax "
                                            "params directories.")
    sub = p.add_subparsers(dest="kind", required=True)
    o = sub.add_parser("official", help="official MagNet .pth checkpoint")
    o.add_argument("src")
    o.add_argument("dst")
    o.add_argument("--image-size", type=int, default=480,
                   help="input size the checkpoint was trained at (not stored): 480, "
                        "or 448 for magnet_all.pth")
    o.add_argument("--bert-heads", type=int, default=None,
                   help="BERT attention heads (not stored; default: 12 for a 768-wide BERT, "
                        "else hidden/64)")
    o.add_argument("--no-model-check", action="store_true",
                   help="skip the shape check against jax.eval_shape of the Linen model")
    o.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("bert", help="local Hugging Face BERT directory (config.json + weights)")
    b.add_argument("src")
    b.add_argument("dst")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--trusted", action="store_true", help=_TRUSTED_HELP)
    s = sub.add_parser("swin", help="ImageNet Swin checkpoint (Microsoft or timm layout)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--trusted", action="store_true", help=_TRUSTED_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.kind == "official":
            convert_official(args.src, args.dst, image_size=args.image_size, overwrite=args.overwrite,
                             bert_num_heads=args.bert_heads, check_model=not args.no_model_check)
        elif args.kind == "bert":
            convert_bert(args.src, args.dst, overwrite=args.overwrite, trusted=args.trusted)
        else:
            convert_swin(args.src, args.dst, overwrite=args.overwrite, trusted=args.trusted)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
