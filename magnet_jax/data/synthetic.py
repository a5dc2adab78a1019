"""The built-in synthetic referring dataset, written in the real record format.

`python -m magnet_jax.data.synthetic --out DIR [--num-train N] [--num-val N] [--num-heldout N]
[--image-size S] [--seed K]` writes DIR/train, val and heldout shards plus their meta.json
through `records.write_shards`, so the training job runs with no download and reads synthetic
data through exactly the same pipeline as RefCOCO.

A scene is a textured, noisy background with 3-6 objects (`max_objects` lowers the cap): a
shape (circle, square, triangle, star, diamond, cross), a colour (red, green, blue, yellow,
purple, orange) and a size (small, large), at random positions, possibly overlapping (later
objects occlude earlier ones; every object keeps at least 60 % of its area visible). One record
= one referred object, with 1-3 expressions chosen among three kinds:
  - attributes: "the large green star" (only attribute sets that single the target out);
  - ordinal: "the second triangle from the right" (objects of that shape ordered along an axis);
  - relation: "the small red circle left of the blue square" (the attributes alone may be
    ambiguous; the landmark is unique and only the target stands in that relation to it).
Most scenes hold a distractor of the target's shape, so the shape word alone is not enough.
`raw` is the capitalised, punctuated expression; `sent` the lower-case normalised form, as in
REFER.

Held-out split: the colour x shape pairs of HELDOUT_PAIRS never occur anywhere in train or val
(neither as target nor as distractor); in `heldout` every target is one of them.

The mask is the visible part of the target, rasterised exactly with numpy (count PNG, 1 =
foreground, the same for both mask conventions).

Every record also carries the ground-truth instance fields of the converter's
`--with-instances` (meta.json `with_instances: true`), so MaIL's instance-mask input
(`instances.InstanceSpec(source="gt")`) runs on the default data: one instance per object of
the scene, in drawing order, with its VISIBLE mask as a 0/1 count PNG; category id = shape
index + 1 (as `category_id`), category name = the shape name (the colour is an attribute, not
a category, as in COCO); iscrowd 0; ann id = the record's `ann_id` for the target and
INSTANCE_ID_BASE + 10 * ann_id + object index for the others (unique over the dataset). They
are computed from the scene without drawing random numbers, so images, masks and text are
those of a dataset without them. Everything is drawn from
`np.random.default_rng([seed, split, index])`, so the same seed gives byte-identical shards
and examples do not depend on how many others are generated.

Generalised RIS (`generate(..., gres=True)`, `--gres`, config.data.synthetic.gres): three more
splits, gres_train, gres_val and gres_heldout (GRES_SPLITS, as many records as train, val and
heldout; no held-out pair in gres_train or gres_val, and in gres_heldout every target is one
and every multi- or no-target phrase names one), drawn from their own streams (codes 3-5),
so train, val and heldout are byte for byte those of a run without the switch. Each record is
one of GRES_KINDS, chosen by its index alone (`gres_kind`: a golden-ratio sequence, so the
fractions hold within a record or two at any size rather than only in expectation):
  - single_target: an ordinary record (the same scene and expression generators);
  - multi_target: a scene with a planted group of 2-3 objects sharing a description, referred
    to together: "all the red circles", "both squares", "the two small stars", "the circles
    left of the blue triangle" (every circle clearly left of it, every other clearly not);
    the mask is the union of the targets' visible masks;
  - no_target: a plausible expression that matches nothing in the scene: a description one
    attribute away from a present object ("the purple circle" beside a red circle and a purple
    square; also "all the purple circles"), a relation that holds for none of the objects
    fitting it, or an ordinal past the end ("the third triangle from the left" of two); the
    mask is empty.
A no-target expression is not marked by its words (that would be a shortcut), so
`expression_kind` names "no_target" only when told the record's `no_target`; plural
expressions are "multi". The gres records carry the gRefCOCO fields of records.py
(`no_target`, `target_ann_ids`, `target_category_ids`, `target_iscrowd`, `target_bboxes`),
`ann_id`/`category_id` of the first target in drawing order (-1 for none), and the instance
fields as above; their meta.json `counts` has single/multi/no-target refs and sentences.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 75, 215),
    "yellow": (235, 205, 35),
    "purple": (145, 55, 185),
    "orange": (245, 135, 25),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
# One pair per colour and per shape (a Latin diagonal): every colour and every shape is still
# seen in training, only these combinations are not.
HELDOUT_PAIRS = frozenset(
    {("red", "star"), ("green", "triangle"), ("blue", "circle"), ("yellow", "square"),
     ("purple", "diamond"), ("orange", "cross")}
)
SPLITS = ("train", "val", "heldout")
GRES_SPLITS = ("gres_train", "gres_val", "gres_heldout")  # written with gres=True only
_SPLIT_CODE = {"train": 0, "val": 1, "heldout": 2, "gres_train": 3, "gres_val": 4,
               "gres_heldout": 5}
GRES_KINDS = ("single_target", "multi_target", "no_target")
GRES_MULTI_FRACTION = 0.25       # defaults of config.data.synthetic.gres_*_fraction
GRES_NO_TARGET_FRACTION = 0.15
_GOLDEN = (5 ** 0.5 - 1) / 2
# ids are unique across splits: split k uses (k * 10**6, (k + 1) * 10**6).
_ID_STRIDE = 10**6
# Most objects an ordinary scene asks for (the target, up to two of its shape, others).
MAX_OBJECTS = 6
_ORDINALS = ("first", "second", "third", "fourth")
_MIN_VISIBLE = 0.6
INSTANCE_ID_BASE = 10**9  # ann ids of the non-target instances (above every record id)


@dataclasses.dataclass
class _Object:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    r: float
    full: np.ndarray            # bool (S, S): the whole shape
    visible: np.ndarray | None = None

    def matches(self, size: str | None, colour: str | None, shape: str) -> bool:
        return (self.shape == shape and (colour is None or self.colour == colour)
                and (size is None or self.size == size))


# --------------------------------------------------------------------------------------------
# Rasterisation (numpy, pixel centres at integer + 0.5).
# --------------------------------------------------------------------------------------------

def _convex(xx: np.ndarray, yy: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Inside test of a convex polygon with vertices in counter-clockwise (image) order."""
    inside = np.ones(xx.shape, bool)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0)):
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def _regular(cx: float, cy: float, r: float, n: int, phase: float) -> np.ndarray:
    a = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    return yy, xx


def _rasterise(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """bool (size, size) mask of the shape; only its bounding window is evaluated."""
    m = 1.3 * r  # every shape lies within 1.25 r of its centre
    x0, y0 = max(0, int(cx - m)), max(0, int(cy - m))
    x1, y1 = min(size, int(np.ceil(cx + m)) + 1), min(size, int(np.ceil(cy + m)) + 1)
    out = np.zeros((size, size), bool)
    yy, xx = _grid(size)
    out[y0:y1, x0:x1] = _shape_window(shape, cx, cy, r, xx[y0:y1, x0:x1], yy[y0:y1, x0:x1])
    return out


def _shape_window(shape: str, cx: float, cy: float, r: float, xx: np.ndarray,
                  yy: np.ndarray) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = 0.8 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        w = 0.33 * r
        return ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    if shape == "triangle":  # apex up
        return _convex(xx, yy, _regular(cx, cy + 0.15 * r, 1.1 * r, 3, -np.pi / 2))
    if shape == "star":      # inner pentagon plus five spikes, each convex
        outer = _regular(cx, cy, r, 5, -np.pi / 2)
        inner = _regular(cx, cy, 0.42 * r, 5, -np.pi / 2 + np.pi / 5)
        mask = _convex(xx, yy, inner)
        for k in range(5):
            mask |= _convex(xx, yy, np.stack([inner[k - 1], outer[k], inner[k]]))
        return mask
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted base colour, a low-frequency texture (stripes or blotches) and pixel noise."""
    yy, xx = _grid(size)
    yy, xx = yy / size, xx / size
    base = rng.uniform(90, 170) + rng.uniform(-25, 25, 3)
    # sin(a x + b y + c) = sin(a x + c) cos(b y) + cos(a x + c) sin(b y): outer products.
    x, y = xx[0], yy[:, 0]
    tex = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 4)):
        fx, fy = rng.uniform(-6, 6, 2)
        ax = 2 * np.pi * fx * x + rng.uniform(0, 2 * np.pi)
        by = 2 * np.pi * fy * y
        tex += np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
    amp = rng.uniform(5, 25)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(rng.uniform(2, 10))
    return (base.astype(np.float32) + np.float32(amp) * tex[..., None] + noise).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Scenes.
# --------------------------------------------------------------------------------------------

def _allowed(colour: str, shape: str, split: str) -> bool:
    return split == "heldout" or (colour, shape) not in HELDOUT_PAIRS


def _draw_attrs(rng: np.random.Generator, split: str, shape: str | None = None) -> tuple[str, str]:
    while True:
        s = shape if shape is not None else SHAPES[rng.integers(len(SHAPES))]
        c = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        if _allowed(c, s, split):
            return s, c


def _place(rng, objs: list[_Object], shape: str, colour: str, size: str, s: int,
           scale: float = 1.0) -> bool:
    """Add one object where every object (the new one included) stays mostly visible;
    `scale` multiplies the radius (object_scale)."""
    r = s * scale * (rng.uniform(0.07, 0.10) if size == "small" else rng.uniform(0.15, 0.20))
    for _ in range(20):
        cx, cy = rng.uniform(r, s - r, 2)
        full = _rasterise(shape, cx, cy, r, s)
        if not full.any():
            continue
        ok = all((o.full & ~full & _cover(objs[i + 1:])).sum()
                 >= _MIN_VISIBLE * o.full.sum() for i, o in enumerate(objs))
        if ok:
            objs.append(_Object(shape, colour, size, float(cx), float(cy), float(r), full))
            return True
    return False


def _cover(objs: list[_Object]) -> np.ndarray | bool:
    """Pixels not covered by `objs` (True where free)."""
    if not objs:
        return True
    covered = np.zeros_like(objs[0].full)
    for o in objs:
        covered |= o.full
    return ~covered


def _scene(rng: np.random.Generator, split: str, s: int, scale: float = 1.0,
           max_objects: int = MAX_OBJECTS) -> tuple[list[_Object], int]:
    """Objects in drawing order (3 to `max_objects` of them) and the target's index."""
    objs: list[_Object] = []
    if split == "heldout":
        pair = sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))]
        t_colour, t_shape = pair
    else:
        t_shape, t_colour = _draw_attrs(rng, split)
    t_size = SIZES[rng.integers(2)]
    wanted = [(t_shape, t_colour, t_size)]
    # Distractors of the same shape so the shape word alone rarely suffices.
    for _ in range(rng.choice([0, 1, 1, 2])):
        shape, colour = _draw_attrs(rng, split, t_shape)
        wanted.append((shape, colour, SIZES[rng.integers(2)]))
    while len(wanted) < rng.integers(3, max_objects + 1):
        shape, colour = _draw_attrs(rng, split)
        wanted.append((shape, colour, SIZES[rng.integers(2)]))
    order = rng.permutation(len(wanted))
    target = -1
    for k in order:
        if _place(rng, objs, *wanted[k], s, scale) and k == 0:
            target = len(objs) - 1
        elif k == 0:  # the target could not be placed: start over (rare)
            return _scene(rng, split, s, scale, max_objects)
    for i, o in enumerate(objs):
        o.visible = o.full & _cover(objs[i + 1:])
    return objs, target


# --------------------------------------------------------------------------------------------
# Expressions.
# --------------------------------------------------------------------------------------------

def _np(size: str | None, colour: str | None, shape: str) -> str:
    return " ".join(w for w in (size, colour, shape) if w)


_PLURALS = {sh: sh + ("es" if sh.endswith(("s", "x")) else "s") for sh in SHAPES}


def _np_plural(size: str | None, colour: str | None, shape: str) -> str:
    return _np(size, colour, _PLURALS[shape])


def _descriptions(o: _Object) -> list[tuple[str | None, str | None, str]]:
    return [(sz, c, o.shape) for sz in (None, o.size) for c in (None, o.colour)]


def _attribute_exprs(objs, t) -> list[str]:
    out = []
    for d in _descriptions(objs[t]):
        if sum(o.matches(*d) for o in objs) == 1:
            out.append(f"the {_np(*d)}")
    return out


_AXES = {  # direction word -> (key, reverse)
    "left": (lambda o: o.cx, False), "right": (lambda o: o.cx, True),
    "top": (lambda o: o.cy, False), "bottom": (lambda o: o.cy, True),
}


def _ordinal_exprs(objs, t, s: int) -> list[str]:
    out = []
    for d in _descriptions(objs[t])[:2]:  # "triangle", "red triangle"
        group = [o for o in objs if o.matches(*d)]
        if len(group) < 2:
            continue
        for side, (key, rev) in _AXES.items():
            ranked = sorted(group, key=key, reverse=rev)
            gaps = np.diff(sorted(key(o) for o in group))
            k = next(i for i, o in enumerate(ranked) if o is objs[t])
            if gaps.min() < 0.06 * s or k >= len(_ORDINALS):
                continue  # too close to call, or too far down the list
            if k == 0 and side in ("left", "right"):
                out.append(f"the {side}most {_np(*d)}")
            if k == len(ranked) - 1 and k > 0:
                continue  # "the third from the left" of three reads as "the rightmost"
            out.append(f"the {_ORDINALS[k]} {_np(*d)} from the {side}")
    return out


_RELATIONS = {  # phrase -> holds(a, b, margin)
    "left of": lambda a, b, m: a.cx < b.cx - m,
    "to the right of": lambda a, b, m: a.cx > b.cx + m,
    "above": lambda a, b, m: a.cy < b.cy - m,
    "below": lambda a, b, m: a.cy > b.cy + m,
}


EXPRESSION_KINDS = ("attribute", "ordinal", "relation", "multi", "no_target")


def expression_kind(sentence: str, no_target: bool | int = False) -> str:
    """The kind of a synthetic expression, read from its words (raw or normalised): "multi"
    for a plural one (several targets, gres splits), else "relation", "ordinal" or
    "attribute" (the relation phrases and the ordinal forms are disjoint). "no_target" only
    when `no_target` (the record's field) says so: those expressions read like the others."""
    if no_target:
        return "no_target"
    text = " " + " ".join(sentence.lower().replace(".", " ").replace(",", " ")
                          .replace("!", " ").split()) + " "
    if any(f" {word} " in text for word in _PLURALS.values()):
        return "multi"
    if any(f" {phrase} " in text for phrase in _RELATIONS):
        return "relation"
    if "most " in text or " from the " in text:
        return "ordinal"
    return "attribute"


def _relation_exprs(objs, t, s: int) -> list[str]:
    out, m = [], 0.08 * s
    target = objs[t]
    landmarks = []
    for j, o in enumerate(objs):
        if j == t:
            continue
        unique = [d for d in _descriptions(o) if sum(p.matches(*d) for p in objs) == 1]
        if unique:
            landmarks.append((j, o, unique[0]))
    for d in _descriptions(target):
        for j, land, ld in landmarks:
            for phrase, holds in _RELATIONS.items():
                if not holds(target, land, m):
                    continue
                # Only the target, among objects fitting its description, is clearly in that
                # relation; others fitting it must clearly not be (no borderline cases).
                rivals = [o for i, o in enumerate(objs) if i not in (t, j) and o.matches(*d)]
                if all(not holds(o, land, -m) for o in rivals):
                    out.append(f"the {_np(*d)} {phrase} the {_np(*ld)}")
    return out


def _raw(sent: str, rng: np.random.Generator) -> str:
    """A REFER-like raw form: sometimes capitalised, with a trailing mark or comma."""
    text = sent
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text = text.replace(" left of", ", left of").replace(" above", ", above")
    if rng.random() < 0.4:
        text += rng.choice([".", "!", " ."])
    return text


def _expressions(rng: np.random.Generator, objs, t, s: int, ordinal_rate: float = 1.0
                 ) -> list[str]:
    ordinals = _ordinal_exprs(objs, t, s)
    # Below 1, ordinals are offered for only that share of the records that have some; no
    # draw at 1, so the data of ordinal_rate=1 is that of the generator before the option.
    if ordinals and ordinal_rate < 1.0 and rng.random() >= ordinal_rate:
        ordinals = []
    kinds = [k for k in (_attribute_exprs(objs, t), ordinals, _relation_exprs(objs, t, s)) if k]
    if not kinds:
        return []
    want = int(rng.integers(1, 4))
    chosen: list[str] = []
    for _ in range(4 * want):  # round-robin over kinds so sentences differ in kind
        kind = kinds[len(chosen) % len(kinds)]
        e = kind[rng.integers(len(kind))]
        if e not in chosen:
            chosen.append(e)
        if len(chosen) == want:
            break
    return chosen


# --------------------------------------------------------------------------------------------
# Generalised RIS (gres splits): several targets or none.
# --------------------------------------------------------------------------------------------

def gres_kind(index: int, multi_fraction: float = GRES_MULTI_FRACTION,
              no_target_fraction: float = GRES_NO_TARGET_FRACTION) -> str:
    """The GRES_KINDS entry of record `index` of a gres split: u = frac(index x golden ratio)
    (equidistributed, so any n records hold each kind within about two of n x fraction);
    u < no_target_fraction: no_target, then multi_target, else single_target."""
    u = (index * _GOLDEN) % 1.0
    if u < no_target_fraction:
        return "no_target"
    if u < no_target_fraction + multi_fraction:
        return "multi_target"
    return "single_target"


# Largest radius scale: large objects are 0.15-0.20 of the side at scale 1; above ~1.6 the
# 3-6 objects no longer fit with 60 % of each visible.
MAX_OBJECT_SCALE = 1.6


def check_style(object_scale: float, ordinal_rate: float, max_objects: int = MAX_OBJECTS
                ) -> None:
    """object_scale multiplies every object's radius (1 = small 0.07-0.10, large 0.15-0.20
    of the image side); ordinal_rate is the share of records with an ordinal expression at
    hand that may use one (1 = all; lower it to make ordinals a smaller part of the data);
    max_objects caps the objects of a scene with one target (3 to 6; multi- and no-target
    scenes of the gres splits keep 3-6)."""
    if not 0.5 <= object_scale <= MAX_OBJECT_SCALE:
        raise ValueError(f"object_scale must be in [0.5, {MAX_OBJECT_SCALE}], got {object_scale}")
    if not 0.0 <= ordinal_rate <= 1.0:
        raise ValueError(f"ordinal_rate must be in [0, 1], got {ordinal_rate}")
    if max_objects != int(max_objects) or not 3 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be an integer in [3, {MAX_OBJECTS}], "
                         f"got {max_objects}")


def _check_fractions(multi_fraction: float, no_target_fraction: float) -> None:
    if not (0 <= multi_fraction <= 1 and 0 <= no_target_fraction <= 1
            and multi_fraction + no_target_fraction <= 1):
        raise ValueError(f"gres fractions must be in [0, 1] and sum to at most 1, got multi "
                         f"{multi_fraction} and no-target {no_target_fraction}")


def _gres_base(split: str) -> str:
    """The ordinary split whose attribute rules a gres split follows."""
    return split[len("gres_"):] if split.startswith("gres_") else split


def _mentionable(d: tuple[str | None, str | None, str], split: str) -> bool:
    """Whether a description may be spoken in `split`: train/val never name a held-out pair;
    in heldout the phrase names one (so every referred or missing object is held out)."""
    _, colour, shape = d
    if split == "heldout":
        return colour is not None and (colour, shape) in HELDOUT_PAIRS
    return colour is None or (colour, shape) not in HELDOUT_PAIRS


def _scene_descriptions(objs: list[_Object]) -> list[tuple[str | None, str | None, str]]:
    """Every description of every object, once, in drawing order."""
    out: list = []
    for o in objs:
        out += [d for d in _descriptions(o) if d not in out]
    return out


def _landmarks(objs: list[_Object]) -> list[tuple[int, _Object, tuple]]:
    """(index, object, its first unique description) of every object that can be named alone."""
    out = []
    for j, o in enumerate(objs):
        unique = [d for d in _descriptions(o) if sum(p.matches(*d) for p in objs) == 1]
        if unique:
            out.append((j, o, unique[0]))
    return out


def _multi_scene(rng: np.random.Generator, split: str, s: int, scale: float = 1.0
                 ) -> list[_Object]:
    """A scene with a planted group of 2-3 objects of one shape (one colour half the time; the
    held-out pair in heldout), 0-1 other objects of that shape and others up to 3-6 in all."""
    if split == "heldout":
        g_colour, g_shape = sorted(HELDOUT_PAIRS)[rng.integers(len(HELDOUT_PAIRS))]
        same_colour = True
    else:
        g_shape, g_colour = _draw_attrs(rng, split)
        same_colour = rng.random() < 0.5
    wanted = []
    for _ in range(int(rng.choice([2, 2, 3]))):
        colour = g_colour if same_colour else _draw_attrs(rng, split, g_shape)[1]
        wanted.append((g_shape, colour, SIZES[rng.integers(2)]))
    for _ in range(int(rng.choice([0, 1]))):
        shape, colour = _draw_attrs(rng, split, g_shape)
        wanted.append((shape, colour, SIZES[rng.integers(2)]))
    total = min(6, max(len(wanted) + 1, int(rng.integers(3, 7))))
    while len(wanted) < total:
        shape, colour = _draw_attrs(rng, split)
        wanted.append((shape, colour, SIZES[rng.integers(2)]))
    objs: list[_Object] = []
    for k in rng.permutation(len(wanted)):
        _place(rng, objs, *wanted[k], s, scale)
    for i, o in enumerate(objs):
        o.visible = o.full & _cover(objs[i + 1:])
    return objs


def _multi_exprs(objs: list[_Object], s: int, split: str) -> dict[tuple[int, ...], dict]:
    """target indices (>= 2) -> {"attribute" | "relation": [expressions]} for the scene:
    "all the / both / the two / the three" + a plural description matching exactly those, or
    "the <plural> <relation> the <landmark>" that every target clearly stands in and every
    other object fitting the description clearly does not."""
    out: dict[tuple[int, ...], dict[str, list[str]]] = {}

    def add(targets, kind, expr):
        exprs = out.setdefault(tuple(targets), {}).setdefault(kind, [])
        if expr not in exprs:
            exprs.append(expr)

    m = 0.08 * s
    landmarks = _landmarks(objs)
    for d in _scene_descriptions(objs):
        if not _mentionable(d, split):
            continue
        group = [i for i, o in enumerate(objs) if o.matches(*d)]
        if len(group) < 2:
            continue
        plural = _np_plural(*d)
        add(group, "attribute", f"all the {plural}")
        if len(group) == 2:
            add(group, "attribute", f"both {plural}")
            add(group, "attribute", f"the two {plural}")
        if len(group) == 3:
            add(group, "attribute", f"the three {plural}")
        for j, land, ld in landmarks:
            cands = [i for i in group if i != j]
            for phrase, holds in _RELATIONS.items():
                holders = [i for i in cands if holds(objs[i], land, m)]
                if len(holders) >= 2 and all(not holds(objs[i], land, -m)
                                             for i in cands if i not in holders):
                    add(holders, "relation", f"the {plural} {phrase} the {_np(*ld)}")
    return out


def _near_miss(d: tuple[str | None, str | None, str], o: _Object) -> bool:
    """The description names o but for exactly one of its words (a plausible miss)."""
    size, colour, shape = d
    wrong = (shape != o.shape) + (colour is not None and colour != o.colour) \
        + (size is not None and size != o.size)
    return wrong == 1


def _no_target_exprs(objs: list[_Object], s: int, split: str) -> dict[str, list[str]]:
    """Expressions matching no object of the scene, by kind: "attribute" ("the purple circle":
    no such object, but one that differs in one word), "plural" ("all the purple circles", the
    same descriptions), "relation" (objects fit the description, none stands in the relation to
    the landmark, all clearly not) and "ordinal" (one past the last of the group)."""
    out: dict[str, list[str]] = {"attribute": [], "plural": [], "relation": [], "ordinal": []}
    for size in (None,) + SIZES:
        for colour in (None,) + COLOUR_NAMES:
            for shape in SHAPES:
                d = (size, colour, shape)
                if (_mentionable(d, split) and not any(o.matches(*d) for o in objs)
                        and any(_near_miss(d, o) for o in objs)):
                    out["attribute"].append(f"the {_np(*d)}")
                    out["plural"].append(f"all the {_np_plural(*d)}")
    m = 0.08 * s
    landmarks = _landmarks(objs)
    descs = [d for d in _scene_descriptions(objs) if _mentionable(d, split)]
    for d in descs:
        group = [i for i, o in enumerate(objs) if o.matches(*d)]
        for j, land, ld in landmarks:
            cands = [i for i in group if i != j]
            for phrase, holds in _RELATIONS.items():
                if cands and all(not holds(objs[i], land, -m) for i in cands):
                    out["relation"].append(f"the {_np(*d)} {phrase} the {_np(*ld)}")
        if d[0] is None and 1 <= len(group) < len(_ORDINALS):  # "triangle", "red triangle"
            for side in _AXES:
                out["ordinal"].append(f"the {_ORDINALS[len(group)]} {_np(*d)} from the {side}")
    return out


def _pick(rng: np.random.Generator, kinds: list[list[str]]) -> list[str]:
    """1-3 distinct expressions, round-robin over the kinds from a random first one."""
    want = int(rng.integers(1, 4))
    first = int(rng.integers(len(kinds)))
    chosen: list[str] = []
    for n in range(4 * want):
        kind = kinds[(first + n) % len(kinds)]
        e = kind[rng.integers(len(kind))]
        if e not in chosen:
            chosen.append(e)
        if len(chosen) == want:
            break
    return chosen


def _multi_example(rng: np.random.Generator, split: str, s: int, scale: float = 1.0
                   ) -> tuple[list[_Object], list[int], list[str]]:
    while True:
        objs = _multi_scene(rng, split, s, scale)
        cands = {t: k for t, k in _multi_exprs(objs, s, split).items()
                 if all(objs[i].visible.any() for i in t)}
        if cands:
            break
    sets = sorted(cands)
    targets = sets[rng.integers(len(sets))]
    kinds = [cands[targets][k] for k in ("attribute", "relation") if k in cands[targets]]
    return objs, list(targets), _pick(rng, kinds)


def _no_target_example(rng: np.random.Generator, split: str, s: int, scale: float = 1.0
                       ) -> tuple[list[_Object], list[str]]:
    while True:
        objs, _ = _scene(rng, split, s, scale)
        kinds = [k for k in _no_target_exprs(objs, s, split).values() if k]
        if kinds:
            return objs, _pick(rng, kinds)


# --------------------------------------------------------------------------------------------
# Records.
# --------------------------------------------------------------------------------------------

def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_example(seed: int, split: str, index: int, image_size: int = 96, tokenizer=None, *,
                 multi_fraction: float = GRES_MULTI_FRACTION,
                 no_target_fraction: float = GRES_NO_TARGET_FRACTION,
                 object_scale: float = 1.0, ordinal_rate: float = 1.0,
                 max_objects: int = MAX_OBJECTS) -> dict:
    """One record (data_formats.md §7.2 fields) plus `synthetic`: the scene's objects, the
    target indices and, in a gres split, the record's kind. The fractions apply to the gres
    splits only (`gres_kind`); object_scale, ordinal_rate, max_objects: `check_style`."""
    check_style(object_scale, ordinal_rate, max_objects)
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; expected one of "
                         f"{', '.join(SPLITS + GRES_SPLITS)}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    s = image_size
    base = _gres_base(split)
    kind = None
    if split in GRES_SPLITS:
        _check_fractions(multi_fraction, no_target_fraction)
        kind = gres_kind(index, multi_fraction, no_target_fraction)
    if kind == "multi_target":
        objs, targets, sents = _multi_example(rng, base, s, object_scale)
    elif kind == "no_target":
        (objs, sents), targets = _no_target_example(rng, base, s, object_scale), []
    else:  # the ordinary record (single_target of a gres split: the same generators)
        while True:
            objs, t = _scene(rng, base, s, object_scale, int(max_objects))
            sents = _expressions(rng, objs, t, s, ordinal_rate)
            if sents and objs[t].visible.any():
                break
        targets = [t]
    img = _background(rng, s)
    for o in objs:  # painter's order: later objects occlude earlier ones
        colour = np.asarray(COLOURS[o.colour], np.float32) + rng.uniform(-12, 12, 3)
        shade = colour[None, :] + rng.normal(0, 6, (int(o.full.sum()), 3))
        img[o.full] = shade
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    t = targets[0] if targets else -1
    mask = np.zeros((s, s), bool)
    for i in targets:
        mask |= objs[i].visible
    raws = [_raw(e, rng) for e in sents]
    ident = _SPLIT_CODE[split] * _ID_STRIDE + index + 1
    rec = {
        "schema_version": 1, "dataset": "synthetic", "split_by": f"seed{seed}", "split": split,
        "ref_id": ident, "ann_id": ident if targets else -1, "image_id": ident,
        "category_id": SHAPES.index(objs[t].shape) + 1 if targets else -1,
        "image_file": f"synthetic_{split}_{index:08d}.jpg",
        "image_jpeg": _jpeg(img), "height": s, "width": s, "bbox": _bbox(mask),
        "area": np.float32(mask.sum()), "iscrowd": np.int8(0),
        "mask_count_png": _png(mask),
        "num_polygons": len(targets), "overlap_pixels": 0,
        "sent_ids": np.asarray([ident * 10 + k for k in range(len(sents))], np.int64),
        "raw": raws, "sent": list(sents),
        "synthetic": {"target": t, "targets": list(targets), "gres_kind": kind, "objects": [
            {"shape": o.shape, "colour": o.colour, "size": o.size, "cx": o.cx, "cy": o.cy, "r": o.r}
            for o in objs]},
    }
    rec.update(_instance_fields(objs, t, ident))
    if kind is not None:  # the gRefCOCO fields (records.OPTIONAL_FIELDS), gres splits only
        ids = rec["instance_ann_ids"]
        rec.update({
            "no_target": int(not targets),
            "target_ann_ids": np.asarray([ids[i] for i in targets], np.int64),
            "target_category_ids": np.asarray(
                [SHAPES.index(objs[i].shape) + 1 for i in targets], np.int32),
            "target_iscrowd": np.zeros((len(targets),), np.int8),
            "target_bboxes": np.asarray([_bbox(objs[i].visible) for i in targets],
                                        np.float32).reshape(len(targets), 4),
        })
    if tokenizer is not None:
        tok = tokenizer.batch_encode(raws, warn=False)
        rec["input_ids"] = tok.ids.astype(np.int32)
        rec["attention_mask"] = tok.attention_mask.astype(np.int8)
        rec["num_wordpieces"] = (tok.num_pieces + 2).astype(np.int32)
    return rec


def _bbox(mask: np.ndarray) -> np.ndarray:
    """[x, y, w, h] around the mask's pixels; zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return np.zeros(4, np.float32)
    return np.asarray([xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1],
                      np.float32)


def _instance_fields(objs: list[_Object], t: int, ann_id: int) -> dict:
    """The converter's --with-instances fields for every object of the scene (module docstring)."""
    return {
        "instance_ann_ids": np.asarray(
            [ann_id if i == t else INSTANCE_ID_BASE + 10 * ann_id + i for i in range(len(objs))],
            np.int64),
        "instance_category_ids": np.asarray([SHAPES.index(o.shape) + 1 for o in objs], np.int32),
        "instance_category_names": [o.shape for o in objs],
        "instance_iscrowd": np.zeros((len(objs),), np.int8),
        "instance_count_pngs": [_png(o.visible) for o in objs],
    }


def _stored(rec: dict) -> dict:
    rec.pop("synthetic")
    return rec


def generate(out_dir, num_train: int = 2000, num_val: int = 200, num_heldout: int = 200,
             image_size: int = 96, seed: int = 0, num_shards: int | None = None,
             verbose: bool = False, *, gres: bool = False,
             gres_multi_fraction: float = GRES_MULTI_FRACTION,
             gres_no_target_fraction: float = GRES_NO_TARGET_FRACTION,
             object_scale: float = 1.0, ordinal_rate: float = 1.0,
             max_objects: int = MAX_OBJECTS) -> dict[str, dict]:
    """Write the train, val and heldout splits under `out_dir`, and with `gres` also
    gres_train, gres_val and gres_heldout of the same sizes (module docstring); returns each
    split's meta. The ordinary splits do not depend on the gres arguments."""
    from magnet_jax.data import records
    from magnet_jax.data.tokenizer import load_tokenizer

    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    _check_fractions(gres_multi_fraction, gres_no_target_fraction)
    check_style(object_scale, ordinal_rate, max_objects)
    tokenizer = load_tokenizer(None)
    sizes = {"train": num_train, "val": num_val, "heldout": num_heldout}
    plan = list(sizes.items())
    if gres:
        plan += [(split, sizes[_gres_base(split)]) for split in GRES_SPLITS]
    metas = {}
    for split, n in plan:
        if n <= 0:
            continue
        start = time.perf_counter()
        kinds: list[tuple[str, int]] = []  # (gres kind, sentences) per record of a gres split

        def recs(split=split, n=n, kinds=kinds):
            for i in range(n):
                ex = make_example(seed, split, i, image_size, tokenizer,
                                  multi_fraction=gres_multi_fraction,
                                  no_target_fraction=gres_no_target_fraction,
                                  object_scale=object_scale, ordinal_rate=ordinal_rate,
                                  max_objects=max_objects)
                kinds.append((ex["synthetic"]["gres_kind"], len(ex["sent"])))
                yield _stored(ex)

        shards = num_shards or (8 if split in ("train", "gres_train") else 2)
        meta = {"dataset": "synthetic", "split_by": f"seed{seed}", "seed": seed,
                "image_size": image_size,
                "style": style_meta(object_scale, ordinal_rate, max_objects),
                "tokenizer": "bert-base-uncased (bundled vocab)",
                "max_tokens": records.MAX_TOKENS,
                # The stored count map is 0/1 (the visible part of the target, or of the
                # targets, whose visible parts do not overlap): both conventions agree.
                "mask_convention": "official",
                # Every object's visible mask, category = shape (module docstring).
                "with_instances": True,
                "categories": [{"id": i + 1, "name": sh} for i, sh in enumerate(SHAPES)],
                "heldout_pairs": sorted(map(list, HELDOUT_PAIRS)),
                "counts": {"refs": n, "images": n, "sentences": None}}
        if split in GRES_SPLITS:
            meta["gres"] = {"base_split": _gres_base(split),
                            "multi_fraction": gres_multi_fraction,
                            "no_target_fraction": gres_no_target_fraction,
                            "kind_rule": "gres_kind(index): frac(index x golden ratio) below "
                                         "no_target_fraction: no target, then multi target"}
        metas[split] = records.write_shards(recs(), out_dir, split, min(shards, n), meta=meta)
        counts = metas[split]["counts"]
        counts["sentences"] = sum(metas[split]["sentence_counts"])
        if split in GRES_SPLITS:  # the names of gRefCOCO's meta.json (grefcoco.py)
            for k in GRES_KINDS:
                counts[f"{k}_refs"] = sum(kind == k for kind, _ in kinds)
            for k in GRES_KINDS:
                counts[f"{k}_sentences"] = sum(c for kind, c in kinds if kind == k)
        records._write_json_atomic(records.meta_path(out_dir, split), metas[split])
        if verbose:
            dt = time.perf_counter() - start
            print(json.dumps({"split": split, "refs": n, "seconds": round(dt, 2),
                                  "examples_per_s": round(n / dt, 1)}), file=sys.stderr)
    return metas


def generate_kwargs(synthetic_config) -> dict:
    """`generate`'s keyword arguments from a config.data.synthetic section (ConfigDict or
    dict); the gres keys default to off for configs written before they existed."""
    get = synthetic_config.get
    return dict(num_train=int(synthetic_config["num_train"]),
                num_val=int(synthetic_config["num_val"]),
                num_heldout=int(synthetic_config["num_heldout"]),
                image_size=int(synthetic_config["image_size"]),
                seed=int(synthetic_config["seed"]),
                gres=bool(get("gres", False)),
                gres_multi_fraction=float(get("gres_multi_fraction", GRES_MULTI_FRACTION)),
                gres_no_target_fraction=float(get("gres_no_target_fraction",
                                                  GRES_NO_TARGET_FRACTION)),
                **style_kwargs(synthetic_config))


def style_kwargs(synthetic_config) -> dict:
    """make_example's style arguments (check_style) from a config.data.synthetic section or a
    meta.json "style"; keys a run was stored without take the base data's values."""
    return {key: type(base)(synthetic_config.get(key, base))
            for key, base in style_meta().items()}


def style_meta(object_scale: float = 1.0, ordinal_rate: float = 1.0,
               max_objects: int = MAX_OBJECTS) -> dict:
    """The generator settings a meta.json records (data written before them: the defaults)."""
    return {"object_scale": float(object_scale), "ordinal_rate": float(ordinal_rate),
            "max_objects": int(max_objects)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m magnet_jax.data.synthetic",
                                description="Write the built-in synthetic referring dataset.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--num-heldout", type=int, default=200)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=None, help="shards per split")
    p.add_argument("--gres", action="store_true",
                   help="also write gres_train, gres_val and gres_heldout (generalised RIS: "
                        "multi-target and no-target expressions)")
    p.add_argument("--gres-multi-fraction", type=float, default=GRES_MULTI_FRACTION)
    p.add_argument("--gres-no-target-fraction", type=float, default=GRES_NO_TARGET_FRACTION)
    p.add_argument("--object-scale", type=float, default=1.0,
                   help="multiplies every object's radius (check_style)")
    p.add_argument("--ordinal-rate", type=float, default=1.0,
                   help="share of records that may use an ordinal expression")
    p.add_argument("--max-objects", type=int, default=MAX_OBJECTS,
                   help="most objects in an ordinary scene (3-6)")
    args = p.parse_args(argv)
    generate(Path(args.out), args.num_train, args.num_val, args.num_heldout, args.image_size,
             args.seed, args.num_shards, verbose=True, gres=args.gres,
             gres_multi_fraction=args.gres_multi_fraction,
             gres_no_target_fraction=args.gres_no_target_fraction,
             object_scale=args.object_scale, ordinal_rate=args.ordinal_rate,
             max_objects=args.max_objects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
