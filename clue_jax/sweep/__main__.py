"""Command line: `python -m clue_jax.sweep --config=configs/ablations/cite.py --workdir=runs/X [--parallel=N]`.

The config file defines `get_config()` and `get_sweep()` (a list of override dicts, see `clue_jax/sweep/grid.py`). Every
point is checked before any runs, then trained as its own `python -m clue_jax.train` in WORKDIR/<run name>/ with
stdout.log and stderr.log. Finished points (summary.json present, same config) are skipped; interrupted ones resume.
WORKDIR/summary.csv and summary.md are rewritten after every point. Exits 1 if a point failed.
"""

import pathlib
import sys

from absl import app, flags

from clue_jax import config as config_lib
from clue_jax.sweep import grid, runner


def define_flags():
  """The command line (defined only when run as a program: importing this module defines no flags)."""
  flags.DEFINE_string("config", None, "Config file with get_config() and get_sweep() "
                      "(configs/ablations/pbmc.py:competition passes an argument to get_config).")
  flags.DEFINE_string("workdir", None, "Sweep directory: one run directory per point, and the summaries.")
  flags.DEFINE_integer("parallel", 1, "Points trained at the same time.", lower_bound=1)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  workdir = pathlib.Path(flags.FLAGS.workdir)
  try:
    results = runner.run_sweep(flags.FLAGS.config, workdir, flags.FLAGS.parallel,
                               log=lambda line: print(line, flush=True))
  except (grid.GridError, config_lib.ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  failed = [r.name for r in results if r.status == "failed"]
  if failed:
    print(f"error: {len(failed)} of {len(results)} points failed ({', '.join(failed)}); see {workdir / 'summary.md'}",
          file=sys.stderr)
    sys.exit(1)
  print(f"done: {len(results)} points; summaries in {workdir / 'summary.csv'} and {workdir / 'summary.md'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)

