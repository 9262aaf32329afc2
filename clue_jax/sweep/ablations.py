"""The ablation grid of configs/ablations/: the full model, and one part of it removed at a time."""

import ml_collections

from clue_jax.sweep import grid

SEEDS = (0, 1, 2)


def settings(config: ml_collections.ConfigDict) -> list[dict]:
  """Full; no adversarial alignment; no cosine alignment; no joint-cross; no real-cross; no KL; no batch covariate;
  no modality-specific subspaces (one latent shared by all modalities)."""
  no_batch = {f"data.modalities.{name}.batch_key": "" for name in config.data.modalities}
  return [
      {},
      {"loss.lam_align": 0.0},
      {"loss.lam_cos": 0.0},
      {"loss.lam_joint_cross": 0.0},
      {"loss.lam_real_cross": 0.0},
      {"loss.lam_kl": 0.0},
      no_batch | {"model.shared_batches": False},
      {"model.shared_latent": True},
  ]


def sweep(config: ml_collections.ConfigDict) -> list[dict]:
  """Every setting once per seed, seed-major: after a third of the grid every setting has one finished run."""
  return grid.product(grid.axis(grid.SEED, SEEDS), settings(config))
