"""Config grids, one training process per point, summaries and the ablation grids; `python -m clue_jax.sweep`."""
