"""The plus recipe against the reference-faithful config on a dataset's ablation config (configs/ablations/<name>.py,
as configs/precision.py picks it: the starters hide 20 % of the pairs and train at most 100 epochs, PBMC hides 10 %
and trains at most 20): faithful, plus, and plus without each of its parts, 3 seeds each (the same splits and hidden
pairs per seed). experiments/plus.py runs and scores these grids.

  python -m clue_jax.sweep --config=configs/plus/sweep.py:pbmc --workdir=runs/plus_pbmc

`<name>_confirm` (e.g. configs/plus/sweep.py:cite_confirm) is faithful and plus on seeds 3, 4 and 5: a check of a
recipe chosen on seeds 0-2 on seeds it was not chosen on.
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import grid

HERE = pathlib.Path(__file__).resolve().parent
PRECISION = config_lib.load_module(HERE.parent / "precision.py")
RECIPE = config_lib.load_module(HERE / "recipe.py")


CONFIRM = "_confirm"


def get_config(dataset: str = "pbmc"):
  return PRECISION.get_config(dataset.removesuffix(CONFIRM))


def get_sweep(dataset: str = "pbmc"):
  if dataset.endswith(CONFIRM):
    dataset = dataset.removesuffix(CONFIRM)
    return grid.product(grid.axis(grid.SEED, (3, 4, 5)), [{}, RECIPE.overrides(dataset)])
  parts = RECIPE.RECIPES[dataset]
  ablated = [RECIPE.overrides(dataset, without=part) for part in parts] if len(parts) > 1 else []
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), [{}, RECIPE.overrides(dataset)] + ablated)
