"""Evaluation: metric accumulation (metrics.py); protocols and the CLI follow (style.md §2)."""
