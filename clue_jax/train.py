"""Command line: `python -m clue_jax.train --config=configs/cite.py --workdir=DIR [--config.KEY=VALUE ...]`.

Trains CLUE and writes DIR/config.json, metrics.jsonl, tb/, checkpoints/, embeddings/ and summary.json.
Re-running the same command on the same DIR resumes from the latest checkpoint.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clue_jax import config as config_lib, data, trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cite.py (configs/pbmc.py:competition passes an argument).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it holds this run).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete the run directory first and start over.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  workdir = pathlib.Path(_WORKDIR.value)
  if _OVERWRITE.value:
    trainer.clean_workdir(workdir)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, workdir)
  except (data.DataError, config_lib.ConfigError, trainer.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"done: {summary['epochs_run']} epochs, restored epoch {summary['restored_epoch']}, "
        f"held-out FOSCTTM {summary['heldout_foscttm']}; outputs in {workdir}")


if __name__ == "__main__":
  app.run(main)
