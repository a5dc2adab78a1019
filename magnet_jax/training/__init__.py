"""Training: optimiser (optimizer.py); state, step and loop follow (style.md §2)."""
