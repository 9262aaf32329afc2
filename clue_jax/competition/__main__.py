"""The NeurIPS 2021 competition recipe on its task files (docs/method.md §3.5), scored by the official metrics.

  python -m clue_jax.competition --config=configs/competition/cite.py --workdir=runs/competition_cite \
      [--config.KEY=VALUE ...] [--match_modality=PREFIX] [--predict_modality=PREFIX] [--joint_embedding=PREFIX]
      [--set=ensemble.seeds=3 --set=match.method=sinkhorn ...]

The config file defines `get_config()` (the training config; its data paths are filled in here) and
`get_competition()` (the task files, the fine-tuning and the matching settings; `--set=KEY=VALUE` overrides one of
its keys, as `--config.KEY=VALUE` does the training config's). A task is given by the prefix of its files,
`PREFIX.<kind>.h5ad` (e.g. PREFIX.train_mod1.h5ad), so the full competition data works as the embedded starters do.
Stages, each skipped when already finished:

  1. WORKDIR/data/: the pretraining files (paired training cells) and fine-tuning files (training cells plus the
     unpaired test cells) made from the match-modality task (`clue_jax.competition.task_data`);
  2. WORKDIR/pretrain/: `clue_jax.train` on the paired training cells (preprocessing fitted on them);
  3. WORKDIR/finetune/: a new run started from the pretrained one (its preprocessing, its weights; rows for the
     unseen test batches start fresh), trained on train + test with the fine-tuning settings;
  3b. with `ensemble.seeds` = n > 1 (default 1, the reference), WORKDIR/members/seed_<s>/: stages 2-3 again for
     n - 1 more seeds;
  4. scoring with the fine-tuned run through `clue_jax.api`: match modality in both directions (prediction.h5ad of the
     forward one in the official format; with several seeds or `ensemble.pretrained`, the fine-tuned runs of every
     seed and their pretrained runs match as one `api.Ensemble`), predict modality in both directions, joint
     embedding; WORKDIR/scores.json holds every score beside the official baselines shipped with the task files.
"""

import ast
import json
import pathlib
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from clue_jax import api, config as config_lib, outputs
from clue_jax.competition import recipe, task_data
from clue_jax.data import dataset as data_lib
from clue_jax.train.errors import TrainingError


TASKS = ("match_modality", "predict_modality", "joint_embedding")


def define_flags():
  """The command line (defined only when run as a program: importing this module defines no flags)."""
  config_flags.DEFINE_config_file("config", None, "Competition config file, e.g. configs/competition/cite.py.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the data, both runs, the predictions and scores.json.")
  for task in TASKS:
    flags.DEFINE_string(task, None, f"Prefix of the {task} task files (PREFIX.<kind>.h5ad), replacing the config "
                        f"file's; '' skips the task (not for match_modality).")
  flags.DEFINE_multi_string("set", [], "KEY=VALUE: a key of the config file's get_competition() to override, e.g. "
                            "ensemble.seeds=3 or match.method=sinkhorn (repeatable).")
  flags.mark_flags_as_required(["config", "workdir"])


def competition_settings(config_flag: str) -> ml_collections.ConfigDict:
  """The config file's get_competition(), with the task prefixes given on the command line."""
  path = pathlib.Path(config_flags.get_config_filename(flags.FLAGS[config_flag]))
  module = config_lib.load_module(path)
  if not hasattr(module, "get_competition"):
    raise config_lib.ConfigError(f"{path} defines no get_competition(); see configs/competition/cite.py")
  competition = config_lib.apply_overrides(module.get_competition(), parse_settings(flags.FLAGS.set))
  for task in TASKS:
    if flags.FLAGS[task].value is not None:
      competition[task] = flags.FLAGS[task].value
  if not competition.match_modality:
    raise config_lib.ConfigError("--match_modality='': the recipe trains on the match-modality task's files")
  return competition


def parse_settings(pairs: list[str]) -> dict:
  """`["ensemble.seeds=3", "ensemble.pretrained=true"]` as `{"ensemble.seeds": 3, "ensemble.pretrained": True}`."""
  settings = {}
  for pair in pairs:
    key, sep, text = pair.partition("=")
    if not sep or not key:
      raise config_lib.ConfigError(f"--set={pair!r}: write KEY=VALUE, e.g. --set=ensemble.seeds=3")
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
      settings[key] = lowered == "true"
    else:
      try:
        settings[key] = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        settings[key] = text
  return settings


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    scores = recipe.run(flags.FLAGS.config, competition_settings("config"), flags.FLAGS.workdir)
  except (data_lib.DataError, config_lib.ConfigError, task_data.TaskFileError, TrainingError,
          api.RunError, outputs.OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(scores, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)

