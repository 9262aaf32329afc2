"""Matching metrics on embeddings (numpy): FOSCTTM and top-1 matching accuracy."""

import numpy as np


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T


def foscttm(x: np.ndarray, y: np.ndarray) -> float:
  """Fraction Of Samples Closer Than the True Match, averaged over both directions (lower is better).

  Row i of `x` and row i of `y` are the two modalities of the same cell. For each cell, the fraction of the other
  modality's n cells closer (Euclidean) than its true partner; 0 is perfect, about 0.5 is chance.
  """
  d = squared_distances(x, y)
  true = np.diag(d)
  closer_x = (d < true[:, None]).mean(1)
  closer_y = (d < true[None, :]).mean(0)
  return float((closer_x.mean() + closer_y.mean()) / 2)


def top1_accuracy(x: np.ndarray, y: np.ndarray) -> float:
  """Fraction of cells of `x` whose nearest cell of `y` is their true partner."""
  d = squared_distances(x, y)
  return float((d.argmin(1) == np.arange(len(x))).mean())
