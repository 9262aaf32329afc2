"""Command line: `python -m clue_jax.evaluate --workdir=DIR [--data=PATH ...] [--label_key=KEY] [--batch_key=KEY]
[--expression=PATH] [--max_cells=N] [--plots]`.

Re-scores the finished run in DIR from its embeddings and writes DIR/eval.json (atomically); `--plots` also writes
DIR/plots/*.png. `--data` adds the obs columns of labelled .h5ad files whose obs_names are the run's cells (their
columns replace same-named ones). Without --label_key / --batch_key the run's config decides, else the columns
`cell_type` and `batch` when present. Every error a user can fix is printed as one line, `error: ...`, exit status 1.
"""

import json
import pathlib
import sys

from absl import app, flags

from clue_jax import outputs
from clue_jax.evaluate import run_outputs, run_report


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


def main(argv):
  del argv
  try:
    f = flags.FLAGS
    result = run_report.run(f.workdir, f.data, f.label_key, f.batch_key, f.expression, f.max_cells, f.plots)
  except (run_report.EvaluateError, run_outputs.RunOutputsError, outputs.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(result, indent=2))
  print(f"wrote {pathlib.Path(flags.FLAGS.workdir) / 'eval.json'}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)

