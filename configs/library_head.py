"""ReLU against softplus NB library-size heads (`model.library_activation`) on a starter: its ablation config
(configs/ablations/<starter>.py: 20 % of the pairs hidden, at most 100 epochs), 3 seeds each; compare held-out
FOSCTTM and the runs' `library_heads` in summary.json.

  python -m clue_jax.sweep --config=configs/library_head.py:cite --workdir=runs/library_head_cite
  python -m clue_jax.sweep --config=configs/library_head.py:multiome --workdir=runs/library_head_multiome
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import grid

PRECISION = config_lib.load_module(pathlib.Path(__file__).resolve().parent / "precision.py")
get_config = PRECISION.get_config  # The starter's ablation config.


def get_sweep():
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), grid.axis("model.library_activation", ("relu", "softplus")))
