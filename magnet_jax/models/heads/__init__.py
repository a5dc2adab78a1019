"""Training-only heads: Mask Grounding predictor (mask_grounding.py), CAL projections."""
