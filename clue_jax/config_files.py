"""Config files loaded by path, as `--config=configs/x.py[:arg]` loads them (configs/ is not a package)."""

import importlib.util
import pathlib
import types


def load_module(path) -> types.ModuleType:
  """Executes the Python file at `path` and returns it as a module."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location(f"clue_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str) -> tuple[pathlib.Path, tuple[str, ...]]:
  """`configs/pbmc.py:competition` -> (path, ("competition",)): everything after the first colon is get_config's
  argument."""
  path, colon, argument = spec.partition(":")
  return pathlib.Path(path), (argument,) if colon else ()
