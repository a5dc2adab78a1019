"""The optax chain of the training recipe (`training_objectives.md` §6.2, `jax_stack.md` §3.3).

    zero frozen grads -> [clip_by_global_norm] -> per group AdamW(poly schedule x group mult)
    [-> optax.MultiSteps when accumulation_steps > 1]

- AdamW = `optax.adamw`: PyTorch's AdamW (bias correction, eps added to sqrt(v_hat), decoupled
  decay lr * wd * p).
- Groups: "backbone" = the pretrained trunks (image_model/patch_embed, image_model/layers_s/
  blocks_j, image_model/layers_s/downsample, language_model/embeddings, language_model/encoder,
  the CLIP towers clip_vision/, clip_text/ of CLIP-based methods and the ViLT encoder vilt/
  of MaIL),
  "new" = everything else, "frozen" = BERT parameters that `text_trainable` leaves out.
  Frozen parameters get `optax.set_to_zero()`: no update and no weight decay, like parameters
  left out of a PyTorch optimiser; their gradients are also zeroed before clipping so they do
  not count in the global norm.
- Decay mask "magnet_jax": no decay for norm scales/biases, every bias, relative-position tables,
  level/query embeddings and embedding tables. "lavt": LAVT's rule on the Swin trunk only (its
  norms and relative-position tables); every other parameter decays.
- Schedule: optional linear warmup 0 -> lr over `warmup_steps`, then "poly": lr * (1 -
  t/T')^power to `end_lr` over the remaining T' = total_steps - warmup_steps, or "step": lr
  multiplied by `step_factor` at each fraction of total_steps in `step_milestones` (CRIS: x 0.1
  at epoch 35 of 50 = 0.7). Steps count optimiser updates (with accumulation, one update per
  `accumulation_steps` calls).
- `flat_global_norm` (set by the training loop on CPU meshes that replicate the parameters): the
  global norm is one reduction over the concatenated leaves instead of one per leaf. The
  result is the same up to summation order; XLA's CPU compiler otherwise emits 2-4 kernels per
  leaf for it (docs/benchmarks.md, "Compile time").
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

WD_MASKS = ("magnet_jax", "lavt")
SCHEDULES = ("poly", "step")
# Pretrained towers of CLIP- and ViLT-based methods: their whole subtree is "backbone".
_PRETRAINED_TOWERS = ("clip_vision", "clip_text", "vilt")
TEXT_TRAINABLE = ("lavt", "all", "none")
BACKBONE, NEW, FROZEN = "backbone", "new", "frozen"

# Leaves that never decay under "magnet_jax" (flax names: norms hold scale/bias, Embed holds
# embedding).
_NO_DECAY_LEAVES = frozenset({"bias", "scale", "embedding", "relative_position_bias_table",
                              "absolute_pos_embed", "level_embed", "query_feat", "query_embed"})
_BERT_LAYER = re.compile(r"layer_(\d+)$")
_SWIN_BLOCK = re.compile(r"blocks_\d+$")
_SWIN_STAGE = re.compile(r"layers_\d+$")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Defaults follow §6.2 (LAVT's recipe): AdamW 5e-5, wd 1e-2, poly 0.9, no warmup/clip."""

    lr: float = 5e-5                    # peak learning rate of the "new" group
    weight_decay: float = 1e-2          # decoupled, multiplied by the current lr (PyTorch AdamW)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    total_steps: int = 53_000           # optimiser updates, warmup included (RefCOCO: 40 x 1325)
    warmup_steps: int = 0               # linear 0 -> lr; 0 = LAVT's schedule
    schedule: str = "poly"              # "poly" | "step"
    power: float = 0.9                  # poly decay exponent
    end_lr: float = 0.0
    step_milestones: tuple[float, ...] = (0.7,)   # "step": fractions of total_steps
    step_factor: float = 0.1            # "step": lr multiplier at each milestone
    clip_global_norm: float | None = None   # None or 0 = no clipping
    accumulation_steps: int = 1         # > 1 wraps the chain in optax.MultiSteps (mean grads)
    backbone_lr_mult: float = 1.0       # lr multiplier of the pretrained trunks
    wd_mask: str = "magnet_jax"         # "magnet_jax" | "lavt"
    text_trainable: str = "lavt"        # "lavt" (embeddings + last 2 layers frozen) | "all" | "none"
    bert_num_layers: int | None = None  # None = count language_model/encoder/layer_* in params
    flat_global_norm: bool = False      # global norm on one concatenated vector (replicated params)

    def __post_init__(self):
        if self.wd_mask not in WD_MASKS:
            raise ValueError(f"unknown wd_mask {self.wd_mask!r}; expected one of "
                             f"{', '.join(WD_MASKS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of "
                             f"{', '.join(SCHEDULES)}")
        if any(not 0 < m < 1 for m in self.step_milestones) or self.step_factor < 0:
            raise ValueError(f"step_milestones must lie in (0, 1) and step_factor be >= 0, got "
                             f"{tuple(self.step_milestones)} and {self.step_factor}")
        if self.text_trainable not in TEXT_TRAINABLE:
            raise ValueError(f"unknown text_trainable {self.text_trainable!r}; expected one of "
                             f"{', '.join(TEXT_TRAINABLE)}")
        if self.total_steps < 1 or not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
                             f"{self.total_steps} and {self.warmup_steps}")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.lr < 0 or self.weight_decay < 0 or self.backbone_lr_mult < 0:
            raise ValueError("lr, weight_decay and backbone_lr_mult must be >= 0")
        if self.clip_global_norm is not None and self.clip_global_norm < 0:
            raise ValueError(f"clip_global_norm must be >= 0 or None, got {self.clip_global_norm}")


def as_optimizer_config(cfg: Any = None) -> OptimizerConfig:
    """An OptimizerConfig from None, itself, a mapping or a ConfigDict (unknown keys rejected)."""
    if cfg is None:
        return OptimizerConfig()
    if isinstance(cfg, OptimizerConfig):
        return cfg
    items = dict(cfg.items()) if hasattr(cfg, "items") else None
    if items is None:
        raise TypeError(f"optimizer config must be a mapping or ConfigDict, got {type(cfg)}")
    names = [f.name for f in dataclasses.fields(OptimizerConfig)]
    for key in items:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown optimizer config key {key!r}{hint}")
    if "step_milestones" in items:
        items["step_milestones"] = tuple(float(m) for m in items["step_milestones"])
    return OptimizerConfig(**items)


def _names(path: tuple) -> tuple[str, ...]:
    """jax key path -> plain names, without a leading 'params' collection."""
    # GetAttrKey entries (e.g. `.value` of a boxed nn.Partitioned) are not parameter names.
    out = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path
                if not isinstance(k, jax.tree_util.GetAttrKey))
    return out[1:] if out and out[0] == "params" else out


def _is_backbone(p: tuple[str, ...]) -> bool:
    if p and p[0] in _PRETRAINED_TOWERS:
        return True
    if len(p) >= 2 and p[0] == "image_model":
        if p[1] == "patch_embed":
            return True
        return (_SWIN_STAGE.match(p[1]) is not None and len(p) >= 3
                and (_SWIN_BLOCK.match(p[2]) is not None or p[2] == "downsample"))
    return len(p) >= 2 and p[0] == "language_model" and p[1] in ("embeddings", "encoder")


def _is_frozen(p: tuple[str, ...], mode: str, num_layers: int) -> bool:
    if mode == "all" or len(p) < 2 or p[0] != "language_model":
        return False
    if p[1] == "embeddings":
        return True
    if p[1] != "encoder":
        return False
    if mode == "none":
        return True
    m = _BERT_LAYER.match(p[2]) if len(p) >= 3 else None
    return m is not None and int(m.group(1)) >= num_layers - 2   # LAVT trains layers 0..L-3


def _decays(p: tuple[str, ...], mode: str) -> bool:
    if mode == "magnet_jax":
        return p[-1] not in _NO_DECAY_LEAVES and not any("norm" in n.lower() for n in p[:-1])
    # LAVT: no decay only for backbone (Swin trunk) names containing norm, absolute_pos_embed or
    # relative_position_bias_table; PWAM/pyramid/mixer norms are named f_query.1, W.1, ... in
    # PyTorch and so still decay, as do BERT and head norms.
    if not p or p[0] != "image_model":
        return True
    if p[-1] in ("relative_position_bias_table", "absolute_pos_embed"):
        return False
    parent = p[-3] if len(p) >= 3 else ""
    module = p[-2] if len(p) >= 2 else ""
    swin_norm = ((module == "norm" and parent in ("patch_embed", "downsample"))
                 or (module in ("norm1", "norm2") and _SWIN_BLOCK.match(parent) is not None))
    return not swin_norm


def _count_bert_layers(params: Any) -> int:
    found = [int(m.group(1)) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             for p in [_names(path)]
             if len(p) >= 3 and p[:2] == ("language_model", "encoder")
             and (m := _BERT_LAYER.match(p[2])) is not None]
    return max(found) + 1 if found else 0


def decay_mask(params: Any, mode: str = "magnet_jax") -> Any:
    """Tree of bools (True = weight decay) with the structure of `params`."""
    if mode not in WD_MASKS:
        raise ValueError(f"unknown wd_mask {mode!r}; expected one of {', '.join(WD_MASKS)}")
    # tree_map_with_path keeps optax.MaskedNode (no leaves) in place inside multi_transform.
    return jax.tree_util.tree_map_with_path(lambda path, _: _decays(_names(path), mode), params)


def param_labels(params: Any, text_trainable: str = "lavt",
                 bert_num_layers: int | None = None) -> Any:
    """Tree of "backbone" / "new" / "frozen" labels with the structure of `params`."""
    if text_trainable not in TEXT_TRAINABLE:
        raise ValueError(f"unknown text_trainable {text_trainable!r}; expected one of "
                         f"{', '.join(TEXT_TRAINABLE)}")
    n = _count_bert_layers(params) if bert_num_layers is None else bert_num_layers

    def label(path, _):
        p = _names(path)
        if _is_frozen(p, text_trainable, n):
            return FROZEN
        return BACKBONE if _is_backbone(p) else NEW

    return jax.tree_util.tree_map_with_path(label, params)


def global_norm(tree: Any, flat: bool = False) -> jax.Array:
    """The l2 norm of all of `tree`'s leaves together (float32).

    flat: one reduction over the leaves concatenated into one vector. XLA's CPU compiler emits
    2-4 kernels per leaf for the per-leaf sums (about 1,650 of the CI-sized train step's 11,400;
    docs/benchmarks.md), the flat form a few. Use it only where the leaves are replicated: a
    sharded leaf would be gathered to join the vector.
    """
    leaves = jax.tree.leaves(tree)
    if not flat or not leaves:
        return optax.tree.norm(tree)
    vector = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(vector)))


def clip_by_global_norm(max_norm: float, flat: bool = False) -> optax.GradientTransformation:
    """optax.clip_by_global_norm (same state, same rule: unchanged below max_norm, else scaled
    by max_norm / norm) with the norm of `global_norm(..., flat)`."""
    if not flat:
        return optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates, flat=True)
        keep = norm < max_norm
        return jax.tree.map(
            lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm),
            updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_schedule(cfg: Any = None) -> optax.Schedule:
    """Linear warmup (optional) then polynomial decay to end_lr at total_steps, or steps."""
    c = as_optimizer_config(cfg)
    if c.schedule == "step":
        boundaries = {max(1, round(m * c.total_steps) - c.warmup_steps): c.step_factor
                      for m in c.step_milestones}
        decay = optax.piecewise_constant_schedule(c.lr, boundaries)
    else:
        decay = optax.polynomial_schedule(init_value=c.lr, end_value=c.end_lr, power=c.power,
                                          transition_steps=c.total_steps - c.warmup_steps)
    if c.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, c.lr, c.warmup_steps)
    return optax.join_schedules([warmup, decay], [c.warmup_steps])


def leaf_treatment(params: Any, cfg: Any = None) -> Any:
    """Tree of "label/decays" strings per leaf of the per-layer `params`: leaves that agree in
    it can share one stacked array in the train state (training/layout.py)."""
    c = as_optimizer_config(cfg)
    return jax.tree.map(lambda label, decays: f"{label}/{decays}",
                        param_labels(params, c.text_trainable, c.bert_num_layers),
                        decay_mask(params, c.wd_mask))


def _first_of_group(values):
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"a stacked parameter group mixes optimiser treatments {set(values)}")
    return values[0]


def _repeat(leaf, count):
    return [leaf] * count


def make_optimizer(params: Any, cfg: Any = None,
                   layout: Any = None) -> optax.GradientTransformation:
    """The full training optimiser for `params` (only its tree paths are used).

    layout: the `training.layout.StackedLayout` that `params` are stored in (None: per
    layer); the groups and decay masks are those of the per-layer tree.
    """
    c = as_optimizer_config(cfg)

    def per_layer(rule, tree):
        """rule's tree of the per-layer view of `tree`, in `tree`'s layout."""
        if not layout:
            return rule(tree)
        return layout.stack(rule(layout.unstack(tree, _repeat)), _first_of_group)

    labels = per_layer(lambda t: param_labels(t, c.text_trainable, c.bert_num_layers), params)
    base = make_schedule(c)

    def mask(p):
        return per_layer(lambda t: decay_mask(t, c.wd_mask), p)

    def adamw(mult: float) -> optax.GradientTransformation:
        schedule = base if mult == 1.0 else (lambda step: base(step) * mult)
        return optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                           mask=mask)

    train_or_frozen = jax.tree.map(lambda l: FROZEN if l == FROZEN else "train", labels)
    parts = [optax.multi_transform({"train": optax.identity(), FROZEN: optax.set_to_zero()},
                                   train_or_frozen)]
    if c.clip_global_norm:
        parts.append(clip_by_global_norm(c.clip_global_norm, c.flat_global_norm))
    parts.append(optax.multi_transform(
        {BACKBONE: adamw(c.backbone_lr_mult), NEW: adamw(1.0), FROZEN: optax.set_to_zero()},
        labels))
    tx = optax.chain(*parts)
    if c.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=c.accumulation_steps).gradient_transformation()
    return tx


__all__ = ["OptimizerConfig", "as_optimizer_config", "clip_by_global_norm", "decay_mask",
           "global_norm", "leaf_treatment", "make_optimizer", "make_schedule", "param_labels"]
