"""Training objectives (training_objectives.md): segmentation (§2), Mask Grounding (§3.3),
cross-modal alignment (§5)."""

from magnet_jax.losses.alignment import cal_loss, downsample_labels, p2p_loss, p2t_loss
from magnet_jax.losses.mask_grounding import mask_grounding_loss
from magnet_jax.losses.segmentation import segmentation_loss

__all__ = ["cal_loss", "downsample_labels", "mask_grounding_loss", "p2p_loss", "p2t_loss",
           "segmentation_loss"]
