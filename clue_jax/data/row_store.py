"""One modality's training rows kept on disk (the streaming data path), written once in row chunks and read back any
rows at a time.

A store is a directory of raw little-endian files: `records.bin` holds every row's non-zeros as (column int32,
value float32) pairs, row after row; `rep.bin` every row's encoder input (float32, fixed width), when the modality
has one; `indptr.npy` each row's first record and `totals.npy` each row's total count. Only those (16 bytes a row)
are held in memory. Rows are read
with positional reads (`os.pread`), never memory-mapped, so what a process holds stays what it asked for (page cache
is the kernel's, not the process's), and reads are safe from several threads. Runs of consecutive rows are read in
one call, so a sequential pass costs one read per chunk.
"""

import os
import pathlib

import numpy as np
import scipy.sparse as sp

RECORD = np.dtype([("column", "<i4"), ("value", "<f4")])


class StoreWriter:
  """Appends row chunks (decoder counts as CSR, encoder inputs as a dense block or None) to a new store."""

  def __init__(self, directory: pathlib.Path, n_features: int):
    self.directory, self.n_features = pathlib.Path(directory), n_features
    self.directory.mkdir(parents=True, exist_ok=True)
    self.records = open(self.directory / "records.bin", "wb")
    self.rep = None
    self.offsets = [np.zeros(1, np.int64)]
    self.totals = []
    self.total = 0

  def append(self, counts: sp.csr_matrix, rep: np.ndarray | None):
    records = np.empty(counts.nnz, RECORD)
    records["column"], records["value"] = counts.indices, counts.data
    self.records.write(records.tobytes())
    self.offsets.append(self.total + counts.indptr[1:].astype(np.int64))
    self.total += counts.nnz
    self.totals.append(np.asarray(counts.sum(axis=1)).ravel())  # As csr_matrix.sum gives them.
    if rep is not None:
      if self.rep is None:
        self.rep = open(self.directory / "rep.bin", "wb")
      self.rep.write(np.ascontiguousarray(rep, "<f4").tobytes())

  def close(self, rep_dim: int | None):
    """Finishes the store: offsets, totals and shapes written."""
    self.records.close()
    if self.rep is not None:
      self.rep.close()
    indptr = np.concatenate(self.offsets)
    np.save(self.directory / "indptr.npy", indptr)
    np.save(self.directory / "totals.npy", np.concatenate([np.zeros(0, np.float32), *self.totals]))
    np.save(self.directory / "shape.npy", np.array([len(indptr) - 1, self.n_features, rep_dim or 0], np.int64))


def _runs(unique_rows: np.ndarray):
  """(first, stop) of each run of consecutive values in sorted unique rows."""
  breaks = np.flatnonzero(np.diff(unique_rows) != 1) + 1
  starts = np.concatenate([[0], breaks])
  ends = np.concatenate([breaks, [len(unique_rows)]])
  return unique_rows[starts], unique_rows[ends - 1] + 1


def _read(fd: int, start: int, size: int, path: pathlib.Path) -> bytes:
  data = os.pread(fd, size, start)
  while len(data) < size:  # Short reads happen for very large requests.
    more = os.pread(fd, size - len(data), start + len(data))
    if not more:
      raise OSError(f"{path}: ends at byte {start + len(data):,}, {size - len(data):,} bytes short; the store is "
                    f"truncated (delete it to have it rebuilt)")
    data += more
  return data


class DiskCounts:
  """A store's decoder counts, read like the rows of a CSR matrix: `counts[rows]` is a float32 `csr_matrix`.

  `rows_read` counts the rows asked for so far (what this process has read of the store).
  """

  def __init__(self, directory: pathlib.Path):
    self.path = pathlib.Path(directory) / "records.bin"
    self.indptr = np.load(pathlib.Path(directory) / "indptr.npy")
    n, n_features, _ = np.load(pathlib.Path(directory) / "shape.npy")
    self.shape = (int(n), int(n_features))
    self.totals = np.load(pathlib.Path(directory) / "totals.npy")
    self.fd = os.open(self.path, os.O_RDONLY)
    self.rows_read = 0

  def sum(self, axis: int) -> np.ndarray:
    """Total counts per row, as `csr_matrix.sum(axis=1)` gives them ((rows, 1)); only axis 1."""
    if axis != 1:
      raise ValueError("a store sums its rows only (axis=1)")
    return self.totals[:, None]

  @property
  def nnz(self) -> int:
    return int(self.indptr[-1])

  def __getitem__(self, rows) -> sp.csr_matrix:
    rows = np.asarray(rows).reshape(-1)
    self.rows_read += len(rows)
    unique, inverse = np.unique(rows, return_inverse=True)
    first, stop = _runs(unique)
    size = RECORD.itemsize
    data = b"".join(_read(self.fd, int(self.indptr[a]) * size, int(self.indptr[b] - self.indptr[a]) * size,
                          self.path) for a, b in zip(first, stop))
    records = np.frombuffer(data, RECORD)
    lengths = self.indptr[unique + 1] - self.indptr[unique]
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    block = sp.csr_matrix((records["value"], records["column"], indptr), shape=(len(unique), self.shape[1]))
    return block if len(unique) == len(rows) and (unique == rows).all() else block[inverse]

  def close(self):
    os.close(self.fd)


class DiskRep:
  """A store's encoder inputs: `rep[rows]` is a float32 array of shape rows.shape + (width,)."""

  def __init__(self, directory: pathlib.Path):
    self.path = pathlib.Path(directory) / "rep.bin"
    n, _, width = np.load(pathlib.Path(directory) / "shape.npy")
    self.shape = (int(n), int(width))
    self.fd = os.open(self.path, os.O_RDONLY)

  def __getitem__(self, rows) -> np.ndarray:
    rows = np.asarray(rows)
    unique, inverse = np.unique(rows.reshape(-1), return_inverse=True)
    first, stop = _runs(unique)
    row_bytes = self.shape[1] * 4
    data = b"".join(_read(self.fd, int(a) * row_bytes, int(b - a) * row_bytes, self.path) for a, b in zip(first, stop))
    block = np.frombuffer(data, "<f4").reshape(len(unique), self.shape[1])
    return block[inverse].reshape(*rows.shape, self.shape[1])

  def close(self):
    os.close(self.fd)
