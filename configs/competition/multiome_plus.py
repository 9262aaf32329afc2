"""The competition recipe of configs/competition/multiome.py with the CLUE+ parts for multiome on in both stages
(configs/plus/recipe.py).

  python -m clue_jax.competition --config=configs/competition/multiome_plus.py --workdir=runs/competition_multiome_plus
  python experiments/competition.py --technologies=multiome,multiome_plus --seeds=0,1,2 --out=runs/competition_plus
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.competition import recipe

HERE = pathlib.Path(__file__).resolve().parent
FAITHFUL = config_lib.load_module(HERE / "multiome.py")
RECIPE = config_lib.load_module(HERE.parent / "plus" / "recipe.py")


def get_config():
  return RECIPE.apply(FAITHFUL.get_config(), "multiome")


def get_competition():
  return recipe.starter_settings("multiome")
