"""MagNet (Chng et al., CVPR 2024): the interleaved Swin/BERT encoder with the Mask2Former
decoder (models/magnet.py, shared with the methods built on its trunk), trained with
segmentation + Mask Grounding + cross-modal alignment (objectives.py)."""

from magnet_jax.methods.base import Method, infer_with_no_target
from magnet_jax.methods.magnet.objectives import make_objective
from magnet_jax.models import build_magnet

METHOD = Method(
    name="magnet",
    description="MagNet: Mask Grounding and cross-modal alignment on the LAVT-style trunk",
    build_model=build_magnet,
    make_objective=make_objective,
    config_sections=("mg", "cal"),
    # no_target_threshold: the class head as a no-target head (generalised RIS).
    model_sections=("decoder", "no_target_threshold"),
    infer_no_target=infer_with_no_target,
)
