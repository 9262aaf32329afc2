"""Match-modality score of clue_jax on the NeurIPS 2021 CITE starter task files, SNN vs Sinkhorn.

  python experiments/match_cite_starter.py --out=runs/match_cite [--seeds=5,6,7] [--max_epochs=200]

Pairs train_mod1 (GEX) with train_mod2 (ADT) through train_sol, trains `configs/cite.py` on them (one run per
seed), matches test_mod1 to test_mod2 within batches with `api.Run.match` (SNN k = 1, and Sinkhorn at several
epsilons), and prints each `metrics.match_probability` against test_sol next to the starter baseline's official
score.
"""

import json
import pathlib

import numpy as np
from absl import app, flags, logging

from clue_jax import api, config as config_lib
from clue_jax.competition import task_files as cf
from clue_jax.evaluate import metrics
from clue_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPSILONS = (0.005, 0.01, 0.02, 0.05, 0.1)
_OUT = flags.DEFINE_string("out", None, "Directory for the paired training files and the runs.")
_SEEDS = flags.DEFINE_list("seeds", ["5", "6", "7"], "Training seeds (configs/cite.py uses 5).")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 0, "Overrides train.max_epochs when > 0.")
flags.mark_flags_as_required(["out"])


def task_file(kind: str):
  return cf.read_anndata(cf.starter_file("cite", "match_modality", kind))


def paired_training_files(out: pathlib.Path) -> dict:
  """train_mod2's anonymised cells renamed after their train_mod1 partners; {modality: path}."""
  gex, adt, solution = task_file("train_mod1"), task_file("train_mod2"), task_file("train_sol")
  partner = np.asarray(solution.X.argmax(axis=1)).ravel()  # Row i of mod1 <-> row partner[i] of mod2.
  adt = adt[partner].copy()
  adt.obs_names = gex.obs_names
  out.mkdir(parents=True, exist_ok=True)
  paths = {"rna": out / "train_gex.h5ad", "adt": out / "train_adt.h5ad"}
  gex.write_h5ad(paths["rna"])
  adt.write_h5ad(paths["adt"])
  return paths


def scores(run: api.Run, solution) -> dict:
  gex, adt = task_file("test_mod1"), task_file("test_mod2")
  result = {"snn": metrics.match_probability(run.match(gex, "rna", adt, "adt", batch_key="batch").matrix, solution)}
  for epsilon in EPSILONS:
    matrix = run.match(gex, "rna", adt, "adt", method="sinkhorn", epsilon=epsilon, n_iter=500,
                       batch_key="batch").matrix
    result[f"sinkhorn_{epsilon}"] = metrics.match_probability(matrix, solution)
  return result


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  out = pathlib.Path(_OUT.value)
  paths = paired_training_files(out / "data")
  solution = cf.read_matrix(cf.starter_file("cite", "match_modality", "test_sol"))
  baseline = cf.read_scores(cf.starter_file("cite", "match_modality", "scores"))["match_probability"]
  table = {}
  for seed in _SEEDS.value:
    config = config_lib.load_module(ROOT / "configs" / "cite.py").get_config()
    config.seed = int(seed)
    config.train.progress = False
    for name, path in paths.items():
      config.data.modalities[name].path = str(path)
    if _MAX_EPOCHS.value:
      config.train.max_epochs = _MAX_EPOCHS.value
    workdir = out / f"seed_{seed}"
    summary = trainer.train_and_evaluate(config, workdir)
    table[seed] = {"restored_epoch": summary["restored_epoch"], **scores(api.load(workdir), solution)}
    print(json.dumps({seed: table[seed]}), flush=True)
  keys = [k for k in table[_SEEDS.value[0]] if k != "restored_epoch"]
  mean = {k: float(np.mean([row[k] for row in table.values()])) for k in keys}
  print(json.dumps({"baseline": baseline, "mean": mean, "runs": table}, indent=2))


if __name__ == "__main__":
  app.run(main)
