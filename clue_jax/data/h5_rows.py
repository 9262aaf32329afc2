"""A matrix of an AnnData file (X, a layer, or an obsm array), read a block of rows at a time (CSR through anndata's
`sparse_dataset`, dense arrays with h5py).

The file is never read whole: only its row offsets (CSR) are held, and each block is read when asked for. Blocks are
cut so that each holds about `BLOCK_VALUES` stored values. Whatever goes wrong while reading a block (a truncated or
damaged file) is reported naming the file, the matrix and the rows.
"""

import h5py
import numpy as np
import scipy.sparse as sp
from anndata.io import sparse_dataset

BLOCK_VALUES = 2**23  # Stored values (non-zeros, or entries of a dense matrix) per block: 64 MiB as CSR float32.


class UnreadableRows(Exception):
  """A block of rows could not be read; `str` says which and why."""


class H5Rows:
  """The rows of one matrix in an open HDF5 file: a CSR group (anndata's csr_matrix encoding) or a 2-D dataset.

  A CSC group (stored column by column) cannot be cut into rows on disk: it is read whole once and cut in memory.
  """

  def __init__(self, element, where: str, block_values: int = BLOCK_VALUES):
    self.element, self.where = element, where
    self.sparse = isinstance(element, h5py.Group)
    self.whole = None
    if self.sparse and element.attrs.get("encoding-type") == "csc_matrix":
      self.whole = self._read_whole_csc()
      self.indptr = self.whole.indptr.astype(np.int64)
      self.shape = self.whole.shape
    elif self.sparse:
      self.rows = sparse_dataset(element)  # anndata's reader of its CSR encoding: reads only the rows sliced.
      self.shape = tuple(int(v) for v in element.attrs["shape"])
      self.indptr = element["indptr"][:].astype(np.int64)
    else:
      self.shape = tuple(int(v) for v in element.shape)
      self.indptr = None
    self.block_values = block_values

  def blocks(self):
    """(first row, stop row) of consecutive blocks covering every row."""
    n = self.shape[0]
    if self.sparse:
      bounds = [0]
      per_row = np.diff(self.indptr)
      cumulative = np.cumsum(per_row)
      while bounds[-1] < n:
        start = bounds[-1]
        target = (cumulative[start - 1] if start else 0) + self.block_values
        stop = int(np.searchsorted(cumulative, target, side="right"))
        bounds.append(min(n, max(stop, start + 1)))
    else:
      step = max(1, self.block_values // max(self.shape[1], 1))
      bounds = list(range(0, n, step)) + [n]
    return list(zip(bounds[:-1], bounds[1:]))

  def _read_whole_csc(self) -> sp.csr_matrix:
    try:
      shape = tuple(int(v) for v in self.element.attrs["shape"])
      return sp.csc_matrix((self.element["data"][:].astype(np.float32, copy=False), self.element["indices"][:],
                            self.element["indptr"][:]), shape=shape).tocsr()
    except Exception as e:
      raise UnreadableRows(f"{self.where} cannot be read ({type(e).__name__}: {e}); the file may be truncated or "
                           f"damaged") from e

  def read(self, start: int, stop: int) -> sp.csr_matrix:
    """Rows start..stop as float32 CSR without stored zeros (duplicate entries summed)."""
    try:
      if self.whole is not None:
        block = self.whole[start:stop]
      elif self.sparse:
        block = sp.csr_matrix(self.rows[start:stop], dtype=np.float32)
      else:
        block = sp.csr_matrix(np.asarray(self.element[start:stop], np.float32))
    except Exception as e:  # h5py raises many types for damaged files.
      raise UnreadableRows(f"rows {start:,}-{stop - 1:,} of {self.where} cannot be read ({type(e).__name__}: {e}); "
                           f"the file may be truncated or damaged") from e
    block.sum_duplicates()
    block.eliminate_zeros()
    return block

  def dense(self, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of a dense matrix (an obsm array) as float32."""
    try:
      return np.asarray(self.element[start:stop], np.float32)
    except Exception as e:
      raise UnreadableRows(f"rows {start:,}-{stop - 1:,} of {self.where} cannot be read ({type(e).__name__}: {e}); "
                           f"the file may be truncated or damaged") from e
