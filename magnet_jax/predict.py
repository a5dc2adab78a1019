"""Predict referring masks: the `Predictor` API and `python -m magnet_jax.predict`.

    python -m magnet_jax.predict --checkpoint DIR --image IMG --text "the man on the left" \
        --out mask.png [--overlay overlay.png] [--save-logits logits.npy]
    python -m magnet_jax.predict --checkpoint DIR --image FOLDER --text "..." [--text "..."] \
        --out-dir OUT
    python -m magnet_jax.predict --checkpoint DIR --list pairs.tsv --out-dir OUT
    python -m magnet_jax.predict --demo --out mask.png --overlay overlay.png

--checkpoint is any directory `magnet_jax.restore` reads: converted official weights, a
training workdir (its latest checkpoint, or --step) or WORKDIR/params. A list file holds one
`image<TAB>sentence` per line (relative paths from the list's folder; # starts a comment).
With --out-dir every (image, sentence) gets OUT/<image stem>-<k>.png (mask) and
-<k>-overlay.png, and OUT/predictions.jsonl lists them with their scores.

Preprocessing is the official evaluation's (RGB, PIL bilinear resize to the square input,
ImageNet mean/std). The mask logits at input resolution (what --save-logits stores and the
official evaluation thresholds) are the stride-4 logits upsampled with bilinear
align_corners=True; the mask at the original image size is the same stride-4 logits upsampled
to (H, W) (evaluation protocol "original"), foreground where sigmoid > 0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import compilation_cache, methods
from magnet_jax.data import images as image_io
from magnet_jax.data.tokenizer import load_tokenizer
from magnet_jax.evaluation.protocols import resize_logits
from magnet_jax.models import build_model, random_params
from magnet_jax.models.presets import tiny_model_config

log = logging.getLogger("magnet_jax.predict")

DEMO_TEXT = "the red circle on the left"
DEFAULT_RUN = os.path.join("workdir", "synthetic")   # README command 1's run
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class Prediction:
    """logits: (S, S) float32 at input resolution; mask: (H, W) bool at the original size."""
    logits: np.ndarray
    mask: np.ndarray
    score: float            # mean foreground probability inside the mask (0 when empty)
    # Generalised RIS, for a model with a no-target head (model.no_target_threshold > 0): the
    # head's probability that the sentence refers to nothing, and its answer (mask empty).
    no_target_probability: float | None = None
    no_target: bool = False


def bucket_size(n: int, max_batch: int) -> int:
    """The compiled batch size that holds n rows: the next power of two, at most max_batch."""
    size = 1
    while size < n and size < max_batch:
        size *= 2
    return min(size, max_batch)


def text_tokenizer(model_config, path: str | None = None):
    """The tokenizer of the method's text input: its own (e.g. CLIP's BPE, from `path` or the
    config) or BERT's WordPiece (from `path` or the bundled vocabulary)."""
    method = methods.method_of(model_config)
    if method.make_tokenizer is not None:
        return method.text_tokenizer(model_config, path)
    return load_tokenizer(path)


class Predictor:
    """Load a model once, predict many (image, sentence) pairs.

    Pairs are run in batches of at most `max_batch`, padded to a power of two, so the model is
    compiled once per bucket (1, 2, 4, ..., max_batch), whatever the number of pairs.
    """

    def __init__(self, model_config, params, tokenizer=None, image_size: int | None = None,
                 max_batch: int = 8):
        compilation_cache.enable()   # cheap and idempotent; keeps a directory already set
        self.config = model_config
        self.image_size = int(image_size or model_config.image_size)
        if self.image_size % 32:
            raise ValueError(f"image size must be a multiple of 32, got {self.image_size}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = int(max_batch)
        self.method = methods.method_of(model_config)
        self.model = self.method.build_model(model_config)
        self.params = params
        self.tokenizer = tokenizer if tokenizer is not None else text_tokenizer(model_config)
        self._forward = jax.jit(self._logits)
        self.compiled_batches: set[int] = set()
        # The method's optional inputs (e.g. MaIL's instance masks); absent ones are built by
        # the method from None, with the effect `extra_inputs_note` describes.
        self.extra_specs = self.method.extra_input_specs(model_config, self.image_size)
        self._warned_absent = False
        self.no_target_threshold = float(model_config.get("no_target_threshold", 0.0))
        self.has_no_target_head = (self.method.infer_no_target is not None
                                   and self.no_target_threshold > 0)

    @classmethod
    def from_checkpoint(cls, directory: str, tokenizer: str | None = None,
                        image_size: int | None = None, step: int | str | None = None,
                        max_batch: int = 8) -> "Predictor":
        """Any checkpoint directory `magnet_jax.restore.load_model` reads, on one device."""
        from magnet_jax import restore, sharding
        mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
        loaded = restore.load_model(directory, mesh, step=step)
        return cls(loaded.config, loaded.params, text_tokenizer(loaded.config, tokenizer),
                   image_size, max_batch)

    def _logits(self, params, image, ids, att, extra):
        size = (self.image_size, self.image_size)
        if self.has_no_target_head:
            return self.method.infer_no_target(self.model, params, image, ids, att, size, **extra)
        logits, coarse = self.method.infer(self.model, params, image, ids, att, size, **extra)
        return logits, coarse, jnp.zeros(logits.shape[:1], jnp.float32)

    def extra_inputs(self, given=None) -> dict[str, np.ndarray]:
        """One image's extra model inputs from what the caller gave (None = nothing)."""
        if not self.extra_specs:
            if given is not None:
                raise ValueError(f"method {self.method.name!r} takes no instance masks")
            return {}
        if given is None and not self._warned_absent:
            log.info("no instance masks given: %s", self.method.extra_inputs_note)
            self._warned_absent = True
        return self.method.host_extra_inputs(self.config, self.image_size, given)

    def _run(self, pixels: np.ndarray, ids: np.ndarray, att: np.ndarray,
             extra: dict[str, np.ndarray] | None = None):
        """(N, S, S) input-size logits, (N, h, w) stride-4 logits and (N,) no-target
        probabilities (0 without a no-target head), in bucketed batches."""
        out_in, out_coarse, out_none = [], [], []
        for start in range(0, len(pixels), self.max_batch):
            stop = min(start + self.max_batch, len(pixels))
            size = bucket_size(stop - start, self.max_batch)
            pad = size - (stop - start)

            def padded(x):
                x = x[start:stop]
                return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x

            logits, coarse, p_none = self._forward(self.params, jnp.asarray(padded(pixels)),
                                           jnp.asarray(padded(ids)), jnp.asarray(padded(att)),
                                           {k: jnp.asarray(padded(v))
                                            for k, v in (extra or {}).items()})
            self.compiled_batches.add(size)
            out_in.append(np.asarray(logits)[:stop - start])
            out_coarse.append(np.asarray(coarse)[:stop - start])
            out_none.append(np.asarray(p_none)[:stop - start])
        return np.concatenate(out_in), np.concatenate(out_coarse), np.concatenate(out_none)

    def predict_batch(self, items: Sequence[tuple]) -> list[list[Prediction]]:
        """items: (image, sentence or list of sentences) pairs, or triples whose third part
        is the image's instance masks (methods with that input, e.g. MaIL: a sequence or
        (N, H, W) array of masks at the image's size, best first; None = none). image = a path
        or a PIL image. Returns, per item, one Prediction per sentence."""
        pils, pixels, rows, texts, extras = [], [], [], [], []
        for k, item in enumerate(items):
            image, sentences = item[0], item[1]
            given = item[2] if len(item) > 2 else None
            pil = image_io.load_image_rgb(image) if isinstance(image, (str, os.PathLike)) else image
            pils.append(pil)
            pixels.append(image_io.preprocess_image(pil, self.image_size))
            if given is not None and self.extra_specs:
                for i, m in enumerate(given):
                    if np.shape(m) != (pil.height, pil.width):
                        raise ValueError(f"item {k}: instance mask {i} is {np.shape(m)}, the "
                                         f"image is {(pil.height, pil.width)} (H, W)")
            extras.append(self.extra_inputs(given))
            sentences = [sentences] if isinstance(sentences, str) else list(sentences)
            if not sentences:
                raise ValueError(f"item {k} has no sentence")
            rows.extend((k, j) for j in range(len(sentences)))
            texts.extend(sentences)
        if not rows:
            return []
        tokens = self.tokenizer.batch_encode(texts)
        image_of_row = np.asarray([k for k, _ in rows])
        extra = {name: np.stack([e[name] for e in extras])[image_of_row]
                 for name in self.extra_specs}
        logits_in, coarse, p_none = self._run(np.stack(pixels)[image_of_row], tokens.ids,
                                              tokens.attention_mask, extra)
        out: list[list[Prediction]] = [[] for _ in pils]
        for r, (k, _) in enumerate(rows):
            pil = pils[k]
            full = resize_logits(coarse[r], (pil.height, pil.width))
            mask = full > 0
            probs = 1.0 / (1.0 + np.exp(-full[mask].astype(np.float64)))
            score = float(probs.mean()) if mask.any() else 0.0
            head = {}
            if self.has_no_target_head:
                head = dict(no_target_probability=float(p_none[r]),
                            no_target=bool(p_none[r] > self.no_target_threshold))
            out[k].append(Prediction(logits=logits_in[r].astype(np.float32), mask=mask,
                                     score=score, **head))
        return out

    def predict(self, image, text: str | Sequence[str], instances=None):
        """One image and one sentence -> Prediction; a list of sentences -> list of them.
        instances: the image's instance masks for methods that take them (predict_batch)."""
        result = self.predict_batch([(image, text, instances)])[0]
        return result[0] if isinstance(text, str) else result


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """Whether a training workdir holds a finished checkpoint `restore` can read."""
    checkpoints = Path(workdir) / "checkpoints"
    return checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())


def default_run_sample(predictor: Predictor, out_dir: Path) -> tuple[str, str]:
    """A held-out scene of the default run's synthetic data (the run's generator settings, at
    its input size) written as JPEG next to the outputs, and its first true sentence."""
    from magnet_jax.data import synthetic
    from magnet_jax.restore import RUN_CONFIG
    run_config = Path(DEFAULT_RUN) / RUN_CONFIG
    syn = json.loads(run_config.read_text()).get("data", {}).get("synthetic", {}) \
        if run_config.is_file() else {}
    record = synthetic.make_example(int(syn.get("seed", 0)), "heldout", 1,
                                    int(syn.get("image_size", predictor.image_size)),
                                    **synthetic.style_kwargs(syn))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo-input.jpg"
    path.write_bytes(record["image_jpeg"])
    return str(path), record["sent"][0]


def demo_predictor(image_size: int = 128, seed: int = 0) -> Predictor:
    """A small model with random weights: shows the whole pipeline without any download."""
    cfg = tiny_model_config(image_size)
    params = random_params(build_model(cfg), cfg.image_size, seed)
    return Predictor(cfg, params, load_tokenizer(None))


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m magnet_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="converted weights, a training workdir or WORKDIR/params")
    p.add_argument("--step", help="training workdirs: latest (default), best or a step number")
    p.add_argument("--demo", action="store_true",
                   help="the trained default run in workdir/synthetic (its best checkpoint, "
                        "a held-out synthetic scene) if there is one, else a small model with "
                        "random weights and the bundled sample image")
    p.add_argument("--image", help="an image file, or a folder of images")
    p.add_argument("--text", action="append",
                   help="referring expression (repeat for several per image)")
    p.add_argument("--list", help="file of `image<TAB>sentence` lines")
    p.add_argument("--out", help="single image and sentence: the mask PNG (original size)")
    p.add_argument("--overlay", help="single image and sentence: an overlay PNG")
    p.add_argument("--save-logits", help="single image and sentence: .npy of float32 logits "
                   "at input resolution")
    p.add_argument("--out-dir", help="folder / list / several sentences: masks, overlays and "
                   "predictions.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="largest compiled batch (default 8)")
    p.add_argument("--tokenizer", help="the text tokenizer: a BERT vocab.txt or tokenizer directory, "
                   "or a CLIP directory / merges file for CLIP methods (default: bundled or the "
                   "checkpoint config's)")
    p.add_argument("--image-size", type=int, help="square input size (default: checkpoint's)")
    p.add_argument("--instances", action="append",
                   help="single image, methods with instance masks (MaIL): a PNG mask (repeat, "
                        "best first) or a .npy of (N, H, W) masks at the image's size; without "
                        "it such a method runs with no instance (see its note)")
    args = p.parse_args(argv)
    if args.demo == bool(args.checkpoint):
        p.error("give exactly one of --checkpoint DIR or --demo")
    if args.list and (args.image or args.text):
        p.error("--list replaces --image and --text")
    if not args.demo and not args.list and not (args.image and args.text):
        p.error("--image and --text (or --list) are required with --checkpoint")
    single = not args.list and not (args.image and Path(args.image).is_dir()) and \
        len(args.text or [None]) == 1
    if single and not args.out:
        p.error("--out is required for one image and one sentence (or use --out-dir)")
    if not single and not args.out_dir:
        p.error("--out-dir is required for a folder, a list or several sentences")
    if not single and (args.out or args.overlay or args.save_logits):
        p.error("--out/--overlay/--save-logits are for one image and one sentence; use --out-dir")
    if args.instances and not single:
        p.error("--instances is for one image and one sentence")
    args.single = single
    return args


def read_instances(paths: Sequence[str] | None) -> list[np.ndarray] | None:
    """--instances files -> a list of (H, W) bool masks (None when no file is given)."""
    if not paths:
        return None
    from PIL import Image
    masks: list[np.ndarray] = []
    for path in paths:
        if str(path).endswith(".npy"):
            array = np.load(path)
            if array.ndim not in (2, 3):
                raise ValueError(f"{path}: expected (H, W) or (N, H, W) masks, got {array.shape}")
            masks.extend(list(array[None] if array.ndim == 2 else array))
        else:
            with Image.open(path) as im:
                masks.append(np.asarray(im.convert("L")))
    return [np.asarray(m) > 0 for m in masks]


def read_list(path: str) -> list[tuple[Path, str]]:
    """`image<TAB>sentence` lines -> pairs; relative image paths from the list's folder."""
    base = Path(path).absolute().parent
    pairs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if "\t" not in line:
                raise ValueError(f"{path}:{n}: expected `image<TAB>sentence`, got {line[:60]!r}")
            image, text = line.split("\t", 1)
            pairs.append((base / image if not Path(image).is_absolute() else Path(image), text))
    if not pairs:
        raise ValueError(f"{path} lists no (image, sentence) pair")
    return pairs


def _pairs(args) -> list[tuple[Path, list[str]]]:
    """(image, sentences) of a folder, a list file or one image, grouped by image."""
    if args.list:
        grouped: dict[Path, list[str]] = {}
        for image, text in read_list(args.list):
            grouped.setdefault(image, []).append(text)
        return list(grouped.items())
    image = Path(args.image)
    if image.is_dir():
        files = sorted(f for f in image.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{image} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return [(f, list(args.text)) for f in files]
    return [(image, list(args.text))]


def _predict_many(predictor: Predictor, pairs, out_dir: Path) -> int:
    """Masks, overlays and predictions.jsonl for every (image, sentence); returns the count."""
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    chunk = max(1, predictor.max_batch)
    with tqdm(total=sum(len(t) for _, t in pairs), unit="expr", desc="predict",
              disable=len(pairs) < 2) as bar:
        for start in range(0, len(pairs), chunk):
            group = pairs[start:start + chunk]
            pils = [(image_io.load_image_rgb(path), texts) for path, texts in group]
            for (path, texts), (pil, _), preds in zip(group, pils, predictor.predict_batch(pils)):
                for k, (text, pred) in enumerate(zip(texts, preds)):
                    stem = f"{Path(path).stem}-{k}"
                    image_io.save_mask_png(pred.mask, out_dir / f"{stem}.png")
                    image_io.overlay_mask(pil, pred.mask).save(out_dir / f"{stem}-overlay.png")
                    records.append({"image": str(path), "sentence": text, "mask": f"{stem}.png",
                                    "overlay": f"{stem}-overlay.png", "score": round(pred.score, 6),
                                    "foreground_pixels": int(pred.mask.sum()),
                                    **_no_target_fields(pred)})
                    bar.update(1)
    tmp = out_dir / ".predictions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, out_dir / "predictions.jsonl")
    return len(records)


def _no_target_fields(pred: Prediction) -> dict:
    """predictions.jsonl's generalised-RIS entries (only for a model with a no-target head)."""
    if pred.no_target_probability is None:
        return {}
    return {"no_target": pred.no_target,
            "no_target_probability": round(pred.no_target_probability, 6)}


def main(argv=None) -> int:
    # Our messages only: the root logger at INFO would also print JAX's backend probing.
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("absl").setLevel(logging.ERROR)   # orbax's read-only manager notices
    args = _parse(argv)
    compilation_cache.enable()
    from magnet_jax.restore import RestoreError
    try:
        start = time.time()
        if args.demo and has_checkpoint(DEFAULT_RUN):
            predictor = Predictor.from_checkpoint(DEFAULT_RUN, args.tokenizer, args.image_size,
                                                  step=args.step or "best",
                                                  max_batch=args.batch_size)
            if not args.image:
                args.image, sentence = default_run_sample(predictor, Path(args.out).parent)
                args.text = args.text or [sentence]
            log.info("demo: the trained default run in %s (its best checkpoint)", DEFAULT_RUN)
        elif args.demo:
            from magnet_jax.assets import SAMPLE_IMAGE
            args.image = args.image or SAMPLE_IMAGE
            args.text = args.text or [DEMO_TEXT]
            predictor = demo_predictor(args.image_size or 128)
            log.info("demo: no trained default run in %s (train one with `python -m "
                     "magnet_jax.train`), so a small model with RANDOM weights: the mask shows "
                     "the pipeline, not a trained prediction", DEFAULT_RUN)
        else:
            predictor = Predictor.from_checkpoint(args.checkpoint, args.tokenizer, args.image_size,
                                                  step=args.step, max_batch=args.batch_size)
        if not args.single:
            n = _predict_many(predictor, _pairs(args), Path(args.out_dir))
            log.info("%d predictions in %s (%.1fs)", n, args.out_dir, time.time() - start)
            return 0
        image_path, text = args.image, args.text[0]
        pil = image_io.load_image_rgb(image_path)
        result = predictor.predict(pil, text, instances=read_instances(args.instances))
    except (ValueError, FileNotFoundError, OSError, RestoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    image_io.save_mask_png(result.mask, args.out)
    if args.overlay:
        image_io.overlay_mask(pil, result.mask).save(args.overlay)
    if args.save_logits:
        np.save(args.save_logits, result.logits)
    log.info("%s: %r -> %s (%d foreground pixels of %d, score %.3f, %.1fs)", image_path, text,
             args.out, int(result.mask.sum()), result.mask.size, result.score, time.time() - start)
    if result.no_target:
        log.info("no target: the no-target head's probability %.3f exceeds the threshold %.2f, "
                 "so the mask is empty", result.no_target_probability,
                 predictor.no_target_threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
