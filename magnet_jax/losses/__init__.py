"""Losses every method can use: segmentation (training_objectives.md §2). A method's own losses
live in its folder (methods/magnet/: Mask Grounding §3.3, cross-modal alignment §5)."""

from magnet_jax.losses.segmentation import segmentation_loss

__all__ = ["segmentation_loss"]
