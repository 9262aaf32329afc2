"""Files every part writes: `write_atomically` (never a half-written file) and `OutputError` (a write that failed,
named with its path and the fix)."""

import os
import pathlib

# The run directory's file that the training loop writes and evaluation reads (train/run_dir.py lists them all).
CELLS_FILE = "cells.json"


class OutputError(RuntimeError):
  """An output cannot be written (full disk, permissions); the message names the path."""

  def __init__(self, path, error: OSError):
    super().__init__(f"cannot write {path}: {error.strerror or error}. Free disk space (or fix the permissions) and "
                     f"run the same command again: a run resumes from its last complete checkpoint")


def write_atomically(path: pathlib.Path, write):
  """Writes through `write(tmp)` and renames, so that `path` is never half-written; OSError -> OutputError."""
  tmp = path.with_name(path.name + ".tmp")
  try:
    write(tmp)
    os.replace(tmp, path)
  except OSError as e:
    tmp.unlink(missing_ok=True)
    raise OutputError(path, e) from e


def write_text_atomically(path: pathlib.Path, text: str):
  write_atomically(path, lambda tmp: tmp.write_text(text))
