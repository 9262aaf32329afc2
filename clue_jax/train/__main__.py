"""Command line: `python -m clue_jax.train --config=configs/cite.py --workdir=DIR [--config.KEY=VALUE ...]`.

Trains CLUE and writes DIR/config.json, metrics.jsonl, tb/, checkpoints/, embeddings/ and summary.json. Re-running
the same command on the same DIR resumes from the latest checkpoint; with only train.max_epochs, train.patience or
train.reduce_lr_patience changed it continues the run (finished or not) from there. `--init_from=RUN` starts a new
run from the final parameters (and the features and preprocessing) of the finished run in RUN, for fine-tuning.
Every error a user can fix is printed as one line, `error: ...`, with exit status 1.

Multi-host: start the same command once per process (on each host, same files, a --workdir that every host sees)
with `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (HOST:PORT of process 0), or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID; `--distributed` alone lets JAX detect them
(Slurm, Open MPI, Cloud TPU). Under SLURM no flag is needed: each task of an `srun` step of several tasks
(`srun -N 2 -n 2 python -m clue_jax.train ...`) joins the others as JAX detects them from the step's variables; a
lone process in a batch script stays one process. The processes join through `jax.distributed`, train one model over
all their devices, and process 0 writes the outputs (see `clue_jax.train.trainer`; docs/cluster.md).
"""

import os
import pathlib
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clue_jax import config as config_lib, outputs
from clue_jax.data import dataset as data_lib
from clue_jax.train import parallel, trainer
from clue_jax.train.errors import TrainingError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cite.py (configs/pbmc.py:competition passes an argument).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds this run).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the run directory first and start over.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Directory of a finished run whose final parameters a new run "
                                 "in --workdir starts from (same model shapes).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0, where the "
                                   "processes meet (default: $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes train together "
                                      "(default: $JAX_NUM_PROCESSES).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's number, 0 .. num_processes - 1 "
                                   "(default: $JAX_PROCESS_ID).", lower_bound=0)
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host: join a multi-process run even without the "
                                 "three settings above (JAX detects them on Slurm, Open MPI and Cloud TPU).")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def parse_flags(argv):
  """absl's flag parsing, with one line instead of a traceback for an unknown config key or a bad value."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}. Every config key, its type and default are in clue_jax/config.py")
  except (KeyError, AttributeError) as e:  # ml_collections: a --config.KEY that the config does not have.
    fail(unknown_key_message(e, argv))


def unknown_key_message(error: Exception, argv) -> str:
  """One line for ml_collections' unknown-key error: the flag, the key and the closest existing key."""
  while not isinstance(error, KeyError) and error.__context__ is not None:
    error = error.__context__
  text = str(error.args[0]) if error.args else str(error)
  key = re.search(r"'(\w+)'", text)
  key = key.group(1) if key else text
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")),
              "--config")
  close = re.search(r'Did you mean "(\w+)"', text)
  hint = f" (did you mean {close.group(1)!r}?)" if close else ""
  return f"{flag}: no such config key {key!r}{hint}. Every config key is in clue_jax/config.py"


def distributed_settings() -> dict | None:
  """jax.distributed.initialize's arguments from the flags, else the environment; None for a one-process run."""
  settings = {"coordinator_address": _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")}
  for key, flag, env, meaning in (("num_processes", _NUM_PROCESSES, "JAX_NUM_PROCESSES", "the number of processes"),
                                  ("process_id", _PROCESS_ID, "JAX_PROCESS_ID", "this process's number")):
    value = flag.value if flag.value is not None else os.environ.get(env)
    try:
      settings[key] = None if value is None else int(value)
    except ValueError:
      fail(f"{env}={value!r} is not an integer; set it to {meaning}, or pass --{key}")
  if _DISTRIBUTED.value or settings["coordinator_address"] is not None or settings["num_processes"] not in (None, 1):
    return settings
  try:
    tasks = parallel.slurm_step_tasks(os.environ)
  except ValueError as e:
    fail(f"{e}; run under srun, or pass --num_processes=1 to train alone")
  if settings["num_processes"] is None and tasks > 1:
    return settings  # All None but a process id at most: JAX reads the rest from the SLURM step.
  return None


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  settings = distributed_settings()
  if settings is not None:
    try:
      parallel.initialize(**settings)
    except (ValueError, TypeError, RuntimeError) as e:
      fail(f"cannot join the multi-process run ({e}); check --coordinator_address, --num_processes and --process_id "
           f"(under srun: that every task of the step runs this command)")
    if parallel.is_main_process():
      print(f"clue_jax: joined {parallel.describe()} (jax.distributed)", flush=True)
  workdir = pathlib.Path(_WORKDIR.value)
  if _OVERWRITE.value:
    trainer.clean_workdir(workdir)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, workdir, init_from=_INIT_FROM.value)
  except (data_lib.DataError, config_lib.ConfigError, TrainingError, outputs.OutputError) as e:
    fail(str(e))
  if parallel.is_main_process():
    print(f"done: {summary['epochs_run']} epochs, restored epoch {summary['restored_epoch']}, "
          f"held-out FOSCTTM {summary['heldout_foscttm']}; outputs in {workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
