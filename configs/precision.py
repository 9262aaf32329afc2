"""Mixed precision against float32 on a dataset: its ablation config (configs/ablations/<name>.py; the starters hide
20 % of the pairs and train at most 100 epochs, PBMC hides 10 % and trains at most 20) with `model.matmul_dtype`
float32 and bfloat16, 3 seeds each; compare held-out FOSCTTM.

  python -m clue_jax.sweep --config=configs/precision.py:cite --workdir=runs/precision_cite
  python -m clue_jax.sweep --config=configs/precision.py:multiome --workdir=runs/precision_multiome
  python -m clue_jax.sweep --config=configs/precision.py:pbmc --workdir=runs/precision_pbmc
"""

import pathlib

from clue_jax import config as config_lib
from clue_jax.sweep import grid

ABLATIONS = pathlib.Path(__file__).resolve().parent / "ablations"
DATASETS = ("cite", "multiome", "pbmc")


def get_config(dataset: str = "cite"):
  if dataset not in DATASETS:
    raise ValueError(f"configs/precision.py:{dataset}: no such dataset; use {', '.join(DATASETS)}")
  return config_lib.load_module(ABLATIONS / f"{dataset}.py").get_config()


def get_sweep():
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), grid.axis("model.matmul_dtype", ("float32", "bfloat16")))
