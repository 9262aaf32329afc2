"""From the user's AnnData / MuData files to the arrays CLUE trains on, with clear errors for bad input.

Each modality's file is read and checked (file, layer, obs columns, count values) before anything is compiled;
decoder features are chosen; cells are paired across modalities by `obs_names`; the encoder representation (PCA or
LSI) is fitted on the training cells and kept so that it can be re-applied at inference (docs/method.md §4.1).
Counts stay sparse (CSR) in memory; `minibatch` densifies only the rows it is asked for. This layer reads
`config.data` and the few values it is given; it knows nothing of the model.
"""

import dataclasses
import pathlib
import time
import warnings

import anndata as ad
import h5py
import mudata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.special import gammaln

from clue_jax.batch import Batch, ModalityBatch
from clue_jax.data import preprocess, sampler

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
  rep_features: np.ndarray | None  # Names of the features the representation was fitted on; None if not fitted.
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

  @property
  def on_disk(self) -> bool:
    """Whether the rows are read from an on-disk store (`streaming.DiskReader`) rather than held in memory."""
    return any(not sp.issparse(m.counts) for m in self.modalities.values())

  def heldout_names(self) -> list:
    """The cell names (obs_names) of the pairs whose pairing training hid, sorted."""
    hidden = self.heldout or {}
    return sorted({str(self.modalities[n].obs.index[r]) for n, rows in hidden.items() for r in rows if r >= 0})

  def validation_names(self) -> list:
    """The cell IDs of the validation split (never trained on), sorted."""
    return sorted(str(i) for i in self.pairing.ids[self.val_ids])

  def fitted(self) -> "Fitted":
    """What a model trained on this dataset fixes about its data (to read other data as it read this)."""
    return Fitted(features={n: m.features for n, m in self.modalities.items()},
                  rep_features={n: m.rep_features for n, m in self.modalities.items() if m.rep_features is not None},
                  preprocess={n: m.preprocess for n, m in self.modalities.items()},
                  batch_categories={n: m.batch_categories for n, m in self.modalities.items()},
                  label_categories=self.label_categories)


@dataclasses.dataclass(frozen=True)
class Fitted:
  """What a trained model fixes about its data, per modality: decoder features, the features the representation was
  fitted on, the fitted representation state (`preprocess.state_to_arrays`, {} if none), batch categories; and the
  label categories."""

  features: dict
  rep_features: dict
  preprocess: dict
  batch_categories: dict
  label_categories: tuple


def modality_order(data) -> list:
  """The modality names of `data` (a config's `data` group) in subspace order."""
  names = list(data.modalities.keys())
  if data.modality_order:
    order = [n.strip() for n in data.modality_order.split(",")]
    if sorted(order) != sorted(names):
      raise DataError(f"data.modality_order={data.modality_order!r} must list exactly the configured "
                      f"modalities {names}")
    return order
  return names


def read_anndata(name: str, spec) -> ad.AnnData:
  """Reads modality `name` from an .h5ad file, or from the `mod/<mod_key>` group of an .h5mu (MuData) file."""
  path, field = checked_path(name, spec), f"data.modalities.{name}.path"
  try:
    with h5py.File(path, "r") as f:  # Only to name what is missing before reading.
      key = spec.mod_key or name if "mod" in f else None
      anndata_group(f["mod"] if key else f, key, path, name)
    return mudata.read_h5ad(path, key)
  except DataError:
    raise
  except Exception as e:  # h5py / anndata raise many types for damaged files.
    raise DataError(f"{path}: cannot be read as AnnData (.h5ad) or MuData (.h5mu) ({field}), the file may be "
                    f"truncated or damaged: {type(e).__name__}: {e}") from e


def checked_path(name: str, spec) -> pathlib.Path:
  """The path of modality `name`'s file, checked to name an HDF5 file."""
  field = f"data.modalities.{name}.path"
  if not spec.path:
    raise DataError(f"{field} is empty: point it at your file, e.g. --config.{field}=my_{name}.h5ad")
  path = pathlib.Path(spec.path).expanduser()
  if not path.is_file():
    raise DataError(f"{path}: no such file ({field}). Fix the path or pass --config.{field}=FILE")
  if not h5py.is_hdf5(path):
    raise DataError(f"{path}: not an HDF5 file, so neither AnnData (.h5ad) nor MuData (.h5mu) ({field}); convert "
                    f"it first, e.g. anndata.read_csv(...).write_h5ad('{path.stem}.h5ad')")
  return path


def anndata_group(group: h5py.Group, key: str | None, path: pathlib.Path, name: str) -> h5py.Group:
  """`group[key]` (or `group` itself), checked to hold an AnnData (obs and var)."""
  if key is not None:
    if key not in group:
      raise DataError(f"{path}: the MuData file has no modality {key!r} (available: {list(group)}); set "
                      f"--config.data.modalities.{name}.mod_key to one of them")
    group = group[key]
  missing = [k for k in ("obs", "var") if k not in group]
  if missing:
    raise DataError(f"{path}: an HDF5 file but not AnnData: {group.name} has no {' or '.join(missing)} "
                    f"(it holds {list(group)}); data.modalities.{name}.path needs an .h5ad or .h5mu file")
  return group


def obsm_modality(adata: ad.AnnData, name: str, spec, path: str) -> ad.AnnData:
  """Modality `name` kept in `adata.obsm[spec.obsm_key]` (totalVI, openproblems layouts) as its own AnnData: X the
  counts, obs `adata`'s, var names the DataFrame's columns or `adata.uns[spec.var_names_key]`."""
  field = f"data.modalities.{name}.obsm_key"
  if spec.obsm_key not in adata.obsm:
    raise DataError(f"{path}: no obsm[{spec.obsm_key!r}] ({field}); its obsm keys are {list(adata.obsm)}. Set "
                    f"--config.{field} to one of them, or to '' to read the file's X / layers")
  values = adata.obsm[spec.obsm_key]
  names_field = f"data.modalities.{name}.var_names_key"
  if isinstance(values, pd.DataFrame):
    names, values = np.asarray(values.columns).astype(str), values.to_numpy()
  elif spec.var_names_key:
    if spec.var_names_key not in adata.uns:
      raise DataError(f"{path}: no uns[{spec.var_names_key!r}] ({names_field}); its uns keys are {list(adata.uns)}")
    names = np.asarray(adata.uns[spec.var_names_key]).astype(str)
  else:
    raise DataError(f"{path}: obsm[{spec.obsm_key!r}] is an array without feature names; set "
                    f"--config.{names_field} to the uns entry that holds them (openproblems files: mode2_var)")
  if names.ndim != 1 or len(names) != values.shape[1]:
    raise DataError(f"{path}: uns[{spec.var_names_key!r}] ({names_field}) holds {names.shape} names for the "
                    f"{values.shape[1]} columns of obsm[{spec.obsm_key!r}]; it needs one name per column")
  return ad.AnnData(X=values, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(names)))


def count_layer(spec) -> str:
  """Where a modality's counts are in its AnnData: X for a modality read from obsm, else `spec.layer`."""
  return "X" if spec.obsm_key else spec.layer


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
  """Any dense or sparse (CSR, CSC, COO, ..., int or float) matrix as float32 CSR without stored zeros."""
  if sp.issparse(matrix):
    out = sp.csr_matrix(matrix, dtype=np.float32)
    out.sum_duplicates()  # COO may hold duplicate entries.
    out.eliminate_zeros()
    return out
  return sp.csr_matrix(np.asarray(matrix, dtype=np.float32))


def check_finite(matrix: sp.csr_matrix, path: str, field: str):
  bad = int((~np.isfinite(matrix.data)).sum())
  if bad:
    raise DataError(f"{path}: {field} holds {bad} NaN/inf values; remove or impute them before training")


def check_counts(counts: sp.csr_matrix, likelihood: str, path: str, field: str, on_fraction: str):
  """NaN/inf are always errors; negative values and non-integers are checked under count likelihoods."""
  check_values(counts, likelihood, path, field)
  if likelihood in COUNT_LIKELIHOODS:
    report_non_integers(non_integers(counts) / max(np.prod(counts.shape), 1), likelihood, path, field, on_fraction)


def check_values(counts: sp.csr_matrix, likelihood: str, path: str, field: str):
  """NaN/inf are errors; so are negative values under count likelihoods."""
  check_finite(counts, path, field)
  values = counts.data
  if likelihood in COUNT_LIKELIHOODS and (values < 0).any():
    raise DataError(f"{path}: {field} holds {int((values < 0).sum())} negative values, but likelihood "
                    f"{likelihood} needs raw counts; point the layer at raw counts or pick another likelihood")


def non_integers(counts: sp.csr_matrix) -> int:
  return int(np.count_nonzero(counts.data != np.round(counts.data)))


def report_non_integers(fraction: float, likelihood: str, path: str, field: str, on_fraction: str, stacklevel=3):
  """Non-integer counts under a count likelihood: an error (`on_fraction="error"`) or a warning."""
  if fraction > 0:
    message = (f"{path}: {field} has non-integer values in {fraction:.4%} of entries under likelihood "
               f"{likelihood}; training proceeds with the continuous NB density. Use raw integer counts if you "
               f"have them")
    if on_fraction == "error":
      raise DataError(message)
    warnings.warn(message, stacklevel=stacklevel)


def check_unique_names(adata: ad.AnnData, path: str):
  """Cells are paired and features aligned by name, so both must be unique."""
  for axis, names, fix in (("obs_names", adata.obs_names, "obs_names_make_unique"),
                           ("var_names", adata.var_names, "var_names_make_unique")):
    if not names.is_unique:
      duplicates = names[names.duplicated()].unique()
      raise DataError(f"{path}: {axis} are not unique ({len(duplicates)} repeated, e.g. {duplicates[:3].tolist()}); "
                      f"cells are paired and features matched by name, so make them unique "
                      f"(adata.{fix}()) and save the file again")


def nonzero_cells(counts: sp.csr_matrix, path: str, field: str) -> np.ndarray:
  """Mask of the cells with at least one non-zero value (`checked_cells`)."""
  return checked_cells(np.diff(counts.indptr) > 0, counts.shape[1], path, field)


def checked_cells(keep: np.ndarray, n_features: int, path: str, field: str, stacklevel: int = 4) -> np.ndarray:
  """`keep`, the cells with data: an error when there is none, a warning with the number of the others."""
  if not keep.any():
    raise DataError(f"{path}: no cell has a non-zero value in {field} ({len(keep)} cells, {n_features} "
                    f"features); point it at the layer holding the data")
  if not keep.all():
    warnings.warn(f"{path}: dropped {int((~keep).sum())} of {len(keep)} cells whose {field} is zero in every "
                  f"feature (nothing to reconstruct)", stacklevel=stacklevel)
  return keep


def nonzero_features(counts: sp.csr_matrix, path: str, field: str) -> np.ndarray:
  """Mask of the features with at least one non-zero value (`checked_features`)."""
  return checked_features(np.bincount(counts.indices, minlength=counts.shape[1]) > 0, path, field)


def checked_features(keep: np.ndarray, path: str, field: str, stacklevel: int = 4) -> np.ndarray:
  """`keep`, the features with data, with a warning giving the number of the others."""
  if not keep.all():
    warnings.warn(f"{path}: {int((~keep).sum())} of {len(keep)} features are zero in every cell of {field}; "
                  f"they are not used as decoder features", stacklevel=stacklevel)
  return keep


def representation_features(spec, features: np.ndarray, var_names, rep_features) -> np.ndarray | None:
  """Names of the features a PCA / LSI reads: a trained model's `rep_features`, else the decoder features or all
  (`spec.rep_features`); None when the representation is not fitted."""
  if rep_features is None and spec.rep in ("pca", "lsi"):
    rep_features = features if spec.rep_features == "decoder" else var_names
  return None if rep_features is None else np.asarray(rep_features).astype(str)


def align_features(matrix, var_names, features, path: str, field: str) -> sp.csr_matrix:
  """`matrix` (cells x `var_names`) with its columns taken by name in the order of `features`, as float32 CSR.

  For data seen by a trained model (a resumed run, inference): columns the model does not know are left out, and a
  feature it was trained on that is missing is an error listing the missing names.
  """
  matrix = as_csr(matrix)
  var_names = pd.Index(np.asarray(var_names).astype(str))
  features = pd.Index(np.asarray(features).astype(str))
  if var_names.equals(features):
    return matrix
  if not var_names.is_unique:
    raise DataError(f"{path}: var_names are not unique, so {field} cannot be matched to the model's features by "
                    f"name; make them unique (adata.var_names_make_unique())")
  positions = var_names.get_indexer(features)
  missing = features[positions < 0]
  if len(missing):
    raise DataError(f"{path}: {len(missing)} of the {len(features)} features the model was trained on are missing "
                    f"from {field} (e.g. {missing[:5].tolist()}); the model needs all of them, matched by var_names")
  return matrix[:, positions]


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


def select_features(var: pd.DataFrame, spec, dispersion=None, totals=None) -> np.ndarray:
  """Decoder features: var["highly_variable"] if present, else spec.feature_selection of spec.n_features.

  `dispersion(n)` gives the mask of the n most dispersed features and `totals()` the features' total counts, each
  computed only when needed (from the counts in memory, or from moments streamed over row chunks).
  """
  if "highly_variable" in var:
    return var["highly_variable"].to_numpy(bool)
  n_top = spec.n_features
  if spec.feature_selection == "all" or n_top >= len(var):
    return np.ones(len(var), bool)
  if spec.feature_selection == "dispersion":
    return dispersion(n_top)
  if spec.feature_selection == "total_counts":
    return preprocess.top_by_total(totals(), n_top)
  raise DataError(f"feature_selection={spec.feature_selection!r}: use all, dispersion or total_counts")


def chosen_features(var: pd.DataFrame, var_names, nonzero: np.ndarray, spec, path: str, dispersion=None,
                    totals=None) -> np.ndarray:
  """Names of the decoder features, chosen among the `nonzero` features (see `select_features`; the callables see
  only the nonzero features)."""
  chosen = np.flatnonzero(nonzero)[select_features(var[nonzero], spec, dispersion, totals)]
  if chosen.size == 0:
    raise DataError(f"{path}: no decoder feature selected (var['highly_variable'] False for every feature with "
                    f"data?)")
  return np.asarray(var_names[chosen]).astype(str)


def decoder_features(adata: ad.AnnData, counts: sp.csr_matrix, spec, path: str, field: str) -> np.ndarray:
  """Names of the decoder features, chosen among the features that are not zero in every cell."""
  nonzero = nonzero_features(counts, path, field)
  return chosen_features(adata.var, adata.var_names, nonzero, spec, path,
                         dispersion=lambda n_top: preprocess.select_by_dispersion(counts[:, nonzero], n_top),
                         totals=lambda: np.asarray(counts[:, nonzero].sum(axis=0), np.float64).ravel())


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
  """A modality read and checked, before any fitting (cells with no data already dropped)."""

  adata: ad.AnnData  # Streamed: obs and var only.
  spec: object
  path: str
  counts: sp.csr_matrix | None  # All features of the count layer; None when streamed.
  features: np.ndarray  # Names of the decoder features.
  rep_features: np.ndarray | None  # Names of the features the representation is fitted on; None if not fitted.
  file: object = None  # Streamed: where the rows are read from (`streaming.StreamedFile`).


def read_modality(name: str, spec, count_check: str = "warn", trained: dict | None = None,
                  adata: ad.AnnData | None = None) -> RawModality:
  """Reads and checks one modality, from `spec.path` or from the in-memory `adata` (errors then name the object);
  `trained` ({"features", "rep_features"}) fixes the features of a trained model."""
  if adata is None:
    adata, path = read_anndata(name, spec), str(spec.path)
  elif not isinstance(adata, ad.AnnData):
    raise DataError(f"the data of modality {name!r} is a {type(adata).__name__}, not an AnnData")
  else:
    path = f"the in-memory AnnData of {name!r}"
  if spec.obsm_key:
    adata = obsm_modality(adata, name, spec, path)
  check_unique_names(adata, path)
  layer_field = f"data.modalities.{name}.{'obsm_key' if spec.obsm_key else 'layer'}"
  field = f"{layer_field}={spec.obsm_key or spec.layer!r}"
  counts = as_csr(layer_matrix(adata, count_layer(spec), path, layer_field))
  check_counts(counts, spec.likelihood, path, field, count_check)
  keep = nonzero_cells(counts, path, field)
  if not keep.all():
    with ad.settings.override(remove_unused_categories=False):  # Batch categories stay those of the file.
      adata, counts = adata[keep], counts[keep]
  if trained is None:
    features, rep_features = decoder_features(adata, counts, spec, path, field), None
  else:
    features, rep_features = np.asarray(trained["features"]).astype(str), trained["rep_features"]
  rep_features = representation_features(spec, features, adata.var_names, rep_features)
  return RawModality(adata, spec, path, counts, features, rep_features)


def decoder_counts(raw: RawModality, name: str) -> sp.csr_matrix:
  return align_features(raw.counts, raw.adata.var_names, raw.features, raw.path, f"data.modalities.{name}.layer")


def representation_layer(spec, name: str) -> tuple:
  """(layer, config field) of the matrix a modality's PCA / LSI is fitted on: the counts for LSI, else rep_layer."""
  if spec.rep == "lsi":
    return count_layer(spec), f"data.modalities.{name}.layer"
  return spec.rep_layer, f"data.modalities.{name}.rep_layer"


def representation_input(spec, matrix, var_names, rep_features, path: str, field: str):
  """Rows of the layer a PCA / LSI reads, as it reads them: columns in the order of `rep_features`, checked finite,
  normalised (`rep_normalize`, PCA only). Every step works row by row, so chunks of rows give the rows of the whole."""
  source = align_features(matrix, var_names, rep_features, path, field)
  check_finite(source, path, field)
  return source if spec.rep == "lsi" else normalize(source, spec.rep_normalize)


def representation_source(raw: RawModality, name: str):
  """The matrix the PCA / LSI is fitted on and applied to, its columns in the order of `raw.rep_features`."""
  layer, field = representation_layer(raw.spec, name)
  matrix = raw.counts if raw.spec.rep == "lsi" else layer_matrix(raw.adata, layer, raw.path, field)
  return representation_input(raw.spec, matrix, raw.adata.var_names, raw.rep_features, raw.path, field)


def fit_rows(raw: RawModality, name: str, train_rows: np.ndarray, seed: int) -> np.ndarray:
  """The training rows a PCA / LSI is fitted on: all of them, or a seeded subset of `rep_fit_cells` (sorted)."""
  if 0 < raw.spec.rep_fit_cells < len(train_rows):
    return np.sort(sampler.rep_fit_stream(seed).choice(train_rows, raw.spec.rep_fit_cells, replace=False))
  return train_rows


def fit_representation(raw: RawModality, name: str, train_rows: np.ndarray, seed: int, reader=None) -> dict:
  """Fits the PCA / LSI state on the training cells (a seeded subset of `rep_fit_cells` of them when that is set and
  smaller); {} when the representation is given or not used."""
  spec = raw.spec
  if spec.rep in ("none", "obsm"):
    return {}
  rows = fit_rows(raw, name, train_rows, seed)
  source = (reader or MemoryReader()).representation_rows(raw, name, rows)
  if spec.rep == "pca":
    return preprocess.state_to_arrays(preprocess.fit_pca(source, spec.rep_dim, seed=seed, solver=spec.rep_solver))
  if spec.rep == "lsi":
    return preprocess.state_to_arrays(preprocess.fit_lsi(source, spec.rep_dim, seed=seed))
  raise DataError(f"data.modalities.{name}.rep={spec.rep!r}: use pca, lsi, obsm or none")


def project(spec, state: dict, source) -> np.ndarray:
  """The fitted PCA / LSI `state` applied to rows of `representation_input` (float32)."""
  fitted = preprocess.state_from_arrays(state)
  if spec.rep == "pca":
    return preprocess.transform_pca(fitted, source).astype(np.float32)
  return preprocess.transform_lsi(fitted, source).astype(np.float32)


def apply_representation(raw: RawModality, name: str, state: dict):
  spec = raw.spec
  if spec.rep == "none":
    return None
  if spec.rep == "obsm":
    field = f"data.modalities.{name}.rep_key"
    if spec.rep_key not in raw.adata.obsm:
      raise DataError(f"{raw.path}: obsm has no key {spec.rep_key!r} ({field}); available: {list(raw.adata.obsm)}. "
                      f"Set --config.{field}=<one of them>")
    rep = np.asarray(raw.adata.obsm[spec.rep_key], np.float32)
    check_finite(sp.csr_matrix(rep), raw.path, f"obsm[{spec.rep_key!r}] ({field})")
    return rep
  return project(spec, state, representation_source(raw, name))


def grown_categories(raw: RawModality, categories: tuple) -> tuple:
  """`categories` followed by the batches of `raw`'s cells that are not among them (sorted)."""
  key = raw.spec.batch_key
  if not key or key not in raw.adata.obs:
    return tuple(categories)  # build_modality names a missing column.
  seen = {str(v) for v in raw.adata.obs[key].dropna().unique()}
  return tuple(categories) + tuple(sorted(seen - set(categories)))


class MemoryReader:
  """Reads every modality whole into memory (`read_modality`): the data path for data that fit there."""

  def read(self, name: str, spec, count_check: str, trained: dict | None, adata: ad.AnnData | None) -> RawModality:
    return read_modality(name, spec, count_check, trained, adata)

  def representation_rows(self, raw: RawModality, name: str, rows: np.ndarray):
    """`rows` of the matrix the PCA / LSI is fitted on (`representation_source`)."""
    return representation_source(raw, name)[rows]

  def paired(self, raws: dict, pairing: sampler.Pairing):
    """Nothing: AnnData objects given in memory are the caller's and are not changed."""

  def training_arrays(self, name: str, raw: RawModality, state: dict) -> tuple:
    """(decoder counts, encoder inputs or None, log-factorials or None) of every cell."""
    counts = decoder_counts(raw, name)
    return (counts, apply_representation(raw, name, state),
            row_log_factorials(counts) if raw.spec.likelihood == "NB" else None)


def build_modality(name: str, raw: RawModality, state: dict, batch_categories, label_categories,
                   reader=None) -> Modality:
  spec, adata = raw.spec, raw.adata
  n = adata.n_obs
  if spec.batch_key:
    batch, batch_categories = obs_codes(adata, spec.batch_key, raw.path, f"data.modalities.{name}.batch_key",
                                        batch_categories)
    if (batch < 0).any():
      raise DataError(f"{raw.path}: obs[{spec.batch_key!r}] has {int((batch < 0).sum())} cells with a missing "
                      f"or unknown batch (known: {list(batch_categories)}); give every cell one of them")
  else:
    batch, batch_categories = np.zeros(n, np.int32), ("all",)
  label = np.full(n, -1, np.int32)
  if spec.label_key:
    label, _ = obs_codes(adata, spec.label_key, raw.path, f"data.modalities.{name}.label_key", label_categories)
  counts, rep, log_factorial = (reader or MemoryReader()).training_arrays(name, raw, state)
  return Modality(name=name, path=raw.path, obs=adata.obs.copy(), features=raw.features, counts=counts,
                  rep=rep, rep_features=raw.rep_features, batch=batch, batch_categories=tuple(batch_categories),
                  label=label, preprocess=state, log_factorial=log_factorial)


def median_total(counts) -> float:
  """Median total counts per cell: an NB target's default library size at prediction."""
  return float(np.median(np.asarray(counts.sum(axis=1)).ravel()))


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


def check_pairs(pairing: sampler.Pairing, raws: dict, pair_by: str):
  """Pairing by obs_names that pairs nothing is almost always a naming mismatch between the files."""
  if pair_by == "obs_names" and len(sampler.paired_ids(pairing)) == 0:
    examples = "; ".join(f"{r.path}: {r.adata.obs_names[:2].tolist()}" for r in raws.values())
    raise DataError(f"no cell is in two modalities: data.pair_by='obs_names' pairs cells by name and no obs_name "
                    f"occurs in two files ({examples}). Give paired cells the same obs_names, or set "
                    f"--config.data.pair_by=none to train on unpaired cells")


def multi_modal(pairing: sampler.Pairing, ids: np.ndarray) -> np.ndarray:
  """Whether each of the cell IDs `ids` is measured in two or more modalities."""
  return np.sum([rows[ids] >= 0 for rows in pairing.rows.values()], axis=0) >= 2


def load_dataset(data, seed: int, *, batch_size: int = 1, monitor: str = "val_loss", shared_batches: bool = False,
                 fitted: Fitted | None = None, new_batches: bool = False, inputs: dict | None = None,
                 report=lambda message: None, reader=None) -> Dataset:
  """Reads, checks, pairs, splits and preprocesses every modality of `data` (a config's `data` group).

  Args:
    data: the `data` group of a config.
    seed: the run's seed (the held-out pairs, the split and the representation's fit draw from it).
    batch_size: the training batch size (`train.batch_size`): the split must hold at least one batch.
    monitor: `train.monitor`; "heldout_foscttm" and "unseen_foscttm" need held-out pairs / paired validation cells.
    shared_batches: `model.shared_batches`: every modality must then have the same batch categories.
    fitted: the features, fitted preprocessing and categories of a trained model, used instead of choosing and
      fitting them anew; the data's features are matched to it by name.
    new_batches: with `fitted` (fine-tuning), append batch categories the model never saw, in sorted order, instead
      of refusing them.
    inputs: {modality: AnnData} in memory (e.g. from `clue_jax.fit`) instead of the files of those modalities.
    report: called with a line on each step that takes time (each modality read, each representation fitted).
    reader: how the files are read: `MemoryReader()` (the default) reads each whole; `streaming.DiskReader` reads
      them in row chunks into an on-disk store.

  Returns:
    The `Dataset`. Raises `DataError` naming the file, the field and the fix for bad input.
  """
  reader = reader or MemoryReader()
  names = modality_order(data)
  if len(names) < 2:
    raise DataError(f"CLUE needs at least two modalities; data.modalities has {names}")
  raws = {}
  for name in names:
    trained = None if fitted is None else {"features": fitted.features[name],
                                           "rep_features": fitted.rep_features.get(name)}
    started = time.perf_counter()
    raws[name] = reader.read(name, data.modalities[name], data.count_check, trained, (inputs or {}).get(name))
    report(f"{name}: read {raws[name].adata.n_obs:,} cells x {raws[name].adata.n_vars:,} features of "
           f"{raws[name].path} in {time.perf_counter() - started:.1f} s")
  pairing = sampler.pair_cells({n: r.adata.obs_names for n, r in raws.items()}, data.pair_by)
  check_pairs(pairing, raws, data.pair_by)
  reader.paired(raws, pairing)
  rng = sampler.split_stream(seed)
  heldout = None
  if data.heldout_pairs > 0:
    pairing, heldout = sampler.hide_pairs(pairing, data.heldout_pairs, rng)
  if heldout is None and monitor == "heldout_foscttm":
    raise DataError(f"train.monitor='heldout_foscttm' needs held-out pairs, but data.heldout_pairs="
                    f"{data.heldout_pairs} hides none of the {len(sampler.paired_ids(pairing))} paired "
                    f"cells; raise data.heldout_pairs or set --config.train.monitor=val_loss")
  train_ids, val_ids = sampler.split_ids(len(pairing.ids), data.val_split, rng)
  if monitor == "unseen_foscttm" and not multi_modal(pairing, val_ids).sum() > 1:
    raise DataError(f"train.monitor='unseen_foscttm' needs validation cells measured in two modalities, but the "
                    f"validation split (data.val_split={data.val_split}) holds "
                    f"{multi_modal(pairing, val_ids).sum()}; raise data.val_split or set "
                    f"--config.train.monitor=val_loss")
  label_categories = tuple(fitted.label_categories) if fitted else label_categories_of(raws)
  modalities = {}
  for name in names:
    rows = pairing.rows[name][train_ids]
    rows = np.sort(rows[rows >= 0])
    if fitted:
      state = fitted.preprocess[name]
      batch_categories = fitted.batch_categories[name]
      if new_batches:
        batch_categories = grown_categories(raws[name], batch_categories)
    else:
      if rows.size == 0:
        raise DataError(f"{raws[name].path}: no cell of modality {name!r} lands in the training split; lower "
                        f"data.val_split or add cells")
      started = time.perf_counter()
      state, batch_categories = fit_representation(raws[name], name, rows, seed, reader), None
      if state:
        report(f"{name}: {data.modalities[name].rep.upper()} fitted on "
               f"{len(fit_rows(raws[name], name, rows, seed)):,} training cells in "
               f"{time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    modalities[name] = build_modality(name, raws[name], state, batch_categories, label_categories, reader)
    report(f"{name}: training arrays built in {time.perf_counter() - started:.1f} s")
  if shared_batches:
    lists = {n: m.batch_categories for n, m in modalities.items()}
    if len(set(lists.values())) > 1:
      raise DataError(f"model.shared_batches=True needs the same batch categories in every modality, got {lists}; "
                      f"make the batch columns categorical with identical categories or set "
                      f"--config.model.shared_batches=False")
  if len(train_ids) < batch_size:
    raise DataError(f"only {len(train_ids)} training cell IDs, fewer than one batch "
                    f"(train.batch_size={batch_size}); lower the batch size or data.val_split")
  return Dataset(modalities, pairing, train_ids, val_ids, heldout, label_categories)


def steps_chunk(dataset: Dataset, epoch_rows: sampler.EpochRows, first_step: int, n_steps: int,
                batch_size: int) -> Batch:
  """Dense arrays of shape (n_steps, batch_size, ...) for steps first_step .. first_step + n_steps of an epoch."""
  sl = slice(first_step * batch_size, (first_step + n_steps) * batch_size)
  return minibatch(dataset, {n: r[sl].reshape(n_steps, batch_size) for n, r in epoch_rows.rows.items()},
                   {n: m[sl].reshape(n_steps, batch_size) for n, m in epoch_rows.masks.items()},
                   epoch_rows.valid[sl].reshape(n_steps, batch_size))


def minibatch(dataset: Dataset, rows: dict, masks: dict, valid: np.ndarray) -> Batch:
  """The dense minibatch of the given rows of every modality (leading axes as given, e.g. (steps, batch))."""
  modalities = {}
  for name, m in dataset.modalities.items():
    r = rows[name]
    modalities[name] = ModalityBatch(
        counts=m.counts[r.reshape(-1)].toarray().reshape(*r.shape, -1), batch=m.batch[r], label=m.label[r],
        mask=masks[name].astype(np.float32), rep=None if m.rep is None else m.rep[r],
        log_factorial=None if m.log_factorial is None else m.log_factorial[r])
  return Batch(modalities, valid.astype(np.float32))
