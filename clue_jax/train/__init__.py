"""Training: the jitted step, schedule, checkpoints, sharding and the loop; `python -m clue_jax.train`."""
