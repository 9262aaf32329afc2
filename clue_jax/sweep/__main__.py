"""Command line: `python -m clue_jax.sweep --config=configs/ablations/cite.py --workdir=runs/X [--parallel=N]`
(on a SLURM cluster: `[--launcher=slurm --slurm_partition=P --slurm_time=MIN --slurm_gpus=G ...]`).

The config file defines `get_config()` and `get_sweep()` (a list of override dicts, see `clue_jax/sweep/grid.py`). Every
point is checked before any runs, then trained as its own `python -m clue_jax.train` in WORKDIR/<run name>/ with
stdout.log and stderr.log: by this process, N at a time (`--launcher=local`), or as one SLURM job each, submitted
through submitit and watched with squeue until the last one ends (`--launcher=slurm` and the --slurm_* flags, on a
cluster's login node; see docs/cluster.md). Finished points (summary.json present, same config) are skipped;
interrupted ones resume. WORKDIR/summary.csv and summary.md are rewritten after every point (`--report_only`: written
from what WORKDIR holds, training nothing). Exits 1 if a point failed.
"""

import pathlib
import sys

from absl import app, flags

from clue_jax import config as config_lib
from clue_jax.sweep import grid, runner, slurm


def define_flags():
  """The command line (defined only when run as a program: importing this module defines no flags)."""
  flags.DEFINE_string("config", None, "Config file with get_config() and get_sweep() "
                      "(configs/ablations/pbmc.py:competition passes an argument to get_config).")
  flags.DEFINE_string("workdir", None, "Sweep directory: one run directory per point, and the summaries.")
  flags.DEFINE_enum("launcher", "local", ["local", "slurm"], "Where the points train: local (subprocesses of this "
                    "process) or slurm (one SLURM job each, submitted from a cluster's login node).")
  flags.DEFINE_integer("parallel", 1, "local: points trained at the same time.", lower_bound=1)
  flags.DEFINE_bool("report_only", False, "Only write summary.csv and summary.md from the finished points in "
                    "--workdir (unfinished ones pending); train and submit nothing.")
  flags.DEFINE_string("slurm_partition", "", "slurm: the partition of the points' jobs (default: the cluster's).")
  flags.DEFINE_integer("slurm_time", 60, "slurm: time limit of each point's job, in minutes.", lower_bound=1)
  flags.DEFINE_integer("slurm_cpus", 1, "slurm: CPUs per point.", lower_bound=1)
  flags.DEFINE_integer("slurm_gpus", 0, "slurm: GPUs per point (one process uses them all).", lower_bound=0)
  flags.DEFINE_integer("slurm_array_cap", 0, "slurm: at most this many points running at once (the job array's "
                       "%N); 0: no cap.", lower_bound=0)
  flags.DEFINE_multi_string("slurm_option", [], "slurm: another sbatch option for every point's job, KEY=VALUE "
                            "or KEY (account=myproject, qos=short, mem=16G, constraint=a100)")
  flags.mark_flags_as_required(["config", "workdir"])


def launcher():
  if flags.FLAGS.launcher == "local":
    return runner.Local(flags.FLAGS.parallel)
  resources = slurm.Resources(flags.FLAGS.slurm_partition, flags.FLAGS.slurm_time, flags.FLAGS.slurm_cpus,
                              flags.FLAGS.slurm_gpus, flags.FLAGS.slurm_array_cap, tuple(flags.FLAGS.slurm_option))
  return slurm.Slurm(resources, log=lambda line: print(line, flush=True))


def main(argv):
  del argv
  workdir = pathlib.Path(flags.FLAGS.workdir)
  try:
    if flags.FLAGS.report_only:
      results = runner.write_report(flags.FLAGS.config, workdir)
      print(f"{sum(r.status == 'done' for r in results)} of {len(results)} points finished; summaries in "
            f"{workdir / 'summary.csv'} and {workdir / 'summary.md'}")
      return
    results = runner.run_sweep(flags.FLAGS.config, workdir, launcher(), log=lambda line: print(line, flush=True))
  except (grid.GridError, config_lib.ConfigError, FileNotFoundError, slurm.SlurmError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    if flags.FLAGS.launcher == "slurm":
      print("interrupted: the SLURM jobs go on; run the same command again to wait for them (it submits only what "
            "is missing), or with --report_only to write the summaries now", file=sys.stderr)
    sys.exit(130)
  failed = [r.name for r in results if r.status == "failed"]
  if failed:
    print(f"error: {len(failed)} of {len(results)} points failed ({', '.join(failed)}); see {workdir / 'summary.md'}",
          file=sys.stderr)
    sys.exit(1)
  print(f"done: {len(results)} points; summaries in {workdir / 'summary.csv'} and {workdir / 'summary.md'}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
