"""Encoding cells in fixed-size padded chunks sharded over the devices, for training, evaluation and `api` alike.

Every chunk has the same shape, so each function compiles once; the last one is padded by repeating its first row.
With several processes each one builds only its share of every chunk (`parallel.process_rows`) and all of them get
every result.
"""

import math

import jax
import numpy as np

from clue_jax.data import dataset as data_lib
from clue_jax.model.network import CLUE
from clue_jax.train import parallel, steps

CHUNK = 1024  # Rows per device call (rounded up to a multiple of the device count).


def in_chunks(fn, state, mesh, rows: np.ndarray, inputs) -> np.ndarray:
  """`fn(state, *inputs(rows_of_a_chunk))` over the chunks of `rows`, the results concatenated.

  Args:
    fn: a jitted function of the train state and per-row arrays, returning per-row values.
    state: the train state (replicated).
    mesh: the device mesh; chunks are split over its devices.
    rows: the rows to encode, in order.
    inputs: maps an array of rows to the tuple of host arrays `fn` takes for them (None entries allowed).

  Returns:
    The values for `rows`, in order ((0, 0) when `rows` is empty).
  """
  sharding = parallel.batch_sharding(mesh)
  n_devices = mesh.devices.size
  chunk = math.ceil(CHUNK / n_devices) * n_devices
  part = parallel.process_rows(mesh, chunk)
  out = []
  for start in range(0, len(rows), chunk):
    r = rows[start:start + chunk]
    padded = np.concatenate([r, np.full(chunk - len(r), r[0])])[part]
    values = fn(state, *parallel.put_local(inputs(padded), sharding))
    out.append(parallel.fetch(values)[:len(r)])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class Encoder:
  """Posterior means of any rows of a training `Dataset`'s modality; the same for the estimates of an NB modality's
  library-size head."""

  def __init__(self, model: CLUE, dataset: data_lib.Dataset, mesh):
    self.model, self.dataset, self.mesh = model, dataset, mesh
    self.fns = {n: jax.jit(steps.make_encode(model, n)) for n in dataset.names}
    self.library_fns = {}

  def __call__(self, state, name: str, rows: np.ndarray) -> np.ndarray:
    return in_chunks(self.fns[name], state, self.mesh, rows, self._inputs(name))

  def library_sizes(self, state, name: str, rows: np.ndarray) -> np.ndarray:
    """(rows, modalities) library sizes that NB modality `name`'s head estimates for every modality's decoder."""
    if name not in self.library_fns:
      self.library_fns[name] = jax.jit(steps.make_encode(self.model, name, library=True))
    return in_chunks(self.library_fns[name], state, self.mesh, rows, self._inputs(name))

  def _inputs(self, name: str):
    m = self.dataset.modalities[name]
    return lambda rows: (None if m.rep is None else m.rep[rows], m.counts[rows].toarray())
