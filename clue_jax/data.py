"""From the user's AnnData / MuData files to the arrays CLUE trains on, with clear errors for bad input.

Each modality's file is read and checked (file, layer, obs columns, count values) before anything is compiled;
decoder features are chosen; cells are paired across modalities by `obs_names`; the encoder representation (PCA or
LSI) is fitted on the training cells and kept so that it can be re-applied at inference (method.md §4.1).
Counts stay sparse (CSR) in memory; `minibatch` densifies only the rows it is asked for.
"""

import dataclasses
import pathlib
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import gammaln

from clue_jax import preprocess, sampler

COUNT_LIKELIHOODS = ("NB",)


class DataError(ValueError):
  """Bad input data: the message names the file, the field and the fix."""


@dataclasses.dataclass
class Modality:
  """One modality's cells, ready for training and inference."""

  name: str
  path: str
  obs: pd.DataFrame
  features: np.ndarray  # Names of the decoder features.
  counts: sp.csr_matrix  # (cells, features) float32 decoder targets.
  rep: np.ndarray | None  # (cells, rep_dim) float32 encoder input; None = the counts themselves.
  batch: np.ndarray  # (cells,) int32 batch index.
  batch_categories: tuple
  label: np.ndarray  # (cells,) int32 label index, -1 = unlabelled.
  preprocess: dict  # Fitted representation state (preprocess.state_to_arrays), {} if none.
  log_factorial: np.ndarray | None = None  # (cells,) sum_f lgamma(counts + 1), for NB (a data constant).


@dataclasses.dataclass
class Dataset:
  modalities: dict  # name -> Modality, in subspace order.
  pairing: sampler.Pairing  # Training pairing (held-out pairs already hidden).
  train_ids: np.ndarray
  val_ids: np.ndarray
  heldout: dict | None  # name -> rows of the hidden pairs, aligned.
  label_categories: tuple

  @property
  def names(self):
    return tuple(self.modalities)


def modality_order(config) -> list:
  names = list(config.data.modalities.keys())
  if config.data.modality_order:
    order = [n.strip() for n in config.data.modality_order.split(",")]
    if sorted(order) != sorted(names):
      raise DataError(f"data.modality_order={config.data.modality_order!r} must list exactly the configured "
                      f"modalities {names}")
    return order
  return names


def read_anndata(name: str, spec) -> ad.AnnData:
  """Reads modality `name` from an .h5ad file, or from the `mod/<mod_key>` group of an .h5mu file."""
  field = f"data.modalities.{name}.path"
  if not spec.path:
    raise DataError(f"{field} is empty: point it at your file, e.g. --config.{field}=my_{name}.h5ad")
  path = pathlib.Path(spec.path).expanduser()
  if not path.is_file():
    raise DataError(f"{path}: no such file ({field}). Fix the path or pass --config.{field}=FILE")
  try:
    if path.suffix == ".h5mu":
      key = spec.mod_key or name
      with h5py.File(path, "r") as f:
        if "mod" not in f or key not in f["mod"]:
          available = list(f["mod"]) if "mod" in f else []
          raise DataError(f"{path}: the .h5mu file has no modality {key!r} (available: {available}); "
                          f"set data.modalities.{name}.mod_key to one of them")
        return ad.io.read_elem(f["mod"][key])
    return ad.read_h5ad(path)
  except DataError:
    raise
  except Exception as e:  # h5py / anndata raise many types for unreadable files.
    raise DataError(f"{path}: cannot be read as AnnData (.h5ad) or MuData (.h5mu) ({field}): "
                    f"{type(e).__name__}: {e}") from e


def layer_matrix(adata: ad.AnnData, layer: str, path: str, field: str):
  if layer == "X":
    if adata.X is None:
      raise DataError(f"{path}: X is empty ({field}=X); name a layer holding the data instead")
    return adata.X
  if layer not in adata.layers:
    raise DataError(f"{path}: no layer {layer!r} ({field}); available layers: {list(adata.layers)} or 'X'. "
                    f"Set --config.{field}=<one of them>")
  return adata.layers[layer]


def as_csr(matrix) -> sp.csr_matrix:
  if sp.issparse(matrix):
    return sp.csr_matrix(matrix, dtype=np.float32)
  return sp.csr_matrix(np.asarray(matrix, dtype=np.float32))


def check_counts(counts: sp.csr_matrix, likelihood: str, path: str, field: str, on_fraction: str):
  """NaN/inf are always errors; negative values and non-integers are checked under count likelihoods."""
  values = counts.data
  if not np.isfinite(values).all():
    bad = int((~np.isfinite(values)).sum())
    raise DataError(f"{path}: {field} holds {bad} NaN/inf values; remove or impute them before training")
  if likelihood not in COUNT_LIKELIHOODS:
    return
  if (values < 0).any():
    raise DataError(f"{path}: {field} holds {int((values < 0).sum())} negative values, but likelihood "
                    f"{likelihood} needs raw counts; point the layer at raw counts or pick another likelihood")
  fraction = np.count_nonzero(values != np.round(values)) / max(np.prod(counts.shape), 1)
  if fraction > 0:
    message = (f"{path}: {field} has non-integer values in {fraction:.4%} of entries under likelihood "
               f"{likelihood}; training proceeds with the continuous NB density. Use raw integer counts if you "
               f"have them")
    if on_fraction == "error":
      raise DataError(message)
    warnings.warn(message, stacklevel=2)


def obs_codes(adata: ad.AnnData, key: str, path: str, field: str, categories=None):
  """Integer codes of an obs column (NaN = -1) and the category list."""
  if key not in adata.obs:
    raise DataError(f"{path}: obs has no column {key!r} ({field}); available: {list(adata.obs.columns)}. "
                    f"Set --config.{field}=<column> or '' for none")
  column = adata.obs[key]
  if categories is None:
    if isinstance(column.dtype, pd.CategoricalDtype):
      categories = tuple(str(c) for c in column.cat.categories)
    else:
      categories = tuple(sorted(str(c) for c in column.dropna().unique()))
  lookup = {c: i for i, c in enumerate(categories)}
  codes = np.array([-1 if pd.isna(v) else lookup.get(str(v), -1) for v in column], np.int32)
  return codes, categories


def select_features(adata: ad.AnnData, counts: sp.csr_matrix, spec) -> np.ndarray:
  """Decoder features: var["highly_variable"] if present, else spec.feature_selection of spec.n_features."""
  if "highly_variable" in adata.var:
    return adata.var["highly_variable"].to_numpy(bool)
  n_top = spec.n_features
  if spec.feature_selection == "all" or n_top >= counts.shape[1]:
    return np.ones(counts.shape[1], bool)
  if spec.feature_selection == "dispersion":
    return preprocess.select_by_dispersion(counts, n_top)
  if spec.feature_selection == "total_counts":
    return preprocess.select_by_total_counts(counts, n_top)
  raise DataError(f"feature_selection={spec.feature_selection!r}: use all, dispersion or total_counts")


def normalize(matrix, how: str):
  if how == "none":
    return matrix
  if how == "log1p_cp10k":
    return preprocess.log1p_cp10k(matrix)
  if how == "clr":
    return preprocess.clr(matrix)
  raise DataError(f"rep_normalize={how!r}: use none, log1p_cp10k or clr")


@dataclasses.dataclass
class RawModality:
  """A modality read and checked, before any fitting."""

  adata: ad.AnnData
  spec: object
  path: str
  counts: sp.csr_matrix
  feature_mask: np.ndarray


def read_modality(name: str, spec, count_check: str = "warn") -> RawModality:
  adata = read_anndata(name, spec)
  path = str(spec.path)
  if not adata.obs_names.is_unique:
    duplicates = adata.obs_names[adata.obs_names.duplicated()][:3].tolist()
    raise DataError(f"{path}: obs_names are not unique (e.g. {duplicates}); cells are paired by name, so make "
                    f"them unique (adata.obs_names_make_unique())")
  field = f"data.modalities.{name}.layer"
  counts = as_csr(layer_matrix(adata, spec.layer, path, field))
  check_counts(counts, spec.likelihood, path, f"{field}={spec.layer!r}", count_check)
  mask = select_features(adata, counts, spec)
  if not mask.any():
    raise DataError(f"{path}: no decoder feature selected (var['highly_variable'] all False?)")
  return RawModality(adata, spec, path, counts, mask)


def representation_source(raw: RawModality, name: str):
  spec = raw.spec
  source = raw.counts if spec.rep == "lsi" else as_csr(
      layer_matrix(raw.adata, spec.rep_layer, raw.path, f"data.modalities.{name}.rep_layer"))
  if spec.rep_features == "decoder":
    source = source[:, raw.feature_mask]
  return source if spec.rep == "lsi" else normalize(source, spec.rep_normalize)


def fit_representation(raw: RawModality, name: str, train_rows: np.ndarray, seed: int) -> dict:
  """Fits the PCA / LSI state on the training cells; {} when the representation is given or not used."""
  spec = raw.spec
  if spec.rep in ("none", "obsm"):
    return {}
  source = representation_source(raw, name)[train_rows]
  if spec.rep == "pca":
    return preprocess.state_to_arrays(preprocess.fit_pca(source, spec.rep_dim, seed=seed))
  if spec.rep == "lsi":
    return preprocess.state_to_arrays(preprocess.fit_lsi(source, spec.rep_dim, seed=seed))
  raise DataError(f"data.modalities.{name}.rep={spec.rep!r}: use pca, lsi, obsm or none")


def apply_representation(raw: RawModality, name: str, state: dict):
  spec = raw.spec
  if spec.rep == "none":
    return None
  if spec.rep == "obsm":
    if spec.rep_key not in raw.adata.obsm:
      raise DataError(f"{raw.path}: obsm has no key {spec.rep_key!r} (data.modalities.{name}.rep_key); "
                      f"available: {list(raw.adata.obsm)}")
    return np.asarray(raw.adata.obsm[spec.rep_key], np.float32)
  fitted = preprocess.state_from_arrays(state)
  source = representation_source(raw, name)
  if spec.rep == "pca":
    return preprocess.transform_pca(fitted, source).astype(np.float32)
  return preprocess.transform_lsi(fitted, source).astype(np.float32)


def build_modality(name: str, raw: RawModality, state: dict, batch_categories, label_categories) -> Modality:
  spec, adata = raw.spec, raw.adata
  n = adata.n_obs
  if spec.batch_key:
    batch, batch_categories = obs_codes(adata, spec.batch_key, raw.path, f"data.modalities.{name}.batch_key",
                                        batch_categories)
    if (batch < 0).any():
      raise DataError(f"{raw.path}: obs[{spec.batch_key!r}] has {int((batch < 0).sum())} cells with a missing "
                      f"or unknown batch; give every cell a batch")
  else:
    batch, batch_categories = np.zeros(n, np.int32), ("all",)
  label = np.full(n, -1, np.int32)
  if spec.label_key:
    label, _ = obs_codes(adata, spec.label_key, raw.path, f"data.modalities.{name}.label_key", label_categories)
  counts = raw.counts[:, raw.feature_mask].tocsr()
  return Modality(name=name, path=raw.path, obs=adata.obs.copy(),
                  features=np.asarray(adata.var_names[raw.feature_mask]).astype(str),
                  counts=counts, rep=apply_representation(raw, name, state),
                  batch=batch, batch_categories=tuple(batch_categories), label=label, preprocess=state,
                  log_factorial=row_log_factorials(counts) if spec.likelihood == "NB" else None)


def row_log_factorials(counts: sp.csr_matrix) -> np.ndarray:
  """sum_f lgamma(x_f + 1) per row, from the non-zeros only (lgamma(1) = 0)."""
  per_entry = sp.csr_matrix((gammaln(counts.data.astype(np.float64) + 1.0), counts.indices, counts.indptr),
                            shape=counts.shape)
  return np.asarray(per_entry.sum(1), np.float32).ravel()


def label_categories_of(raws: dict) -> tuple:
  labels = set()
  for name, raw in raws.items():
    if raw.spec.label_key:
      _, categories = obs_codes(raw.adata, raw.spec.label_key, raw.path, f"data.modalities.{name}.label_key")
      labels.update(categories)
  return tuple(sorted(labels))


def load_dataset(config, saved: dict | None = None) -> Dataset:
  """Reads, checks, pairs, splits and preprocesses every modality of `config.data`.

  `saved` (from a checkpoint) supplies the fitted preprocessing and categories instead of fitting them anew.
  """
  names = modality_order(config)
  if len(names) < 2:
    raise DataError(f"CLUE needs at least two modalities; data.modalities has {names}")
  raws = {name: read_modality(name, config.data.modalities[name], config.data.count_check) for name in names}
  pairing = sampler.pair_cells({n: r.adata.obs_names for n, r in raws.items()}, config.data.pair_by)
  rng = np.random.default_rng([config.seed, 1])
  heldout = None
  if config.data.heldout_pairs > 0:
    pairing, heldout = sampler.hide_pairs(pairing, config.data.heldout_pairs, rng)
  train_ids, val_ids = sampler.split_ids(len(pairing.ids), config.data.val_split, rng)
  label_categories = tuple(saved["label_categories"]) if saved else label_categories_of(raws)
  modalities = {}
  for name in names:
    rows = pairing.rows[name][train_ids]
    rows = np.sort(rows[rows >= 0])
    if saved:
      state = saved["preprocess"][name]
      batch_categories = saved["batch_categories"][name]
    else:
      if rows.size == 0:
        raise DataError(f"{raws[name].path}: no cell of modality {name!r} lands in the training split")
      state, batch_categories = fit_representation(raws[name], name, rows, config.seed), None
    modalities[name] = build_modality(name, raws[name], state, batch_categories, label_categories)
  if config.model.shared_batches:
    lists = {n: m.batch_categories for n, m in modalities.items()}
    if len(set(lists.values())) > 1:
      raise DataError(f"model.shared_batches=True needs the same batch categories in every modality, got {lists}; "
                      f"make the batch columns categorical with identical categories or set it to False")
  if len(train_ids) < config.train.batch_size:
    raise DataError(f"only {len(train_ids)} training cell IDs, fewer than one batch "
                    f"(train.batch_size={config.train.batch_size}); lower the batch size")
  return Dataset(modalities, pairing, train_ids, val_ids, heldout, label_categories)


def steps_chunk(dataset: Dataset, epoch_rows: sampler.EpochRows, first_step: int, n_steps: int,
                batch_size: int) -> dict:
  """Dense arrays of shape (n_steps, batch_size, ...) for steps first_step .. first_step + n_steps of an epoch."""
  sl = slice(first_step * batch_size, (first_step + n_steps) * batch_size)
  return minibatch(dataset, {n: r[sl].reshape(n_steps, batch_size) for n, r in epoch_rows.rows.items()},
                   {n: m[sl].reshape(n_steps, batch_size) for n, m in epoch_rows.masks.items()},
                   epoch_rows.valid[sl].reshape(n_steps, batch_size))


def minibatch(dataset: Dataset, rows: dict, masks: dict, valid: np.ndarray) -> dict:
  """Dense arrays for the given rows of every modality (leading axes as given, e.g. (steps, batch))."""
  batch = {"valid": valid.astype(np.float32)}
  for name, m in dataset.modalities.items():
    r = rows[name]
    flat = r.reshape(-1)
    arrays = {
        "counts": m.counts[flat].toarray().reshape(*r.shape, -1),
        "batch": m.batch[r],
        "label": m.label[r],
        "mask": masks[name].astype(np.float32),
    }
    if m.rep is not None:
      arrays["rep"] = m.rep[r]
    if m.log_factorial is not None:
      arrays["log_factorial"] = m.log_factorial[r]
    batch[name] = arrays
  return batch
