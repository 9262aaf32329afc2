"""Mixed precision against float32 on a starter: its ablation config (configs/ablations/<starter>.py: 20 % of the
pairs hidden, at most 100 epochs) with `model.matmul_dtype` float32 and bfloat16, 3 seeds each; compare held-out
FOSCTTM.

  python -m clue_jax.sweep --config=configs/precision.py:cite --workdir=runs/precision_cite
  python -m clue_jax.sweep --config=configs/precision.py:multiome --workdir=runs/precision_multiome
"""

import pathlib

from clue_jax import config_files, grid

ABLATIONS = pathlib.Path(__file__).resolve().parent / "ablations"
STARTERS = ("cite", "multiome")


def get_config(starter: str = "cite"):
  if starter not in STARTERS:
    raise ValueError(f"no such starter {starter!r}; use {' or '.join(STARTERS)}")
  return config_files.load_module(ABLATIONS / f"{starter}.py").get_config()


def get_sweep():
  return grid.product(grid.axis(grid.SEED, (0, 1, 2)), grid.axis("model.matmul_dtype", ("float32", "bfloat16")))
