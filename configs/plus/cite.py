"""CLUE+ on the cite data: configs/cite.py with the plus recipe's parts for it on (configs/plus/recipe.py).

  python -m clue_jax.train --config=configs/plus/cite.py --workdir=runs/plus_cite
"""

import pathlib

from clue_jax import config as config_lib

HERE = pathlib.Path(__file__).resolve().parent
BASE = config_lib.load_module(HERE.parent / "cite.py")
RECIPE = config_lib.load_module(HERE / "recipe.py")


def get_config():
  return RECIPE.apply(BASE.get_config(), "cite")
