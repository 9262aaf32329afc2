"""Large batches against the faithful batch 128 on a dataset's ablation config (configs/ablations/<name>.py, as
configs/precision.py picks it): batch 1024 with the rate as given (the reference's rule), with square-root or
linear learning-rate scaling after a 2-epoch warm-up, and with Adam at the square-root rate, 3 seeds each (the same
splits and hidden pairs per seed); compare held-out-pair and unseen-cell FOSCTTM in the sweep's summary.

  python -m clue_jax.sweep --config=configs/large_batch.py:pbmc --workdir=runs/large_batch_pbmc
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import grid

PRECISION = config_lib.load_module(pathlib.Path(__file__).resolve().parent / "precision.py")
LARGE = {"train.batch_size": 1024}
WARM = {"train.warmup_epochs": 2}
SETTINGS = [
    {},
    LARGE,
    {**LARGE, **WARM, "train.lr_scaling": "sqrt"},
    {**LARGE, **WARM, "train.lr_scaling": "linear"},
    {**LARGE, **WARM, "train.lr_scaling": "sqrt", "train.optimizer": "adam"},
]


def get_config(dataset: str = "pbmc"):
  return PRECISION.get_config(dataset)


def get_sweep():
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), SETTINGS)
