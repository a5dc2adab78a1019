"""MagNet configs: `--config configs/magnet.py:ARG`, overridable as `--config.key=value`.

ARG                 model, data and recipe
---                 ------------------------------------------------------------------------
synthetic           (default of `python -m magnet_jax.train`) the CI-sized model at 64×64 on
                    the built-in synthetic data (three objects a scene, 1.5× the base size,
                    ordinals in 16-18 % of val), generated into WORKDIR on first use,
                    language gates trainable;
                    trains in about 20 minutes on a 2-core CPU (docs/results.md).
refcoco, refcoco+, refcocog_umd, refcocog_google
                    Swin-B (window 12) + BERT-base at 480×480 on converted REFER data
                    (`--config.data.dir`), the recipe of training_objectives.md §6.2: AdamW
                    5e-5, poly decay, global batch 32, 40 epochs, L_seg + 0.5 L_MG + 0.5 L_CAL.
                    Initialise from local checkpoints with --config.init.swin / .bert.
official            the released architecture (refcoco recipe).
all448              the same at 448×448 (magnet_all.pth) on the mixture RefCOCO (unc) +
                    RefCOCO+ (unc) + G-Ref (umd), weighted by their train refs, every image
                    of their val/test splits and of G-Ref (google) val removed from training
                    (docs/data.md "Mixtures"). Set --config.data.root=DIR, the directory of
                    the converted refcoco_unc/, refcocop_unc/, refcocog_umd/, refcocog_google/.
swin_tiny           Swin-T (window 7) + BERT-base at 224×224: a reduced official-layout model.
tiny                the CI-sized model of every test (64×64), synthetic recipe on the base
                    synthetic data, official gate init.
grefcoco            generalised RIS (gRefCOCO; `python -m magnet_jax.data.grefcoco`): the
                    refcoco recipe at 480 with the class head trained as a no-target head
                    (loss.class_weight 2) and answering "no target" above
                    model.no_target_threshold 0.5; GRES metrics on val / testA / testB.
synthetic_gres      generalised RIS on the synthetic data: the synthetic recipe on its
                    gres_train / gres_val splits (multi-target and no-target sentences), with
                    the no-target head of `grefcoco` (docs/results.md).

Per-dataset files (configs/refcoco.py, ...) are this file with their ARG fixed.
"""

from __future__ import annotations

import ml_collections

from magnet_jax.models import presets

REFER_480 = ("refcoco", "refcoco+", "refcocog_umd", "refcocog_google")
OFFICIAL_480 = ("official",) + REFER_480
SMALL = ("synthetic", "tiny")
GRES = ("grefcoco", "synthetic_gres")
KNOWN = SMALL + OFFICIAL_480 + ("all448", "swin_tiny") + GRES
# Refs in each train split (data_formats.md §1.4): one epoch = one pass over the refs.
TRAIN_REFS = {"refcoco": 42_404, "refcoco+": 42_278, "refcocog_umd": 42_226,
              "refcocog_google": 44_822}
EVAL_SPLITS = {"refcoco": ("val", "testA", "testB"), "refcoco+": ("val", "testA", "testB"),
               "refcocog_umd": ("val", "test"), "refcocog_google": ("val",)}
# all448: converted dirs (one `python -m magnet_jax.data.convert --out` each) under data.root.
ALL448_MIXTURE = ("refcoco_unc", "refcocop_unc", "refcocog_umd")
ALL448_EXCLUDE_EVAL_OF = ("refcocog_google",)


def model_config(arg: str) -> ml_collections.ConfigDict:
    if arg in OFFICIAL_480 or arg == "grefcoco":
        return presets.official_model_config(480)
    if arg == "all448":
        return presets.official_model_config(448)
    if arg == "swin_tiny":
        return presets.swin_model_config("tiny", window_size=7, image_size=224)
    if arg in SMALL or arg == "synthetic_gres":
        return presets.tiny_model_config(64)
    raise ValueError(f"unknown config argument {arg!r}; known: {', '.join(KNOWN)}")


def _refer_recipe(config: ml_collections.ConfigDict, dataset: str) -> None:
    """training_objectives.md §6.2 for one REFER dataset."""
    config.data.dir = ""                      # required: a converted dataset (data.convert)
    config.data.eval_splits = ("val",)        # the test splits: `python -m magnet_jax.evaluate`
    config.train.global_batch_size = 32
    config.train.num_epochs = 40
    config.train.epoch_refs = TRAIN_REFS[dataset]
    config.train.log_every_steps = 50
    config.eval.every_steps = 1325            # about one epoch
    config.eval.batch_size = 32
    config.checkpoint.every_steps = 1325
    config.optim.lr = 5e-5
    config.optim.text_trainable = "lavt"


def _all448_recipe(config: ml_collections.ConfigDict) -> None:
    """The refcoco recipe on the RefCOCO + RefCOCO+ + G-Ref (umd) mixture."""
    _refer_recipe(config, "refcoco")
    config.data.root = ""                     # required: the dir of the converted datasets
    config.data.mixture = ALL448_MIXTURE      # weights: the kept train refs of each
    config.data.exclude_eval_of = ALL448_EXCLUDE_EVAL_OF
    config.train.epoch_refs = 0               # one epoch = the mixture's refs after the filter
    # About one epoch at batch 32 (127k train refs before the overlap filter; `python -m
    # magnet_jax.data.mixture --report` counts what it removes).
    config.eval.every_steps = 3750
    config.checkpoint.every_steps = 3750
    config.checkpoint.best_metric = "refcoco/val/oIoU"


def _no_target_head(config: ml_collections.ConfigDict) -> None:
    """Generalised RIS: the Mask2Former class head of query 0 learns "no target" (class 0)
    from the records' no_target flags, and inference empties the mask above the threshold."""
    config.loss.class_weight = 2.0            # Mask2Former's class weight
    config.model.no_target_threshold = 0.5


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = arg
    config.seed = 0
    config.model = model_config(arg)
    config.model.training_heads = True        # Mask Grounding and CAL read l_4' and lang_proj
    # Generalised RIS: > 0 answers "no target" where the class head's no-object probability
    # exceeds it (train that head with loss.class_weight > 0 on data with no-target sentences).
    config.model.no_target_threshold = 0.0

    # Data: converted REFER shards (data.convert) or the built-in synthetic set.
    config.data = ml_collections.ConfigDict(dict(
        dir="",                  # converted data; "" = synthetic data generated under WORKDIR
        train_split="train",
        eval_splits=("val",),
        convention="official",   # mask convention (data_formats.md §2)
        sample="ref",            # "ref": one random sentence per ref per epoch | "sentence"
        augment=False,           # mild crop/colour; flips skip left/right sentences
        num_workers=0,           # grain worker processes (0 = decode in this process)
        read_threads=2,
        prefetch=8,
        seed=0,                  # shuffle / sentence / token-masking seed (model seed apart)
        # Several datasets at once (magnet_jax/data/mixture.py, docs/data.md "Mixtures"):
        # entries "DIR" or ("DIR", weight); () = train on data.dir alone.
        mixture=(),
        root="",                 # relative mixture / exclude_eval_of dirs resolve under it
        exclude_eval_of=(),      # more dirs whose val/test images are removed from training
        mixture_force_mixed_conventions=False,   # allow datasets of different mask conventions
        synthetic=ml_collections.ConfigDict(dict(
            num_train=4000, num_val=300, num_heldout=300, image_size=64, seed=0,
            # Generalised RIS: also write gres_train / gres_val / gres_heldout (multi- and
            # no-target expressions, docs/data.md); train/val/heldout are the same either way.
            gres=False, gres_multi_fraction=0.25, gres_no_target_fraction=0.15,
            # Object radius x object_scale; ordinal_rate: share of records that may use an
            # ordinal expression; max_objects: most objects in a scene, 3-6
            # (synthetic.check_style). 1, 1, 6 = the generator's base data.
            object_scale=1.0, ordinal_rate=1.0, max_objects=6)),
    ))
    config.train = ml_collections.ConfigDict(dict(
        global_batch_size=16,
        num_steps=0,             # 0 = num_epochs × epoch_refs / global_batch_size
        num_epochs=0,
        epoch_refs=0,            # 0 = the train split's ref count from meta.json
        accumulation_steps=1,    # microbatches per step, summed inside the jitted step
        # The train state stores each stack of layers the model scans over as one array
        # (magnet_jax/training/layout.py; checkpoints stay per layer): fewer leaves for the
        # optimiser, a smaller graph to compile. False = one leaf per layer parameter.
        stack_layers=True,
        compute_dtype="float32",  # "bfloat16": bf16 activations, fp32 master weights and losses
        mesh_data=-1,            # -1 = all devices / fsdp
        mesh_fsdp=1,
        log_every_steps=25,
        progress_bar=True,
        stop_on_nonfinite=True,
        max_runtime_minutes=0.0,  # 0 = no limit; > 0 saves and stops when exceeded
    ))
    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, weight_decay=1e-2, warmup_steps=100, power=0.9, end_lr=0.0,
        clip_global_norm=1.0, backbone_lr_mult=1.0, wd_mask="magnet_jax",
        text_trainable="all", b1=0.9, b2=0.999, eps=1e-8))
    config.loss = ml_collections.ConfigDict(dict(
        kind="bce_dice", bce_weight=5.0, dice_weight=5.0, class_weight=0.0,
        deep_supervision=True))
    config.mg = ml_collections.ConfigDict(dict(
        weight=0.5,              # λ_MG; 0 turns Mask Grounding off
        p_select=0.15, p_mask=0.9, p_random=0.0, min_selected=0,
        max_predictions=6,       # vocabulary logits at ≤ 6 selected tokens per sentence (0 = all)
        depth=2, num_heads=12, intermediate=3072, mask_encoder="occupancy", dropout=0.1))
    config.cal = ml_collections.ConfigDict(dict(
        weight=0.5,              # λ_CAL; 0 turns the alignment loss off
        p2t="bce", temperature=0.07, w_p2t=1.0, w_p2p=1.0, num_fg=512, num_bg=512))
    config.eval = ml_collections.ConfigDict(dict(
        every_steps=500, batch_size=50, num_overlays=8, at_end=True))
    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=500, max_to_keep=2, keep_best=True, best_metric="val/oIoU",
        async_save=True))
    config.init = ml_collections.ConfigDict(dict(
        swin="",                 # local Swin checkpoint (.pth / .safetensors; weights.swin)
        bert="",                 # local BERT checkpoint (weights.bert)
        params=""))              # a converted magnet_jax params directory (convert.py)

    if arg in REFER_480:
        _refer_recipe(config, arg)
        config.data.eval_splits = ("val",)
    elif arg == "all448":
        _all448_recipe(config)
    elif arg in ("official", "swin_tiny"):
        _refer_recipe(config, "refcoco")
    elif arg == "grefcoco":
        _refer_recipe(config, "refcoco")
        config.data.convention = "union"      # gRefCOCO's masks: the union of the targets
        config.data.eval_splits = ("val",)    # testA / testB: `python -m magnet_jax.evaluate`
        config.checkpoint.best_metric = "val/gres/gIoU"
        _no_target_head(config)
    elif arg == "synthetic_gres":
        _synthetic_recipe(config)
        config.data.synthetic.gres = True     # also writes the gres_* splits
        config.data.train_split = "gres_train"
        config.data.eval_splits = ("gres_val", "gres_heldout")
        config.checkpoint.best_metric = "gres_val/gres/gIoU"
        _no_target_head(config)
    elif arg in SMALL:
        _synthetic_recipe(config)
        if arg == "synthetic":
            _first_run_default(config)
    return config


def _first_run_default(config: ml_collections.ConfigDict) -> None:
    """What `python -m magnet_jax.train` trains (docs/results.md, "The first run"): scenes of
    three objects 1.5x the generator's base radius (most with a distractor of the target's
    shape), ordinals offered in half of the records that have one (16-18 % of val sentences),
    and language-side fusion gates that can train (official zeros never leave zero, so vision
    never reaches the words). Unrolled layers: this small model's CPU step runs 1.1x faster
    than scanned (whose batched pyramid branches pad every scale to the 6x6 grid), for ~25 s
    more compilation (docs/benchmarks.md, "Compile time", 2026-12-08); the
    parameters are the same."""
    config.data.synthetic.object_scale = 1.5
    config.data.synthetic.max_objects = 3
    config.data.synthetic.ordinal_rate = 0.5
    # 2,000 steps with two evaluations (1,800 with three fell 0.001 short of val mIoU 0.60):
    # 19.6 min from a fresh clone on the 2-core CPU, cold cache (docs/results.md).
    config.train.num_steps = 2000
    config.eval.every_steps = 1000
    config.checkpoint.every_steps = 1000
    config.model.fusion.lang_gate_init = "normal"
    config.model.fusion.lang_pwam_mask = "binary"
    config.model.scan_layers = False


def _synthetic_recipe(config: ml_collections.ConfigDict) -> None:
    config.data.eval_splits = ("val", "heldout")
    config.mg.update(dict(depth=1, num_heads=2, intermediate=128))
    config.cal.update(dict(num_fg=64, num_bg=64))
    # 1800 steps of 16 fit the 20-minute budget of a 2-core CPU (docs/results.md).
    config.train.num_steps = 1800
    config.eval.every_steps = 600
    config.checkpoint.every_steps = 600
