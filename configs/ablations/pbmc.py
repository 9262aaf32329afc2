"""Ablations on the partially paired PBMC data: configs/pbmc.py (10 % of the pairs hidden) with at most 20 epochs
(burn-in 4; 24 runs of 100 epochs would take ~6 h on a 2-core CPU) for 8 settings x 3 seeds (clue_jax/sweep/ablations.py).
`configs/ablations/pbmc.py:competition` uses the competition sizes.

  python -m clue_jax.sweep --config=configs/ablations/pbmc.py --workdir=runs/ablations_pbmc
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import ablations

BASE = config_lib.load_module(pathlib.Path(__file__).resolve().parent.parent / "pbmc.py")


def get_config(preset: str = "defaults"):
  config = BASE.get_config(preset)
  config.train.max_epochs = 20
  return config


def get_sweep():
  return ablations.sweep(get_config())
