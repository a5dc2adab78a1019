"""Export a method's inference (MagNet, JMCELN, ...) as StableHLO (`jax.export`) for serving
without the model code.

    python -m magnet_jax.export --checkpoint DIR --out EXPORT_DIR \
        [--batch-size N] [--platforms cpu,cuda,tpu] [--image-size N] [--overwrite]

The exported function is logits = f(params, image, ids, att), the Predictor's forward:
image float32 (B, S, S, 3) normalised, ids/att int32 (B, T) -> (B, S, S) float32 pre-sigmoid
mask logits at input resolution. The params are an argument, not constants in the module
(Swin-B's are ~1.2 GB), so the artefact is the serialized module + params.npz; see
`magnet_jax.serving` for the layout and the loader (jax + numpy only).
B is symbolic unless --batch-size is given: one export serves every batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import serving
from magnet_jax.checkpoint_io import atomic_directory

# jax.export lowering targets; any of them lowers on any machine (no device needed).
EXPORT_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
EXTRA_INPUT_NOTES = {
    "instance_masks": "uint8 0/1 instance masks resized (nearest) to S x S, best first, padded "
                      "with empty masks.",
    "instance_valid": "int32 1 for a real instance, 0 for padding.",
}
IMAGE_NOTE = ("RGB, resized to S x S with PIL bilinear, /255, normalised with the ImageNet mean "
              "(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) "
              "(magnet_jax.data.images.preprocess_image)")
IDS_NOTE = ("bert-base-uncased WordPiece ids: [CLS] ... [SEP] truncated to T tokens, right-padded "
            "with 0 (magnet_jax.data.tokenizer.load_tokenizer(None).encode(text).ids)")
ATT_NOTE = "1 for kept tokens, 0 for padding (.attention_mask of the same encode)"
LOGITS_NOTE = ("pre-sigmoid mask logits at input resolution; mask = sigmoid(logits) > 0.5; "
               "resize to the original image size to draw it")
TOKENIZER_NOTE = ("uncased bert-base-uncased vocabulary, bundled as "
                  "magnet_jax/assets/bert-base-uncased-vocab.txt (any BERT WordPiece tokenizer with "
                  "that vocab, lower-casing and accent stripping gives the same ids)")


def _plain_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested plain dicts (no FrozenDict, no partitioning boxes, no {'params': ...} wrapper):
    the exported in_tree must deserialize without flax."""
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]

    def plain(node):
        return {str(k): plain(v) for k, v in node.items()} if isinstance(node, Mapping) else node

    return plain(params)


def _config_dict(model_config: Any) -> dict[str, Any]:
    if hasattr(model_config, "to_dict"):
        model_config = model_config.to_dict()
    return json.loads(json.dumps(dict(model_config)))


def logits_function(model_config, image_size: int):
    """f(params, image, ids, att, *extra) -> (B, S, S) float32 logits, as the Predictor computes
    them; extra = the method's extra inputs in Method.extra_input_specs order (none for most)."""
    from magnet_jax import methods  # pylint: disable=g-import-not-at-top
    method = methods.method_of(model_config)
    model = method.build_model(model_config)
    names = tuple(method.extra_input_specs(model_config, image_size))

    def logits(params, image, ids, att, *extra):
        return method.infer(model, params, image, ids, att, (image_size, image_size),
                            **dict(zip(names, extra)))[0]

    return logits


def export_model(model_config, params, *, batch_size: int | None = None,
                 platforms: Sequence[str] | None = None,
                 image_size: int | None = None) -> jax.export.Exported:
    """Lower the inference function to StableHLO.

    batch_size None: a symbolic batch dimension (any B at call time). platforms None: the
    current backend; lowering for others ('cpu', 'cuda', 'rocm', 'tpu') needs no such device.
    """
    image_size = int(image_size or model_config.image_size)
    if image_size <= 0 or image_size % 32:
        raise ValueError(f"image size must be a positive multiple of 32, got {image_size}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    max_tokens = int(model_config.get("max_tokens", 20))
    params = _plain_params(params)
    params_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params)
    batch = jax.export.symbolic_shape("batch")[0] if batch_size is None else int(batch_size)
    inputs_spec = (jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32),
                   jax.ShapeDtypeStruct((batch, max_tokens), jnp.int32),
                   jax.ShapeDtypeStruct((batch, max_tokens), jnp.int32))
    from magnet_jax import methods  # pylint: disable=g-import-not-at-top
    extra = methods.method_of(model_config).extra_input_specs(model_config, image_size)
    inputs_spec += tuple(jax.ShapeDtypeStruct((batch,) + tuple(shape), dtype)
                         for shape, dtype in extra.values())
    function = jax.jit(logits_function(model_config, image_size))
    platforms = tuple(platforms) if platforms else None
    unknown = sorted(set(platforms or ()) - set(EXPORT_PLATFORMS))
    if unknown:
        raise ValueError(f"unknown platform(s) {', '.join(unknown)}; known: "
                         f"{', '.join(EXPORT_PLATFORMS)}")
    return jax.export.export(function, platforms=platforms)(params_spec, *inputs_spec)


def _dims(shape) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def _metadata(exported: jax.export.Exported, model_config, num_params: int) -> dict[str, Any]:
    (_, image, ids, att, *extra), _ = jax.tree_util.tree_unflatten(exported.in_tree,
                                                                    exported.in_avals)
    (logits,) = exported.out_avals
    batch = image.shape[0]

    def spec(aval, note):
        return {"shape": _dims(aval.shape), "dtype": str(aval.dtype), "note": note}

    from magnet_jax.methods import method_of
    method = method_of(model_config)
    ids_note, tokenizer_note = method.text_notes or (IDS_NOTE, TOKENIZER_NOTE)
    names = list(method.extra_input_specs(model_config, int(image.shape[1])))
    inputs = {"image": spec(image, IMAGE_NOTE), "ids": spec(ids, ids_note),
              "att": spec(att, ATT_NOTE)}
    for name, aval in zip(names, extra):
        inputs[name] = spec(aval, EXTRA_INPUT_NOTES.get(name, "") + " Absent: "
                            + method.extra_inputs_note)

    return {
        "format": serving.FORMAT,
        "function": f"logits = f(params, {', '.join(inputs)})",
        "inputs": inputs,
        "outputs": {"logits": spec(logits, LOGITS_NOTE)},
        "batch_size": None if jax.export.is_symbolic_dim(batch) else int(batch),
        "image_size": int(image.shape[1]),
        "max_tokens": int(ids.shape[1]),
        "tokenizer": tokenizer_note,
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
        "calling_convention_version": exported.calling_convention_version,
        "num_params": num_params,
        "model": _config_dict(model_config),
    }


def save_export(directory: str | os.PathLike, exported: jax.export.Exported, params,
                model_config, overwrite: bool = False) -> str:
    """Write DIR/{model.stablehlo, params.npz, export.json, COMPLETE}; returns the absolute path.

    Written into DIR.tmp-<pid> and renamed into place (COMPLETE last), so a killed export never
    leaves a directory that looks complete.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        if not os.path.isdir(directory):
            raise serving.ExportError(f"{directory} exists and is not a directory")
        if os.listdir(directory) and not overwrite:
            raise serving.ExportError(f"{directory} exists and is not empty; pass overwrite=True "
                                      "(--overwrite) to replace it")
    leaves = jax.tree_util.tree_flatten_with_path(_plain_params(params))[0]
    arrays = {serving.param_key(path): np.asarray(jax.device_get(leaf)) for path, leaf in leaves}
    serving.check_param_arrays(exported, arrays)  # the params the module was exported for
    metadata = _metadata(exported, model_config, sum(int(a.size) for a in arrays.values()))
    blob = exported.serialize()

    with atomic_directory(directory) as tmp:
        with open(os.path.join(tmp, serving.MODEL_FILE), "wb") as f:
            f.write(blob)
        with open(os.path.join(tmp, serving.PARAMS_FILE), "wb") as f:
            np.savez(f, **arrays)
        with open(os.path.join(tmp, serving.METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, serving.COMPLETE), "w") as f:
            json.dump({"time": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
    return directory


def _megabytes(path: str) -> str:
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m magnet_jax.export",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="converted or trained checkpoint directory")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--batch-size", type=int,
                   help="fixed batch size (default: symbolic, any batch size)")
    p.add_argument("--platforms",
                   help="comma-separated: cpu, cuda, rocm, tpu (default: this machine's backend)")
    p.add_argument("--image-size", type=int, help="square input size (default: checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.platforms is not None:
        args.platforms = tuple(x.strip() for x in args.platforms.split(",") if x.strip())
        if not args.platforms:
            p.error("--platforms is empty")
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    from magnet_jax import checkpoint_io, compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.enable()
    start = time.time()
    try:
        model_config, params = checkpoint_io.load_params(args.checkpoint, expect_model=None)
        exported = export_model(model_config, params, batch_size=args.batch_size,
                                platforms=args.platforms, image_size=args.image_size)
        out = save_export(args.out, exported, params, model_config, overwrite=args.overwrite)
    except (ValueError, OSError, ImportError) as err:  # ImportError: flatbuffers (serialize)
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    with open(os.path.join(out, serving.METADATA_FILE)) as f:
        metadata = json.load(f)
    size = metadata["image_size"]
    print(f"{out}: {serving.MODEL_FILE} {_megabytes(os.path.join(out, serving.MODEL_FILE))}, "
          f"{serving.PARAMS_FILE} {_megabytes(os.path.join(out, serving.PARAMS_FILE))} "
          f"({metadata['num_params']:,} params); image {size}x{size}, "
          f"batch {metadata['batch_size'] or 'symbolic'}, "
          f"platforms {','.join(metadata['platforms'])} ({time.time() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
