"""The competition recipe of configs/competition/cite.py with the CLUE+ parts for cite on in both stages
(configs/plus/recipe.py).

  python -m clue_jax.competition --config=configs/competition/cite_plus.py --workdir=runs/competition_cite_plus
  python experiments/competition.py --technologies=cite,cite_plus --seeds=0,1,2 --out=runs/competition_plus
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.competition import recipe

HERE = pathlib.Path(__file__).resolve().parent
FAITHFUL = config_lib.load_module(HERE / "cite.py")
RECIPE = config_lib.load_module(HERE.parent / "plus" / "recipe.py")


def get_config():
  return RECIPE.apply(FAITHFUL.get_config(), "cite")


def get_competition():
  return recipe.starter_settings("cite")
