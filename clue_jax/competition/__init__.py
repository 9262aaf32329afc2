"""The NeurIPS 2021 competition: its task files, the two-stage recipe and the official scores;
`python -m clue_jax.competition`."""
