"""magnet_jax: MagNet (Mask Grounding for Referring Image Segmentation) in JAX and Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `magnet_jax.Predictor` without importing jax at `import magnet_jax`.
    if name == "Predictor":
        from magnet_jax.predict import Predictor
        return Predictor
    raise AttributeError(f"module 'magnet_jax' has no attribute {name!r}")
