"""Why training or a saved run cannot be used, as types: callers decide by the type, never by the message's words."""

import pathlib


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, an unusable workdir or starting point); the message says the fix."""


class ConfigMismatch(TrainingError):
  """`workdir` holds a run with another config than the one given."""

  def __init__(self, workdir, message: str):
    super().__init__(message)
    self.workdir = pathlib.Path(workdir)


class NoFinishedRun(TrainingError):
  """`workdir` holds no finished run (no summary.json, or no checkpoint of its final model)."""

  def __init__(self, workdir, message: str):
    super().__init__(message)
    self.workdir = pathlib.Path(workdir)
