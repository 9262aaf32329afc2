"""The contrastive term (loss.lam_contrastive, off in the faithful config) against the faithful config on a dataset:
the dataset's ablation config as configs/precision.py picks it (the starters hide 20 % of the pairs and train at most
100 epochs, PBMC hides 10 % and trains at most 20) at lam_contrastive 0 (faithful), 0.2 and 1.0, 3 seeds each (the
same hidden pairs per seed); compare held-out FOSCTTM and match probability in the sweep's summary.

  python -m clue_jax.sweep --config=configs/contrastive.py:pbmc --workdir=runs/contrastive_pbmc
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import grid

PRECISION = config_lib.load_module(pathlib.Path(__file__).resolve().parent / "precision.py")


def get_config(dataset: str = "pbmc"):
  return PRECISION.get_config(dataset)


def get_sweep():
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), grid.axis("loss.lam_contrastive", (0.0, 0.2, 1.0)))
