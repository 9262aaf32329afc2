"""Reading a finished run's outputs for evaluation and plots: its config, the embedding and obs of every modality,
metrics.jsonl, and the cells whose pairing training hid."""

import json
import pathlib
import warnings
from typing import NamedTuple

import h5py
import ml_collections
import numpy as np
from anndata.io import read_elem

from clue_jax import outputs
from clue_jax.data import dataset as data_lib, sampler

CONVENTIONAL_LABEL_KEY = "cell_type"  # Used when neither the command nor the config names a label column.
CONVENTIONAL_BATCH_KEY = "batch"
BLOCK = 65_536  # Rows of an embedding read at a time when a subset is read.


class RunOutputsError(ValueError):
  """A run directory without the outputs of a finished run; the message names the file and the fix."""


class RunOutputs(NamedTuple):
  config: ml_collections.ConfigDict
  embeddings: dict  # modality -> (cells, d) array, in modality order.
  obs: dict  # modality -> obs DataFrame of the embedded cells.
  records: list  # metrics.jsonl, one dict per epoch.
  heldout_ids: list  # Cell names whose pairing training hid (data.heldout_pairs).


def load(workdir, finished: bool = True, max_cells: int | None = None, seed: int = 0) -> RunOutputs:
  """The outputs in `workdir`; `finished=False` skips the check for summary.json (the trainer, before writing it).

  With `max_cells`, a modality of more cells keeps a seeded subset of that many rows (the same positions in every
  modality of as many cells, so the cells of files in the same order stay paired), read a block at a time.
  """
  workdir = pathlib.Path(workdir)
  for path in (workdir / "summary.json", workdir / "config.json")[0 if finished else 1:]:
    if not path.is_file():
      raise RunOutputsError(f"{workdir}: no finished run there ({path.name} is missing); evaluate the --workdir of a "
                            f"run that completed, or finish it with `python -m clue_jax.train --config=... "
                            f"--workdir={workdir}`")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  embeddings, obs = {}, {}
  for name in data_lib.modality_order(config.data):
    path = workdir / "embeddings" / f"{name}.h5ad"
    if not path.is_file():
      raise RunOutputsError(f"{path} is missing: the run's embeddings are incomplete; run the training command "
                            f"again on {workdir} to rewrite them")
    embeddings[name], obs[name] = read_embedding(path, max_cells, seed)
  return RunOutputs(config, embeddings, obs, read_records(workdir / "metrics.jsonl"), heldout_ids(workdir, config, obs))


def read_embedding(path: pathlib.Path, max_cells: int | None, seed: int) -> tuple:
  """(obsm["X_clue"], obs) of an embedding file, or of a seeded subset of `max_cells` of its cells."""
  with warnings.catch_warnings():  # Old-format obs columns copied from the input files.
    warnings.simplefilter("ignore")
    with h5py.File(path, "r") as f:
      if "X_clue" not in f.get("obsm", {}):
        raise RunOutputsError(f"{path} has no obsm['X_clue']: it is not a clue_jax embedding file")
      obs, values = read_elem(f["obs"]), f["obsm"]["X_clue"]
      if max_cells is None or len(obs) <= max_cells:
        return np.asarray(values[:]), obs
      rows = np.sort(np.random.default_rng(seed).choice(len(obs), max_cells, replace=False))
      blocks = [values[start:start + BLOCK][rows[(rows >= start) & (rows < start + BLOCK)] - start]
                for start in range(0, len(obs), BLOCK)]
      return np.concatenate(blocks), obs.iloc[rows]


def read_records(path: pathlib.Path) -> list:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def heldout_ids(workdir: pathlib.Path, config, obs: dict) -> list:
  """The cell names of the pairs training hid, as the run recorded them in cells.json.

  Runs written before cells.json existed: the same pairing and the same seeded draw as `data_lib.load_dataset`.
  """
  cells = workdir / outputs.CELLS_FILE
  if cells.is_file():
    return json.loads(cells.read_text())["heldout_pairs"]
  if config.data.heldout_pairs <= 0:
    return []
  pairing = sampler.pair_cells({n: o.index for n, o in obs.items()}, config.data.pair_by)
  _, hidden = sampler.hide_pairs(pairing, config.data.heldout_pairs, sampler.split_stream(config.seed))
  if hidden is None:
    return []
  names = set()
  for name, rows in hidden.items():
    names.update(obs[name].index[rows[rows >= 0]].astype(str))
  return sorted(names)


def default_keys(config, columns, label_key=None, batch_key=None) -> tuple:
  """(label column, batch column) to score with; "" for none.

  A key given here wins; else `evals.label_key` / `evals.batch_key` of the config, else the first modality's
  `label_key` / `batch_key`, else the conventional name when the obs has that column.
  """
  evals = config.get("evals", ml_collections.ConfigDict())
  specs = [config.data.modalities[n] for n in data_lib.modality_order(config.data)]

  def choose(given, eval_key, field, conventional):
    if given is not None:
      return given
    configured = [evals.get(eval_key, "")] + [s.get(field, "") for s in specs]
    return next((k for k in configured if k), conventional if conventional in columns else "")

  return (choose(label_key, "label_key", "label_key", CONVENTIONAL_LABEL_KEY),
          choose(batch_key, "batch_key", "batch_key", CONVENTIONAL_BATCH_KEY))
