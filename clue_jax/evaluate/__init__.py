"""Scores, matching, prediction and plots of embeddings; `python -m clue_jax.evaluate` re-scores a finished run."""
