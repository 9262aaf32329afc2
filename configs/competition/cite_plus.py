"""The competition recipe of configs/competition/cite.py, trained as the reference does, with the CLUE+ matching
(configs/plus/recipe.py: three seeds, their fine-tuned and pretrained runs matched as one ensemble by Sinkhorn).

  python -m clue_jax.competition --config=configs/competition/cite_plus.py --workdir=runs/competition_cite_plus
  python experiments/competition_ensembles.py --roots=runs/comp --technologies=cite --epsilon=0.005   # scores over seeds
"""

import pathlib

from clue_jax import config as config_lib

HERE = pathlib.Path(__file__).resolve().parent
FAITHFUL = config_lib.load_module(HERE / "cite.py")
RECIPE = config_lib.load_module(HERE.parent / "plus" / "recipe.py")


def get_config():
  return FAITHFUL.get_config()


def get_competition():
  return RECIPE.apply_competition(FAITHFUL.get_competition())
