"""Predict referring masks: the `Predictor` API and `python -m magnet_jax.predict`.

    python -m magnet_jax.predict --checkpoint DIR --image IMG --text "the man on the left" \
        --out mask.png [--overlay overlay.png] [--save-logits logits.npy] \
        [--tokenizer VOCAB_OR_DIR] [--image-size N]
    python -m magnet_jax.predict --demo --out mask.png --overlay overlay.png

Preprocessing is the official evaluation's (RGB, PIL bilinear resize to the square input,
ImageNet mean/std); the mask logits are upsampled with bilinear align_corners=True and
thresholded as sigmoid > 0.5. `--save-logits` stores the float32 pre-sigmoid logits at
input resolution, the array the official evaluation thresholds; mask.png has the
original image size (the same logits upsampled from the decoder's stride-4 map).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

from magnet_jax import checkpoint_io
from magnet_jax.data import images as image_io
from magnet_jax.data.tokenizer import load_tokenizer
from magnet_jax.models import binary_mask, build_model, mask_logits_at, random_params
from magnet_jax.models.presets import tiny_model_config

log = logging.getLogger("magnet_jax.predict")

DEMO_TEXT = "the red circle on the left"


@dataclasses.dataclass
class Prediction:
    """logits: (S, S) float32 at input resolution; mask: (H, W) bool at the original size."""
    logits: np.ndarray
    mask: np.ndarray
    score: float            # mean foreground probability inside the mask (0 when empty)


class Predictor:
    """Load a model once, predict many (image, sentence) pairs; compiled once per shape."""

    def __init__(self, model_config, params, tokenizer=None, image_size: int | None = None):
        self.config = model_config
        self.image_size = int(image_size or model_config.image_size)
        if self.image_size % 32:
            raise ValueError(f"image size must be a multiple of 32, got {self.image_size}")
        self.model = build_model(model_config)
        self.params = params
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
        self._forward = jax.jit(self._logits, static_argnames=("out_size",))

    @classmethod
    def from_checkpoint(cls, directory: str, tokenizer: str | None = None,
                        image_size: int | None = None) -> "Predictor":
        model_config, params = checkpoint_io.load_params(directory)
        return cls(model_config, params, load_tokenizer(tokenizer), image_size)

    def _logits(self, params, image, ids, att, out_size):
        outputs = self.model.apply({"params": params}, image, ids, att, train=False)
        size = (self.image_size, self.image_size)
        return mask_logits_at(outputs, size), mask_logits_at(outputs, out_size)

    def predict(self, image, text: str) -> Prediction:
        """image: a path or a PIL image; text: the referring expression."""
        pil = image_io.load_image_rgb(image) if isinstance(image, (str, os.PathLike)) else image
        tokens = self.tokenizer.encode(text)
        pixels = image_io.preprocess_image(pil, self.image_size)[None]
        out_size = (pil.height, pil.width)
        logits_in, logits_orig = self._forward(
            self.params, jnp.asarray(pixels), jnp.asarray(tokens.ids[None]),
            jnp.asarray(tokens.attention_mask[None]), out_size=out_size)
        mask = np.asarray(binary_mask(logits_orig))[0]
        probs = np.asarray(jax.nn.sigmoid(logits_orig))[0]
        score = float(probs[mask].mean()) if mask.any() else 0.0
        return Prediction(logits=np.asarray(logits_in[0], np.float32), mask=mask, score=score)


def demo_predictor(image_size: int = 128, seed: int = 0) -> Predictor:
    """A small model with random weights: shows the whole pipeline without any download."""
    cfg = tiny_model_config(image_size)
    params = random_params(build_model(cfg), cfg.image_size, seed)
    return Predictor(cfg, params, load_tokenizer(None))


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m magnet_jax.predict", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="converted or trained checkpoint directory")
    p.add_argument("--demo", action="store_true",
                   help="use a small untrained model and the bundled sample image")
    p.add_argument("--image", help="input image (any PIL-readable format)")
    p.add_argument("--text", help="referring expression")
    p.add_argument("--out", required=True, help="binary mask PNG at the original image size")
    p.add_argument("--overlay", help="optional overlay PNG")
    p.add_argument("--save-logits", help="optional .npy of float32 logits at input resolution")
    p.add_argument("--tokenizer", help="vocab.txt or tokenizer directory (default: bundled)")
    p.add_argument("--image-size", type=int, help="square input size (default: checkpoint's)")
    args = p.parse_args(argv)
    if args.demo == bool(args.checkpoint):
        p.error("give exactly one of --checkpoint DIR or --demo")
    if not args.demo and not (args.image and args.text is not None):
        p.error("--image and --text are required with --checkpoint")
    return args


def main(argv=None) -> int:
    # Our messages only: the root logger at INFO would also print JAX's backend probing.
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    args = _parse(argv)
    try:
        start = time.time()
        if args.demo:
            from magnet_jax.assets import SAMPLE_IMAGE
            image_path, text = args.image or SAMPLE_IMAGE, args.text or DEMO_TEXT
            predictor = demo_predictor(args.image_size or 128)
            log.info("demo: small untrained model (random weights); the mask shows the pipeline, "
                     "not a trained prediction")
        else:
            image_path, text = args.image, args.text
            predictor = Predictor.from_checkpoint(args.checkpoint, args.tokenizer, args.image_size)
        pil = image_io.load_image_rgb(image_path)
        result = predictor.predict(pil, text)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    image_io.save_mask_png(result.mask, args.out)
    if args.overlay:
        image_io.overlay_mask(pil, result.mask).save(args.overlay)
    if args.save_logits:
        np.save(args.save_logits, result.logits)
    log.info("%s: %r -> %s (%d foreground pixels of %d, score %.3f, %.1fs)", image_path, text,
             args.out, int(result.mask.sum()), result.mask.size, result.score, time.time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
