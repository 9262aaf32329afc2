"""CLUE+ on BMMC CITE-seq 5k (or a user's CITE-seq .h5mu of the same layout): configs/bmmc_cite_5k.py with the plus
recipe's parts for it on (configs/plus/recipe.py), and its matching, `MATCH`.

Chosen on the held-out-site benchmark (sites 1-3 train, site 4 test; experiments/results/realdata.md) on seeds 0-2:
no training switch tried (contrastive term, a tenth of the KL weight, unseen-cell checkpoint selection) beat the
reference's training there, so the model trains as configs/bmmc_cite_5k.py does; what gains is how cells are
matched: Sinkhorn at epsilon 0.001 within each batch. Match probability against the reference's recipe: +26.3 % on
seeds 0-2, +24.8 % on seeds 3-5; the reference's own embeddings matched this way gain nearly as much.

  python -m clue_jax.train --config=configs/plus/bmmc_cite_5k.py:PATH --workdir=runs/plus_bmmc_cite_5k

and then, in Python, with `rna` and `adt` the cells to match (obs `batch` holding their batches):

  run = clue_jax.api.load("runs/plus_bmmc_cite_5k")
  matches = run.match(rna, "rna", adt, "adt", batch_key="batch", **MATCH)
"""

import pathlib

from clue_jax import config as config_lib

HERE = pathlib.Path(__file__).resolve().parent
BASE = config_lib.load_module(HERE.parent / "bmmc_cite_5k.py")
RECIPE = config_lib.load_module(HERE / "recipe.py")
MATCH = RECIPE.MATCHING["bmmc_cite_5k"]


def get_config(path: str = ""):
  """`path`: the .h5mu file (see configs/bmmc_cite_5k.py)."""
  return RECIPE.apply(BASE.get_config(path), "bmmc_cite_5k")
