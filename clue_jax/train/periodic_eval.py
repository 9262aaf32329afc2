"""Evaluation inside a training run (`config.evals`): scores every `evals.every_epochs` epochs, logged as `eval/*`,
and the plots written when training ends."""

import pathlib
import warnings

import numpy as np

from clue_jax import config as config_lib
from clue_jax.data import sampler
from clue_jax.evaluate import evaluation, plots, run_outputs

PLOTTED_CELLS = 100_000  # Cells of each modality the final plots read at most (a seeded subset; they show 10,000).


class PeriodicEvaluation:
  """Scores the current model on a fixed seeded subset of at most `evals.max_cells` cell IDs (all modalities of
  each), with `evaluation.evaluate`; `__call__` returns {} on epochs that are not due."""

  def __init__(self, config, dataset, encoder):
    evals = config.evals
    self.every, self.encoder = evals.every_epochs, encoder
    self.metric_names = evaluation.parse_metrics(evals.metrics)
    if not self.every:
      return
    obs = {n: m.obs for n, m in dataset.modalities.items()}
    pairing = sampler.pair_cells({n: o.index for n, o in obs.items()}, config.data.pair_by)
    ids = np.arange(len(pairing.ids))
    if len(ids) > evals.max_cells:
      ids = np.sort(sampler.eval_cells_stream(config.seed).choice(ids, evals.max_cells, replace=False))
    self.rows = {n: np.sort(r[ids][r[ids] >= 0]) for n, r in pairing.rows.items()}
    self.obs = {n: obs[n].iloc[self.rows[n]] for n in obs}
    columns = {c for o in obs.values() for c in o.columns}
    self.label_key, self.batch_key = run_outputs.default_keys(config, columns)
    for field, key in (("evals.label_key", self.label_key), ("evals.batch_key", self.batch_key)):
      if key and key not in columns:
        raise config_lib.ConfigError(f"{field}={key!r}: no such obs column in the training data; its columns are "
                         f"{sorted(map(str, columns))}")
    self.heldout_ids = dataset.heldout_names()
    self.seed = config.seed

  def __call__(self, epoch: int, state) -> dict:
    if not self.every or epoch % self.every:
      return {}
    embeddings = {n: self.encoder(state, n, rows) for n, rows in self.rows.items()}
    result = evaluation.evaluate(embeddings, self.obs, label_key=self.label_key, batch_key=self.batch_key,
                                 heldout_ids=self.heldout_ids, metric_names=self.metric_names, seed=self.seed)
    return dict(numbers(result, "eval"))


def numbers(tree: dict, prefix: str):
  """(prefix/key/..., value) for every number of a nested result (cell counts and notes left out)."""
  for key, value in tree.items():
    if key == "cells":
      continue
    if isinstance(value, dict):
      yield from numbers(value, f"{prefix}/{key}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}/{key}", value


def final_plots(workdir, config) -> dict:
  """Writes `workdir/plots/` from the run's outputs when `evals.plots` is on; what happened, for summary.json.

  A plot that fails is reported and warned about, never fatal: the run's results are already written.
  """
  if not config.evals.plots:
    return {"written": [], "note": "off (evals.plots=False)"}
  workdir = pathlib.Path(workdir)
  try:
    outputs = run_outputs.load(workdir, finished=False, max_cells=PLOTTED_CELLS, seed=config.seed)
    columns = {c for o in outputs.obs.values() for c in o.columns}
    label_key, batch_key = run_outputs.default_keys(config, columns)
    written = plots.write_plots(workdir / "plots", outputs.embeddings, outputs.obs, outputs.records, label_key,
                                batch_key, seed=config.seed)
  except Exception as e:  # noqa: BLE001 (whatever broke a figure, the run's results stand)
    warnings.warn(f"plots were not written: {e!r}", stacklevel=1)
    return {"written": [], "note": f"failed: {e!r}"}
  return {"written": [str(p.relative_to(workdir)) for p in written]}
