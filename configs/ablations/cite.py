"""Ablations on the BMMC CITE starter: configs/cite.py with 20 % of the pairs hidden (held-out FOSCTTM) and at most
100 epochs, for 8 settings x 3 seeds (clue_jax/sweep/ablations.py).

  python -m clue_jax.sweep --config=configs/ablations/cite.py --workdir=runs/ablations_cite
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import ablations

BASE = config_lib.load_module(pathlib.Path(__file__).resolve().parent.parent / "cite.py")


def get_config():
  config = BASE.get_config()
  config.data.heldout_pairs = 0.2
  config.train.auto_epoch_cap = 100
  return config


def get_sweep():
  return ablations.sweep(get_config())
