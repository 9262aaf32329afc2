"""The competition recipe (docs/method.md §3.5) on the BMMC CITE-seq starter's task files: GEX (rna) + ADT (adt).

Training config: configs/cite.py (the competition's CITE model and weights, preprocessing fitted on the training
cells); pretraining on the paired training cells with at most 200 epochs, then transductive fine-tuning on the
training and the (unpaired) test cells with the competition's settings: lr 1e-3, no burn-in, at most 50 epochs,
patience 8, ReduceLROnPlateau patience 3. Matching: SNN with k = 1 within the test batches.

  python -m clue_jax.competition --config=configs/competition/cite.py --workdir=runs/competition_cite
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.competition import recipe

BASE = config_lib.load_module(pathlib.Path(__file__).resolve().parent.parent / "cite.py")


def get_config():
  """The training config of both stages (clue_jax.competition fills in the data paths)."""
  return BASE.get_config()


def get_competition():
  return recipe.starter_settings("cite")
