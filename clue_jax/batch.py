"""The minibatch: what `data/` builds (on the host or inside the step) and `model/losses.py` reads.

A `Batch` holds B rows of cell IDs (leading axes may come first, e.g. (steps, B) for a chunk of steps): one
`ModalityBatch` per modality, in the model's modality order, plus `valid` (1 for real rows, 0 for the padding of
evaluation batches). Every loss averages over valid rows only.
"""

from typing import Any

import flax
import jax
import numpy as np


@flax.struct.dataclass
class ModalityBatch:
  """One modality's rows of a minibatch.

  counts: (..., B, F) float32 dense decoder targets. batch: (..., B) int32 batch index. label: (..., B) int32 label
  index, -1 = unlabelled. mask: (..., B) float32, 1 where the cell ID really exists in this modality (the others are
  random fills). rep: (..., B, R) float32 encoder input, None when the encoder reads the counts. log_factorial:
  (..., B) float32 sum_f lgamma(counts + 1) of NB modalities (a data constant), else None.
  """

  counts: Any
  batch: Any
  label: Any
  mask: Any
  rep: Any = None
  log_factorial: Any = None


@flax.struct.dataclass
class Batch:
  """`modalities`: {name: ModalityBatch}; `valid`: (..., B) float32. `batch[name]` is `batch.modalities[name]`."""

  modalities: dict
  valid: Any

  def __getitem__(self, name: str) -> ModalityBatch:
    return self.modalities[name]


def zeros(shapes: dict, rows: int = 1) -> Batch:
  """A batch of `rows` zero rows with the given widths: {name: (n_features, encoder input width or None)}.

  Enough to build a model's variables: their shapes depend only on these widths.
  """
  modalities = {}
  for name, (n_features, rep_dim) in shapes.items():
    modalities[name] = ModalityBatch(
        counts=np.zeros((rows, n_features), np.float32), batch=np.zeros(rows, np.int32),
        label=np.full(rows, -1, np.int32), mask=np.ones(rows, np.float32),
        rep=None if rep_dim is None else np.zeros((rows, rep_dim), np.float32))
  return Batch(modalities, np.ones(rows, np.float32))


def padded_steps(chunk, length: int):
  """A chunk of steps (any tree of host arrays with a leading steps axis) padded with zeros to `length` steps, so
  that every chunk of an epoch has one shape; the train step runs only the real ones."""
  return jax.tree.map(lambda a: np.concatenate([a, np.zeros((length - len(a), *a.shape[1:]), a.dtype)]), chunk)
