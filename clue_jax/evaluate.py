"""Command line: `python -m clue_jax.evaluate --workdir=DIR [--data=PATH ...] [--label_key=KEY] [--batch_key=KEY]
[--expression=PATH] [--max_cells=N] [--plots]`.

Re-scores the finished run in DIR from its embeddings and writes DIR/eval.json (atomically); `--plots` also writes
DIR/plots/*.png. `--data` adds the obs columns of labelled .h5ad files whose obs_names are the run's cells (their
columns replace same-named ones). Without --label_key / --batch_key the run's config decides, else the columns
`cell_type` and `batch` when present. Every error a user can fix is printed as one line, `error: ...`, exit status 1.
"""

import json
import math
import pathlib
import sys
import warnings

import anndata as ad
import pandas as pd
from absl import app, flags

from clue_jax import evaluation, plots, run_outputs, trainer, writer


def define_flags():
  """The command line (defined only when run as a program: importing this module defines no flags)."""
  flags.DEFINE_string("workdir", None, "Directory of a finished training run.")
  flags.DEFINE_multi_string("data", [], "An .h5ad whose obs (e.g. cell types) annotate the run's cells, "
                            "matched by obs_names; repeatable.")
  flags.DEFINE_string("label_key", None, "obs column of cell types; '' for none.")
  flags.DEFINE_string("batch_key", None, "obs column of batches; '' for none.")
  flags.DEFINE_string("expression", None, "An .h5ad of log-normalised gene expression (X, human gene "
                      "symbols as var_names) of the run's cells, for the cell-cycle score.")
  flags.DEFINE_integer("max_cells", 0, "Score a seeded random subset of this many cells (0 = all).")
  flags.DEFINE_bool("plots", False, "Also write DIR/plots/*.png.")
  flags.mark_flags_as_required(["workdir"])


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
  outputs = run_outputs.load(workdir)
  obs = annotate(outputs.obs, list(data_paths))
  columns = {c for o in obs.values() for c in o.columns}
  label_key, batch_key = run_outputs.default_keys(outputs.config, columns, label_key, batch_key)
  check_key("--label_key", label_key, obs)
  check_key("--batch_key", batch_key, obs)
  expression = None if expression_path is None else read_h5ad(expression_path, "--expression")
  try:
    result = evaluation.evaluate(outputs.embeddings, obs, label_key=label_key, batch_key=batch_key,
                                 heldout_ids=outputs.heldout_ids, expression=expression, max_cells=max_cells,
                                 seed=outputs.config.seed)
  except ValueError as e:
    raise EvaluateError(str(e)) from e
  if with_plots:
    written = plots.write_plots(workdir / "plots", outputs.embeddings, obs, outputs.records, label_key, batch_key,
                                seed=outputs.config.seed)
    result["plots"] = [str(p.relative_to(workdir)) for p in written]
  result = json_ready(result)
  trainer.write_atomically(workdir / "eval.json", lambda p: p.write_text(json.dumps(result, indent=2)))
  return result


def main(argv):
  del argv
  try:
    f = flags.FLAGS
    result = run(f.workdir, f.data, f.label_key, f.batch_key, f.expression, f.max_cells, f.plots)
  except (EvaluateError, run_outputs.RunOutputsError, writer.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result, indent=2))
  print(f"wrote {pathlib.Path(flags.FLAGS.workdir) / 'eval.json'}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
