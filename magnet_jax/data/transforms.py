"""Per-example grain transforms: sentence choice, decoding, resizing, augmentation.

All transforms are module-level, picklable classes (grain's worker processes are spawned,
`jax_stack.md` §6.3). Inputs are decoded records (`records.RecordSource` items, the fields of
`data_formats.md` §7.2); the output of `Preprocess` is one example:

    image  float32 (S, S, 3)   PIL bilinear resize + ImageNet normalisation (§4, images.py)
    mask   uint8 (S, S)        0/1 under the chosen mask convention, PIL NEAREST resize
    ids    int32 (20,)         the stored bert-base-uncased ids of the chosen sentence
    att    int32 (20,)         its attention mask
    ref_id, sent_id int32      (RefCOCO ids fit in int32; JAX runs without x64)
    weight float32             1 for a real example, 0 for evaluation padding
    no_target int32            1 when the sentence refers to nothing (generalised RIS: the
                               record's `no_target`, 0 where records lack it); its mask is empty
    flipped bool               whether augmentation mirrored the example

With `instances` (an `instances.InstanceSpec`, MaIL) two more entries:

    instance_masks uint8 (K, S, S)  0/1 instance masks (`instances.instance_masks`), cropped and
                                    flipped exactly as the image and mask, NEAREST resize
    instance_valid int32 (K,)       1 for a real instance with at least one pixel left after
                                    crop and resize; 0 for padding

Augmentation (training only, off by default): a random crop of at least `min_scale` of each
side, colour jitter, and a horizontal flip. The flip is skipped, never text-rewritten, when the
sentence has a left/right word ("left", "right", "leftmost", "righthand", ...): rewriting
stored token ids would diverge from `raw`, and skipping keeps both consistent. A flip is
harmless for every other sentence.
"""

from __future__ import annotations

import dataclasses
import io
import re
from typing import Any

import numpy as np
from PIL import Image

from magnet_jax.data import records
from magnet_jax.data.images import IMAGENET_MEAN, IMAGENET_STD, preprocess_image
from magnet_jax.data.instances import InstanceSpec, instance_masks

# Word starts: "left", "leftmost", "left-hand", "rightmost", "righthand"; not "bright".
_LEFT_RIGHT = re.compile(r"\b(left|right)", re.IGNORECASE)


def has_left_right(text: str) -> bool:
    """True when mirroring the image would change what `text` refers to."""
    return _LEFT_RIGHT.search(text) is not None


class PickSentence:
    """random_map: choose one sentence of the ref with the example's seeded generator."""

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        n = len(record["sent_ids"])
        return {"record": record, "sent_index": int(rng.integers(n)), "weight": 1.0}


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation; the defaults are mild enough to keep the referent in view."""

    min_scale: float = 0.85     # crop side as a fraction of the image side (1 = no crop)
    brightness: float = 0.15    # multiplicative, uniform in [1 - b, 1 + b]
    contrast: float = 0.15
    saturation: float = 0.15
    flip_prob: float = 0.5      # skipped for sentences with left/right words

    def __post_init__(self):
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """(random_)map: {record, sent_index, weight} -> the example of the module docstring.

    Used with `MapDataset.random_map` when `augment` is set (the rng drives it) and with
    `.map` otherwise (rng None).
    """

    image_size: int
    convention: str = "official"
    augment: Augment | None = None
    # A method's own tokenizer (e.g. CLIP's BPE) re-encodes the raw sentence; None = the
    # record's stored BERT ids.
    tokenizer: Any = None
    # MaIL's instance masks (module docstring); None = no instance entries.
    instances: InstanceSpec | None = None

    def __post_init__(self):
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        records.mask_from_count(np.zeros((1, 1), np.uint8), self.convention)  # validates name
        if self.instances is not None and not isinstance(self.instances, InstanceSpec):
            raise TypeError(f"instances must be an InstanceSpec or None, got "
                            f"{type(self.instances).__name__}")

    def __call__(self, item: dict[str, Any], rng: np.random.Generator | None = None) -> dict:
        rec, j = item["record"], int(item["sent_index"])
        with Image.open(io.BytesIO(rec["image_jpeg"])) as im:
            img = im.convert("RGB")
        mask = Image.fromarray(records.mask_from_count_png(rec["mask_count_png"], self.convention))
        if img.size != mask.size:
            raise ValueError(f"ref_id={rec['ref_id']}: image size {img.size} != mask size "
                             f"{mask.size}")
        inst: list[Image.Image] = []
        if self.instances is not None:
            inst_masks, inst_valid = instance_masks(rec, self.instances)
            inst = [Image.fromarray(m) for m in inst_masks]
        flipped = False
        if self.augment is not None and rng is not None:
            img, mask, flipped, inst = _geometry(img, mask, self.augment, rng, rec["raw"][j],
                                                 inst)
        s = self.image_size
        image = preprocess_image(img, s)
        if self.augment is not None and rng is not None:
            image = _jitter(image, self.augment, rng)
        if self.tokenizer is None:
            ids, att = rec["input_ids"][j], rec["attention_mask"][j]
        else:
            tokens = self.tokenizer.encode(rec["raw"][j], warn=False)
            ids, att = tokens.ids, tokens.attention_mask
        out = {
            "image": image,
            "mask": np.asarray(mask.resize((s, s), Image.NEAREST), np.uint8),
            "ids": np.asarray(ids, np.int32),
            "att": np.asarray(att, np.int32),
            "ref_id": np.int32(rec["ref_id"]),
            "sent_id": np.int32(rec["sent_ids"][j]),
            "weight": np.float32(item["weight"]),
            "no_target": np.int32(rec.get("no_target", 0)),
            "flipped": np.bool_(flipped),
        }
        if self.instances is not None:
            small = np.stack([np.asarray(m.resize((s, s), Image.NEAREST), np.uint8)
                              for m in inst])
            out["instance_masks"] = small
            out["instance_valid"] = (inst_valid.astype(bool)
                                     & small.reshape(len(small), -1).any(axis=1)).astype(np.int32)
        return out


def _geometry(img: Image.Image, mask: Image.Image, aug: Augment, rng: np.random.Generator,
              raw: str, extra: list[Image.Image] = ()
              ) -> tuple[Image.Image, Image.Image, bool, list[Image.Image]]:
    """Random crop and flip of the image, the mask and `extra` (same box, same flip)."""
    extra = list(extra)
    w, h = img.size
    if aug.min_scale < 1:
        scale = rng.uniform(aug.min_scale, 1.0)
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        x0, y0 = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        box = (x0, y0, x0 + cw, y0 + ch)
        img, mask = img.crop(box), mask.crop(box)
        extra = [m.crop(box) for m in extra]
    # Draw the coin even when the flip is skipped, so the rest of the stream does not shift.
    flip = rng.random() < aug.flip_prob and not has_left_right(raw)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
        extra = [m.transpose(Image.FLIP_LEFT_RIGHT) for m in extra]
    return img, mask, flip, extra


def _jitter(image: np.ndarray, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation on [0, 1] pixels, then re-normalised."""
    x = image * IMAGENET_STD + IMAGENET_MEAN
    b, c, s = (np.float32(rng.uniform(1 - a, 1 + a))
               for a in (aug.brightness, aug.contrast, aug.saturation))
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    grey = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
    x = (x - grey[..., None]) * s + grey[..., None]
    x = np.clip(x, 0.0, 1.0)
    return ((x - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
