"""Command line: `python -m clue_jax.train --config=configs/cite.py --workdir=DIR [--config.KEY=VALUE ...]`.

Trains CLUE and writes DIR/config.json, metrics.jsonl, tb/, checkpoints/, embeddings/ and summary.json.
Re-running the same command on the same DIR resumes from the latest checkpoint. `--init_from=RUN` starts a new run
from the final parameters (and the features and preprocessing) of the finished run in RUN, for fine-tuning.
Every error a user can fix is printed as one line, `error: ...`, with exit status 1.
"""

import pathlib
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clue_jax import config as config_lib, data, trainer, writer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cite.py (configs/pbmc.py:competition passes an argument).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds this run).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the run directory first and start over.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Directory of a finished run whose final parameters a new run "
                                 "in --workdir starts from (same model shapes).")
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  workdir = pathlib.Path(_WORKDIR.value)
  if _OVERWRITE.value:
    trainer.clean_workdir(workdir)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, workdir, init_from=_INIT_FROM.value)
  except (data.DataError, config_lib.ConfigError, trainer.TrainingError, writer.OutputError) as e:
    fail(str(e))
  print(f"done: {summary['epochs_run']} epochs, restored epoch {summary['restored_epoch']}, "
        f"held-out FOSCTTM {summary['heldout_foscttm']}; outputs in {workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
