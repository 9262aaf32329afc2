"""Held-out-pair FOSCTTM of clue_jax and of the PyTorch reference on the same split and hyper-parameters.

  python experiments/compare_reference.py --config=configs/pbmc.py --clue-workdir=runs/pbmc \
      --ref-python=/tmp/ref/bin/python --out=runs/pbmc_reference [--preset defaults]

Loads the config's data exactly as `clue_jax.train` does (same decoder features, same fitted encoder inputs, same
cells with their pairing hidden), writes them in the reference's input format, runs `reference_scglue.py` in the
reference's own virtualenv with the same epoch budget, burn-in and patiences, and prints both runs' held-out FOSCTTM
(clue_jax's from `--clue-workdir`'s `summary.json`, which must hold a finished run of the same config).
"""

import json
import pathlib
import subprocess

import anndata as ad
import numpy as np
import pandas as pd
from ml_collections import config_flags
from absl import app, flags

from clue_jax.data import dataset as data_lib
from clue_jax.train import schedule, trainer

HERE = pathlib.Path(__file__).resolve().parent
_CONFIG = config_flags.DEFINE_config_file("config", None, "clue_jax config file.", lock_config=True)
_CLUE_WORKDIR = flags.DEFINE_string("clue_workdir", None, "Finished clue_jax run of the same config.")
_REF_PYTHON = flags.DEFINE_string("ref_python", "/tmp/ref/bin/python", "Python of a venv with scglue 0.4.1.")
_OUT = flags.DEFINE_string("out", None, "Directory for the exported data and the reference's result.")
_PRESET = flags.DEFINE_enum("preset", "defaults", ["defaults", "competition_cite"], "Reference model preset.")


def export(dataset: data_lib.Dataset, out: pathlib.Path) -> list:
  """Writes one .h5ad per modality in the reference's format and the held-out pairs; returns the --mod flags."""
  mods = []
  for name, m in dataset.modalities.items():
    present = dataset.pairing.rows[name] >= 0
    rows = dataset.pairing.rows[name][present]
    order = np.argsort(rows)
    counts = m.counts[rows[order]]
    obs = pd.DataFrame(index=dataset.pairing.ids[present][order].astype(str))  # Hidden pairs: IDs of their own.
    obs["batch"] = pd.Categorical(np.asarray(m.batch_categories)[m.batch[rows[order]]],
                                  categories=list(m.batch_categories))
    adata = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=m.features))
    adata.layers["counts"] = counts
    adata.obsm["X_rep"] = m.rep[rows[order]]
    path = out / f"{name}.h5ad"
    adata.write_h5ad(path)
    mods += ["--mod", f"{name}={path}"]
  first, second = dataset.names[:2]
  both = (dataset.heldout[first] >= 0) & (dataset.heldout[second] >= 0)
  ids = {n: dataset.pairing.ids[[np.flatnonzero(dataset.pairing.rows[n] == r)[0] for r in dataset.heldout[n][both]]]
         for n in (first, second)}
  (out / "pairs.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in zip(ids[first], ids[second])))
  return mods


def main(argv):
  del argv
  config = _CONFIG.value
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  dataset = trainer.load_data(config)
  mods = export(dataset, out)
  plan = schedule.auto_plan(len(dataset.train_ids), config.train.batch_size, config.train.lr,
                            config.train.max_epochs, config.train.align_burnin, config.train.patience,
                            config.train.reduce_lr_patience, config.train.auto_epoch_cap)
  result_path = out / "reference.json"
  subprocess.run([_REF_PYTHON.value, str(HERE / "reference_scglue.py"), *mods, "--heldout", str(out / "pairs.tsv"),
                  "--preset", _PRESET.value, "--max-epochs", str(plan.max_epochs),
                  "--align-burnin", str(plan.align_burnin), "--patience", str(plan.patience),
                  "--reduce-lr-patience", str(plan.reduce_lr_patience),
                  "--shared-batches", str(config.model.shared_batches).lower(), "--out", str(result_path)], check=True)
  reference = json.loads(result_path.read_text())
  clue = json.loads((pathlib.Path(_CLUE_WORKDIR.value) / "summary.json").read_text())
  table = {"clue_jax": {"heldout_foscttm": clue["heldout_foscttm"], "epochs_run": clue["epochs_run"]},
           "reference": {"heldout_foscttm": reference["foscttm"], "top1": reference["top1"],
                         "epochs_run": reference["epochs_run"], "cells_per_second": reference["cells_per_second"]},
           "plan": plan.__dict__, "n_heldout_pairs": len((out / "pairs.tsv").read_text().splitlines())}
  (out / "comparison.json").write_text(json.dumps(table, indent=2))
  print(json.dumps(table, indent=2))


if __name__ == "__main__":
  app.run(main)
