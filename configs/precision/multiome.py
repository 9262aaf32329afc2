"""Mixed precision against float32 on the BMMC Multiome starter: configs/ablations/multiome.py (20 % of the pairs
hidden, at most 100 epochs) with `model.matmul_dtype` float32 and bfloat16, 3 seeds each; compare held-out FOSCTTM.

  python -m clue_jax.sweep --config=configs/precision/multiome.py --workdir=runs/precision_multiome
"""

import pathlib

from clue_jax import config_files, grid

BASE = config_files.load_module(pathlib.Path(__file__).resolve().parent.parent / "ablations" / "multiome.py")


def get_config():
  return BASE.get_config()


def get_sweep():
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), grid.axis("model.matmul_dtype", ("float32", "bfloat16")))
