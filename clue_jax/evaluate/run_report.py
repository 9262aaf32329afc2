"""Scores (and plots) of a finished run directory, written to DIR/eval.json: the work of
`python -m clue_jax.evaluate`."""

import json
import math
import pathlib
import warnings

import anndata as ad
import pandas as pd

from clue_jax import outputs
from clue_jax.evaluate import evaluation, plots, run_outputs


class EvaluateError(ValueError):
  """A problem with the command's inputs; the message names the file or flag and the fix."""


def read_h5ad(path: str, flag: str) -> ad.AnnData:
  if not pathlib.Path(path).is_file():
    raise EvaluateError(f"{flag}={path}: no such file")
  with warnings.catch_warnings():  # Old-format obs columns.
    warnings.simplefilter("ignore")
    return ad.read_h5ad(path)


def annotate(obs: dict, paths: list) -> dict:
  """Each modality's obs with the columns of the --data files joined by obs_name (file columns win)."""
  obs = {m: o.copy() for m, o in obs.items()}
  run_cells = pd.Index(sorted(set().union(*(o.index for o in obs.values()))))
  for path in paths:
    extra = read_h5ad(path, "--data").obs
    if not extra.index.is_unique:
      raise EvaluateError(f"--data={path}: obs_names are not unique; make them unique (adata.obs_names_make_unique())")
    if not len(extra.index.intersection(run_cells)):
      raise EvaluateError(f"--data={path}: none of its {len(extra)} obs_names (e.g. {list(extra.index[:2])}) is a "
                          f"cell of the run (e.g. {list(run_cells[:2])}); give a file with the same cell names")
    for name, frame in obs.items():
      joined = extra.reindex(frame.index)
      obs[name] = frame.drop(columns=[c for c in extra.columns if c in frame.columns]).join(joined)
  return obs


def check_key(flag: str, key: str, obs: dict):
  if key and not any(key in o.columns for o in obs.values()):
    columns = sorted({str(c) for o in obs.values() for c in o.columns})
    raise EvaluateError(f"{flag}={key}: no such obs column in the run's embeddings or the --data files; the columns "
                        f"are {columns} (add a labelled file with --data=PATH, or pass {flag}='' for none)")


def json_ready(value):
  """NaN / inf -> None, recursively (eval.json is strict JSON)."""
  if isinstance(value, dict):
    return {k: json_ready(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def run(workdir, data_paths=(), label_key=None, batch_key=None, expression_path=None, max_cells=0,
        with_plots=False) -> dict:
  """Scores the run in `workdir`, writes eval.json (and plots/) there and returns what eval.json holds."""
  workdir = pathlib.Path(workdir)
  finished = run_outputs.load(workdir)
  obs = annotate(finished.obs, list(data_paths))
  columns = {c for o in obs.values() for c in o.columns}
  label_key, batch_key = run_outputs.default_keys(finished.config, columns, label_key, batch_key)
  check_key("--label_key", label_key, obs)
  check_key("--batch_key", batch_key, obs)
  expression = None if expression_path is None else read_h5ad(expression_path, "--expression")
  try:
    result = evaluation.evaluate(finished.embeddings, obs, label_key=label_key, batch_key=batch_key,
                                 heldout_ids=finished.heldout_ids, expression=expression, max_cells=max_cells,
                                 seed=finished.config.seed)
  except ValueError as e:
    raise EvaluateError(str(e)) from e
  if with_plots:
    written = plots.write_plots(workdir / "plots", finished.embeddings, obs, finished.records, label_key, batch_key,
                                seed=finished.config.seed)
    result["plots"] = [str(p.relative_to(workdir)) for p in written]
  result = json_ready(result)
  outputs.write_atomically(workdir / "eval.json", lambda p: p.write_text(json.dumps(result, indent=2)))
  return result

