"""Training data kept on the devices; minibatches are gathered, and sparse counts densified, inside the jitted step.

Counts are stored as they are in CSR (the non-zeros' columns and values in one flat array each, and each cell's
offset into them), so the devices hold about the CSR's size, never the counts densified or padded to the longest cell.
A step reads its rows' non-zeros (up to the longest cell's number, a static width) and scatters them into a dense
(batch, features) block. An epoch then costs one explicit host-to-device copy of its row indices, and none per step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from clue_jax.batch import Batch, ModalityBatch, padded_steps
from clue_jax.data import dataset as data_lib, sampler


def host_arrays(dataset: data_lib.Dataset) -> dict:
  """The per-cell arrays of every modality, ready to be put on the devices: counts as CSR (`indptr`, `indices`,
  `values`), batch and label indices, and the representation and log-factorials where the modality has them."""
  out = {}
  for name, m in dataset.modalities.items():
    counts = m.counts.tocsr()
    if counts.nnz >= 2**31:
      raise data_lib.DataError(f"{m.path}: {counts.nnz:,} non-zeros in {name!r}, more than the devices index with "
                               f"int32; train with --config.train.data_on_device=False")
    arrays = {"indptr": counts.indptr.astype(np.int32), "indices": counts.indices.astype(np.int32),
              "values": counts.data.astype(np.float32), "batch": m.batch, "label": m.label}
    if m.rep is not None:
      arrays["rep"] = m.rep
    if m.log_factorial is not None:
      arrays["log_factorial"] = m.log_factorial
    out[name] = arrays
  return out


def widths(dataset: data_lib.Dataset) -> dict:
  """{modality: (features, the longest cell's non-zeros)}: the static shapes `gather` needs."""
  return {n: (m.counts.shape[1], max(int(np.diff(m.counts.indptr).max(initial=0)), 1))
          for n, m in dataset.modalities.items()}


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


def gather(arrays: dict, indices: dict, shapes: dict) -> Batch:
  """One step's minibatch, as `data_lib.minibatch` builds it on the host, from device-resident arrays, (batch,)
  indices and the static `widths`."""
  modalities = {}
  for name, modality in arrays.items():
    rows = indices["rows"][name]
    n_features, width = shapes[name]
    start = modality["indptr"][rows]
    position = jnp.arange(width)
    held = position[None, :] < (modality["indptr"][rows + 1] - start)[:, None]
    flat = jnp.minimum(start[:, None] + position[None, :], modality["values"].shape[0] - 1)
    columns = jnp.where(held, modality["indices"][flat], 0)
    values = jnp.where(held, modality["values"][flat], 0.0)
    dense = jnp.zeros((rows.shape[0], n_features), values.dtype)
    counts = dense.at[jnp.arange(rows.shape[0])[:, None], columns].add(values)
    optional = {key: modality[key][rows] for key in ("rep", "log_factorial") if key in modality}
    modalities[name] = ModalityBatch(counts=counts, batch=modality["batch"][rows], label=modality["label"][rows],
                                     mask=indices["masks"][name], **optional)
  return Batch(modalities, indices["valid"])
