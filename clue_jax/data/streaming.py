"""The streaming data path: each modality's file read a block of rows at a time, never whole, into an on-disk store.

`DiskReader` stands in for `dataset.MemoryReader` in `dataset.load_dataset` and gives the same `Dataset`, except
that each modality's decoder counts and encoder inputs live in a `row_store` (read back any rows at a time) instead of
memory. What it holds is bounded by a block of rows, the obs and var tables, a few numbers per cell and per feature,
and the rows the PCA / LSI is fitted on (`rep_fit_cells`: set it for atlases). Passes over a modality's file:

1. the checks of a file read whole (the same messages, naming the rows), the cells and features with data, and the
   per-feature sums that feature selection needs;
2. (dispersion selection only) the centred second moments;
3. the rows the PCA / LSI is fitted on;
4. the training arrays: decoder counts, encoder inputs and log-factorials, written block by block.

Every step works row by row or sums over rows, so the arrays equal those of `MemoryReader` (up to the order of
floating-point sums in the feature statistics).
"""

import ctypes
import dataclasses
import pathlib
import shutil
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem
from tqdm.auto import tqdm

from clue_jax.data import dataset as data_lib, preprocess, row_store, sampler
from clue_jax.data.dataset import DataError
from clue_jax.data import h5_rows
from clue_jax.data.h5_rows import H5Rows, UnreadableRows


@dataclasses.dataclass
class StreamedFile:
  """An open modality file: its AnnData group, the count layer's rows, and which of them hold data."""

  path: pathlib.Path
  file: h5py.File
  group: h5py.Group
  counts: H5Rows
  kept: np.ndarray  # File rows of the cells kept (those with data), in order.

  def layer(self, layer: str, field: str, block_values: int) -> H5Rows:
    return H5Rows(layer_element(self.group, layer, self.path, field), f"{self.path}: {layer}", block_values)


def layer_element(group: h5py.Group, layer: str, path, field: str):
  """The HDF5 element of `layer` ("X" or a layer name), as `dataset.layer_matrix` finds it in an AnnData."""
  if layer == "X":
    if "X" not in group:
      raise DataError(f"{path}: X is empty ({field}=X); name a layer holding the data instead")
    element = group["X"]
  else:
    layers = list(group["layers"]) if "layers" in group else []
    if layer not in layers:
      raise DataError(f"{path}: no layer {layer!r} ({field}); available layers: {layers} or 'X'. "
                      f"Set --config.{field}=<one of them>")
    element = group["layers"][layer]
  encoding = element.attrs.get("encoding-type", "array" if isinstance(element, h5py.Dataset) else "")
  if encoding not in ("csr_matrix", "csc_matrix", "array"):
    raise DataError(f"{path}: {layer} is stored as {encoding or 'an unknown encoding'}, which cannot be read a block "
                    f"of rows at a time ({field}); save it as CSR (adata.X = adata.X.tocsr(); "
                    f"adata.write_h5ad(...)) or read the file whole with --config.data.storage=memory")
  if encoding == "csc_matrix" and element["indptr"][-1] > h5_rows.BLOCK_VALUES:
    warnings.warn(f"{path}: {layer} is stored column by column (CSC), so streaming reads it whole once to cut it "
                  f"into rows; save it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...)) to keep memory "
                  f"bounded", stacklevel=3)
  return element


def reading(rows: H5Rows, start: int, stop: int, path, field: str) -> sp.csr_matrix:
  try:
    return rows.read(start, stop)
  except UnreadableRows as e:
    raise DataError(f"{path}: {e} ({field})") from e


class DiskReader:
  """Reads each modality's file in blocks of rows into a store under `directory` (one subdirectory a modality)."""

  def __init__(self, directory: pathlib.Path, block_values: int | None = None, progress: bool = False):
    self.directory = pathlib.Path(directory)
    self.block_values = block_values or h5_rows.BLOCK_VALUES  # Stored values read at a time.
    self.progress = progress  # A tqdm bar over the blocks of each pass.

  def blocks(self, rows: H5Rows, what: str) -> list:
    """The blocks of `rows`, shown as a progress bar (`what` names the pass) when asked for."""
    return tqdm(rows.blocks(), desc=what, unit="block", leave=False, disable=not self.progress, dynamic_ncols=True)

  def read(self, name: str, spec, count_check: str, trained: dict | None, adata: ad.AnnData | None):
    if adata is not None:
      raise DataError(f"the data of modality {name!r} is already in memory; streaming reads files "
                      f"(set data.storage=memory)")
    path = data_lib.checked_path(name, spec)
    if spec.obsm_key:
      raise DataError(f"{path}: a modality kept in obsm (data.modalities.{name}.obsm_key={spec.obsm_key!r}) is "
                      f"read whole; set --config.data.storage=memory")
    try:
      file = h5py.File(path, "r")
      key = spec.mod_key or name if "mod" in file else None
      group = data_lib.anndata_group(file["mod"] if key else file, key, path, name)
      obs, var = read_elem(group["obs"]), read_elem(group["var"])
    except DataError:
      raise
    except Exception as e:
      raise DataError(f"{path}: cannot be read as AnnData (.h5ad) or MuData (.h5mu) (data.modalities.{name}.path), "
                      f"the file may be truncated or damaged: {type(e).__name__}: {e}") from e
    table = ad.AnnData(obs=obs, var=var)
    data_lib.check_unique_names(table, str(path))
    layer_field = f"data.modalities.{name}.layer"
    field = f"{layer_field}={spec.layer!r}"
    counts = H5Rows(layer_element(group, spec.layer, path, layer_field), f"{path}: {spec.layer}", self.block_values)
    if counts.shape != (table.n_obs, table.n_vars):
      raise DataError(f"{path}: {spec.layer} has shape {counts.shape}, obs and var say {table.shape}; the file is "
                      f"damaged ({layer_field})")
    dispersion = (trained is None and "highly_variable" not in var and spec.feature_selection == "dispersion"
                  and spec.n_features < table.n_vars)
    stats = first_pass(counts, self.blocks(counts, f"{name}: checking"), spec, path, field, count_check, dispersion)
    keep = data_lib.checked_cells(stats["keep"], table.n_vars, path, field, stacklevel=3)
    if not keep.all():
      with ad.settings.override(remove_unused_categories=False):
        table = table[keep].copy()
    file_ref = StreamedFile(path, file, group, counts, np.flatnonzero(keep))
    if trained is None:
      features = self.features(name, table, spec, file_ref, stats, path, field)
      rep_features = None
    else:
      features, rep_features = np.asarray(trained["features"]).astype(str), trained["rep_features"]
    rep_features = data_lib.representation_features(spec, features, table.var_names, rep_features)
    release_free_memory()
    return data_lib.RawModality(table, spec, str(path), None, features, rep_features, file_ref)

  def paired(self, raws: dict, pairing):
    """Rebuilds each modality's obs_names from the pairing's cell IDs where those are its names (cells paired by
    name): the same strings, held once for all modalities instead of once per modality, and without the lookup
    tables the checks left behind (at a million cells of two modalities, about 0.1 GB off the peaks, measured)."""
    names = {n: pd.Index(pairing.ids[sampler.row_ids(pairing, n)], dtype=object, copy=False) for n in raws}
    if all(raws[n].adata.obs_names.equals(names[n]) for n in raws):
      for n, raw in raws.items():
        raw.adata.obs_names = names[n]
    del names
    release_free_memory()

  def features(self, name: str, table: ad.AnnData, spec, file_ref: StreamedFile, stats: dict, path,
               field: str) -> np.ndarray:
    nonzero = data_lib.checked_features(stats["feature_nnz"] > 0, path, field)

    def dispersion(n_top):
      n = len(file_ref.kept)
      mean = stats["cp10k_sums"] / n
      squares = np.zeros_like(mean)
      for start, stop in self.blocks(file_ref.counts, f"{name}: dispersion"):
        block = reading(file_ref.counts, start, stop, path, field)
        squares += preprocess.centred_col_sq_sums(preprocess.cp10k(block[np.diff(block.indptr) > 0]), mean)
      variance = squares / max(n - 1, 1)
      return preprocess.top_by_dispersion(mean[nonzero], variance[nonzero], n_top)

    return data_lib.chosen_features(table.var, table.var_names, nonzero, spec, str(path), dispersion,
                                    lambda: stats["totals"][nonzero])

  def rows_of(self, raw, layer: str, field: str, rows: np.ndarray, what: str = ""):
    """Blocks (first kept row, CSR of those kept rows of `layer`) of the kept rows `rows` (sorted), in order; a
    progress bar when `what` names the pass."""
    source = raw.file.counts if layer == data_lib.count_layer(raw.spec) else raw.file.layer(layer, field,
                                                                                             self.block_values)
    file_rows = raw.file.kept[rows]
    for start, stop in self.blocks(raw.file.counts, what) if what else raw.file.counts.blocks():
      lo, hi = np.searchsorted(file_rows, [start, stop])
      if hi > lo:
        block = reading(source, start, stop, raw.path, field)
        yield lo, block[file_rows[lo:hi] - start]

  def representation_rows(self, raw, name: str, rows: np.ndarray):
    layer, field = data_lib.representation_layer(raw.spec, name)
    blocks = [block for _, block in self.rows_of(raw, layer, field, np.asarray(rows), f"{name}: fit rows")]
    matrix = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, raw.adata.n_vars), dtype=np.float32)
    del blocks
    release_free_memory()
    return data_lib.representation_input(raw.spec, matrix, raw.adata.var_names, raw.rep_features, raw.path, field)

  def training_arrays(self, name: str, raw, state: dict) -> tuple:
    spec, field = raw.spec, f"data.modalities.{name}.layer"
    directory = self.directory / name
    shutil.rmtree(directory, ignore_errors=True)
    writer = row_store.StoreWriter(directory, len(raw.features))
    every = np.arange(raw.adata.n_obs)
    rep_layer, rep_field = data_lib.representation_layer(spec, name)
    shared = spec.rep in ("pca", "lsi") and rep_layer == data_lib.count_layer(spec)  # One read serves both.
    rep_blocks = (None if shared or spec.rep == "none"
                  else self.obsm_blocks(raw, name) if spec.rep == "obsm"
                  else (block for _, block in self.rows_of(raw, rep_layer, rep_field, every)))
    log_factorials, rep_dim = [], None
    for _, block in self.rows_of(raw, data_lib.count_layer(spec), field, every, f"{name}: training arrays"):
      counts = data_lib.align_features(block, raw.adata.var_names, raw.features, raw.path, field)
      rep = None
      if spec.rep != "none":
        rep_block = block if shared else next(rep_blocks)
        if spec.rep == "obsm":
          rep = rep_block
        else:
          source = data_lib.representation_input(spec, rep_block, raw.adata.var_names, raw.rep_features, raw.path,
                                                 rep_field)
          rep = data_lib.project(spec, state, source)
        rep_dim = rep.shape[1]
      writer.append(counts, rep)
      if spec.likelihood == "NB":
        log_factorials.append(data_lib.row_log_factorials(counts))
    writer.close(rep_dim)
    raw.file.file.close()
    release_free_memory()
    return (row_store.DiskCounts(directory), None if rep_dim is None else row_store.DiskRep(directory),
            np.concatenate(log_factorials) if log_factorials else None)

  def obsm_blocks(self, raw, name: str):
    """Blocks of obsm[rep_key] for the kept rows, cut as `rows_of` cuts them."""
    field = f"data.modalities.{name}.rep_key"
    obsm = raw.file.group["obsm"] if "obsm" in raw.file.group else {}
    if raw.spec.rep_key not in obsm:
      raise DataError(f"{raw.path}: obsm has no key {raw.spec.rep_key!r} ({field}); available: {list(obsm)}. "
                      f"Set --config.{field}=<one of them>")
    rows = H5Rows(obsm[raw.spec.rep_key], f"{raw.path}: obsm[{raw.spec.rep_key!r}]", self.block_values)
    kept = raw.file.kept
    for start, stop in raw.file.counts.blocks():
      lo, hi = np.searchsorted(kept, [start, stop])
      if hi > lo:
        try:
          values = rows.dense(start, stop)[kept[lo:hi] - start]
        except UnreadableRows as e:
          raise DataError(f"{raw.path}: {e} ({field})") from e
        data_lib.check_finite(sp.csr_matrix(values), raw.path, f"obsm[{raw.spec.rep_key!r}] ({field})")
        yield values


def release_free_memory():
  """Hands the C heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere). A pass over blocks
  leaves the heap fragmented by its temporaries, which the process would otherwise keep: at a million cells, 0.3 GB
  of the 0.9 GB the process held after reading (measured)."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def first_pass(counts: H5Rows, blocks, spec, path, field: str, count_check: str, dispersion: bool) -> dict:
  """One pass over the count layer: value checks (naming the rows), which cells and features hold data, and the
  per-feature sums feature selection needs (raw totals; cp10k sums when `dispersion`)."""
  n_cells, n_features = counts.shape
  keep = np.zeros(n_cells, bool)
  feature_nnz = np.zeros(n_features, np.int64)
  totals = np.zeros(n_features)
  cp10k_sums = np.zeros(n_features) if dispersion else None
  non_integer = 0
  counted = spec.likelihood in data_lib.COUNT_LIKELIHOODS
  for start, stop in blocks:
    block = reading(counts, start, stop, path, field)
    where = f"{path} (rows {start:,}-{stop - 1:,})"
    data_lib.check_values(block, spec.likelihood, where, field)
    if counted:
      bad = data_lib.non_integers(block)
      if bad and count_check == "error":
        data_lib.report_non_integers(bad / (block.shape[0] * n_features), spec.likelihood, where, field, "error")
      non_integer += bad
    keep[start:stop] = np.diff(block.indptr) > 0
    feature_nnz += np.bincount(block.indices, minlength=n_features)
    totals += np.asarray(block.sum(axis=0), np.float64).ravel()
    if dispersion:
      cp10k_sums += np.asarray(preprocess.cp10k(block).sum(axis=0), np.float64).ravel()
  if counted:
    data_lib.report_non_integers(non_integer / max(n_cells * n_features, 1), spec.likelihood, str(path), field,
                                 count_check, stacklevel=4)
  return {"keep": keep, "feature_nnz": feature_nnz, "totals": totals, "cp10k_sums": cp10k_sums}


def stored_bytes(data) -> int:
  """What the count matrices of `data`'s modality files take as CSR in memory (8 bytes a stored value), read from the
  files' headers; 0 for a file that cannot be inspected (reading it whole then names what is wrong)."""
  total = 0
  for name in data.modalities.keys():
    spec = data.modalities[name]
    try:
      with h5py.File(pathlib.Path(spec.path).expanduser(), "r") as file:
        key = spec.mod_key or name if "mod" in file else None
        group = file["mod"][key] if key else file
        element = group[spec.obsm_key and "obsm/" + spec.obsm_key or
                        ("X" if spec.layer == "X" else f"layers/{spec.layer}")]
        total += 8 * (int(element["indptr"][-1]) if isinstance(element, h5py.Group) else int(element.size))
    except Exception:  # Reported by the reader that reads the file.
      continue
  return total
