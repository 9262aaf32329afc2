"""`clue_jax.fit`: training from a notebook on in-memory AnnData / MuData, as `python -m clue_jax.train` trains on
files."""

import copy
import hashlib
import json
import pathlib

import anndata as ad
import ml_collections
import numpy as np
import scipy.sparse as sp

from clue_jax import config as config_lib
from clue_jax.api import Run, RunError, load
from clue_jax.train import run_dir, trainer
from clue_jax.train.errors import ConfigMismatch


def fit(data, config=None, workdir=None, **overrides) -> Run:
  """Trains CLUE on in-memory data and returns the finished run.

  Nothing is written but the run directory. config.json records a fingerprint of the inputs, so the same call on the
  same `workdir` resumes, and other data there is refused.

  Args:
    data: a MuData (its `.mod`), a dict {modality: AnnData}, or one AnnData holding every configured modality (the
      others in its obsm, see `data.modalities.<m>.obsm_key`).
    config: a config file ("configs/cite.py[:arg]"), a ConfigDict, or None (`clue_jax.config.get_config()` with one
      default modality per name in `data`).
    workdir: the run directory to write (and to resume from).
    **overrides: per modality a dict (`rna={"layer": "counts", "batch_key": "sample"}`), a config group's dict
      (`train={"max_epochs": 5}`), a top-level value (`seed=1`), or the command line's dotted keys
      (`**{"train.max_epochs": 5}`); each is checked as `--config.KEY=VALUE` is.

  Returns:
    The finished `Run` (`clue_jax.load(workdir)`).
  """
  if workdir is None:
    raise RunError("fit needs a workdir: the run directory to write (and to resume from)")
  config = _fit_config(config)
  modalities = dict(data.mod) if hasattr(data, "mod") else data
  names = list(modalities) if isinstance(modalities, dict) else []
  flat = {}
  for key, value in overrides.items():
    if isinstance(value, dict) and (key in names or key in config.data.modalities or key not in config):
      if key not in config.data.modalities:
        config.data.modalities[key] = config_lib.modality()
      flat |= dict(config_lib.leaves(value, f"data.modalities.{key}."))
    elif isinstance(value, dict):
      flat |= dict(config_lib.leaves(value, f"{key}."))
    else:
      flat[key] = value
  if isinstance(modalities, ad.AnnData):  # One AnnData holds every configured modality.
    modalities = {name: data for name in config.data.modalities}
  if not isinstance(modalities, dict):
    raise RunError(f"fit takes a MuData, a dict of AnnData or one AnnData, got {type(data).__name__}")
  for name in modalities:
    if name not in config.data.modalities:
      config.data.modalities[name] = config_lib.modality()
  config = config_lib.apply_overrides(config, flat)
  missing = [n for n in config.data.modalities if n not in modalities]
  if missing:
    raise RunError(f"the config has modalities {missing} that the data lacks (it has {list(modalities)}); give "
                   f"them, or remove them from the config")
  config.data.fingerprint = fingerprint(modalities)
  workdir = pathlib.Path(workdir)
  try:
    trainer.train_and_evaluate(config, workdir, inputs=modalities)
  except ConfigMismatch as e:
    previous = json.loads((workdir / run_dir.CONFIG).read_text()).get("data", {}).get("fingerprint", "")
    if previous != config.data.fingerprint:
      raise RunError(f"{workdir} holds a run trained on other data (fingerprint {previous or 'none: files'}, "
                     f"these inputs {config.data.fingerprint}); use a new workdir for them") from e
    raise
  return load(workdir)


def _fit_config(config) -> ml_collections.ConfigDict:
  if config is None:
    out = config_lib.get_config()
    out.data.modalities = ml_collections.ConfigDict()
    return out
  if isinstance(config, ml_collections.ConfigDict):
    return copy.deepcopy(config)
  path, argument = config_lib.split_spec(str(config))
  return config_lib.load_module(path).get_config(*argument)


def fingerprint(modalities: dict) -> str:
  """A short hash of every input's shape, obs and var names, X, layers and obsm (what makes two calls the
  same data)."""
  digest = hashlib.sha256()
  for name in sorted(modalities):
    adata = modalities[name]
    digest.update(f"{name}:{adata.shape}".encode())
    for names in (adata.obs_names, adata.var_names):
      digest.update("\0".join(map(str, names)).encode())
    matrix = adata.X
    if sp.issparse(matrix):
      matrix = matrix.tocsr()
      for part in (matrix.indptr, matrix.indices, matrix.data):
        digest.update(np.ascontiguousarray(part).tobytes())
    elif matrix is not None:
      digest.update(np.ascontiguousarray(np.asarray(matrix)).tobytes())
    for group in (adata.layers, adata.obsm):
      for key in sorted(group):
        value = group[key]
        value = value.data if sp.issparse(value) else np.asarray(value.to_numpy() if hasattr(value, "to_numpy")
                                                                  else value)
        if value.dtype == object:  # Bytes of an object array are pointers: hash the values' text instead.
          value = value.astype(str)
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]
