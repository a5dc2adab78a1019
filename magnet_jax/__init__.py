"""magnet_jax: MagNet (Mask Grounding for Referring Image Segmentation) in JAX and Flax."""

__version__ = "0.1.0"
