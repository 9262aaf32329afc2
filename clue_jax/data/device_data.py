"""Training data kept on the devices; minibatches are gathered, and sparse counts densified, inside the jitted step.

Counts are stored row-padded sparse (each row's non-zeros, padded to the longest row with value 0), so that nothing
is ever densified whole: a step scatters only its rows' non-zeros into a dense (batch, features) block. An epoch then
costs one explicit host-to-device copy of its row indices, and none per step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from clue_jax.batch import Batch, ModalityBatch, padded_steps
from clue_jax.data import dataset as data_lib, sampler


def padded_rows(counts: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
  """(columns, values), each (cells, longest row): every row's non-zeros, padded with column 0 and value 0."""
  counts = counts.tocsr()
  lengths = np.diff(counts.indptr)
  width = max(int(lengths.max(initial=0)), 1)
  position = np.arange(counts.nnz) - np.repeat(counts.indptr[:-1], lengths)
  row = np.repeat(np.arange(counts.shape[0]), lengths)
  columns = np.zeros((counts.shape[0], width), np.int32)
  values = np.zeros((counts.shape[0], width), np.float32)
  columns[row, position] = counts.indices
  values[row, position] = counts.data
  return columns, values


def host_arrays(dataset: data_lib.Dataset) -> dict:
  """The per-cell arrays of every modality, ready to be put on the devices."""
  out = {}
  for name, m in dataset.modalities.items():
    columns, values = padded_rows(m.counts)
    arrays = {"columns": columns, "values": values, "batch": m.batch, "label": m.label}
    if m.rep is not None:
      arrays["rep"] = m.rep
    if m.log_factorial is not None:
      arrays["log_factorial"] = m.log_factorial
    out[name] = arrays
  return out


def epoch_chunks(epoch_rows: sampler.EpochRows, n_steps: int, batch_size: int, steps_per_chunk: int) -> list:
  """An epoch's rows, masks and valid flags, as one ((length, batch_size) tree, steps) pair per dispatched chunk.

  Every chunk has `length` = min(steps_per_chunk, n_steps) steps, the last one padded (`batch.padded_steps`), so one
  compiled program runs them all. Put the trees on the devices with one explicit `jax.device_put` per epoch; `gather`
  reads one step of a chunk.
  """
  n = n_steps * batch_size
  whole = {"rows": {k: v[:n].reshape(n_steps, batch_size).astype(np.int32) for k, v in epoch_rows.rows.items()},
           "masks": {k: v[:n].reshape(n_steps, batch_size) for k, v in epoch_rows.masks.items()},
           "valid": epoch_rows.valid[:n].reshape(n_steps, batch_size)}
  length = min(steps_per_chunk, n_steps)
  return [(padded_steps(jax.tree.map(lambda a: a[first:first + length], whole), length),
           min(length, n_steps - first)) for first in range(0, n_steps, length)]


def gather(arrays: dict, indices: dict, n_features: dict) -> Batch:
  """One step's minibatch, as `data_lib.minibatch` builds it on the host, from device-resident arrays and (batch,)
  indices."""
  modalities = {}
  for name, modality in arrays.items():
    rows = indices["rows"][name]
    size = rows.shape[0]
    dense = jnp.zeros((size, n_features[name]), modality["values"].dtype)
    counts = dense.at[jnp.arange(size)[:, None], modality["columns"][rows]].add(modality["values"][rows])
    optional = {key: modality[key][rows] for key in ("rep", "log_factorial") if key in modality}
    modalities[name] = ModalityBatch(counts=counts, batch=modality["batch"][rows], label=modality["label"][rows],
                                     mask=indices["masks"][name], **optional)
  return Batch(modalities, indices["valid"])
