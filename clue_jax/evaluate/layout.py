"""2-D layouts of an embedding for plots: UMAP by umap-learn when it is installed (the `eval` extra), else this
module's numpy UMAP.

The numpy UMAP (McInnes et al. 2018) optimises the low-dimensional fuzzy set cross-entropy against the embedding's
15-NN fuzzy graph (`neighbor_graph`, the graph scanpy and the metrics use) by stochastic gradient steps with negative
sampling; all of an epoch's edges move together (one vectorised step) instead of one after another, and the start
is the top two principal components rather than a spectral layout.
"""

import importlib.util

import numpy as np
import scipy.sparse as sp
from scipy.optimize import curve_fit

from clue_jax.evaluate.embedding_metrics import principal_components
from clue_jax.evaluate.neighbor_graph import N_NEIGHBORS, neighbor_graph

MIN_DIST = 0.5  # scanpy's tl.umap default.
NEGATIVE_SAMPLES = 5  # Repulsive samples per attractive step.
MAX_STEP = 4.0  # Gradient clip per coordinate and step.
INIT_RADIUS = 10.0  # The start's largest coordinate.


def umap_learn_installed() -> bool:
  return importlib.util.find_spec("umap") is not None


def umap_2d(x, seed: int = 0) -> tuple:
  """(coordinates (cells, 2), a title naming the method that made them)."""
  x = np.asarray(x, np.float64)
  if umap_learn_installed():
    import umap  # Optional: the eval extra.

    reducer = umap.UMAP(n_neighbors=N_NEIGHBORS, min_dist=MIN_DIST, random_state=seed, n_jobs=1)
    return reducer.fit_transform(x), "UMAP (umap-learn)"
  return numpy_umap(x, seed=seed), "UMAP (clue_jax numpy layout; umap-learn not installed)"


def curve_parameters(min_dist: float, spread: float = 1.0):
  """(a, b) of the low-dimensional similarity 1 / (1 + a d^2b) that best fits UMAP's target curve."""
  d = np.linspace(0, 3 * spread, 300)
  target = np.where(d < min_dist, 1.0, np.exp(-(d - min_dist) / spread))
  (a, b), _ = curve_fit(lambda d, a, b: 1.0 / (1.0 + a * d ** (2 * b)), d, target, p0=(1.0, 1.0))
  return float(a), float(b)


def numpy_umap(x: np.ndarray, n_epochs: int | None = None, min_dist: float = MIN_DIST, seed: int = 0) -> np.ndarray:
  """UMAP coordinates (cells, 2) of `x` (at least 3 rows); 500 epochs below 10,000 cells, 200 above."""
  n = len(x)
  n_epochs = n_epochs or (500 if n < 10_000 else 200)
  a, b = curve_parameters(min_dist)
  graph = sp.coo_matrix(neighbor_graph(x, min(N_NEIGHBORS, n)))
  kept = graph.data >= graph.data.max() / n_epochs  # Edges too weak to be sampled once are dropped.
  head, tail, weight = graph.row[kept], graph.col[kept], graph.data[kept]
  start, _ = principal_components(x, 2)
  if start.shape[1] < 2 or not np.abs(start).max() > 0:
    raise ValueError(f"a 2-D layout needs an embedding with some spread in 2 directions; got shape {x.shape}")
  y = INIT_RADIUS * start / np.abs(start).max()
  period = weight.max() / weight  # Epochs between two samples of an edge: strong edges every epoch.
  due = period.copy()
  rng = np.random.default_rng(seed)
  for epoch in range(n_epochs):
    active = np.flatnonzero(due <= epoch + 1)
    due[active] += period[active]
    y = y + (1.0 - epoch / n_epochs) * layout_step(y, head[active], tail[active], a, b, rng)
  return y


def layout_step(y: np.ndarray, head: np.ndarray, tail: np.ndarray, a: float, b: float, rng) -> np.ndarray:
  """The summed clipped gradient steps (cells, 2) of attracting each edge's ends and repelling each head from
  NEGATIVE_SAMPLES random cells."""
  n = len(y)
  diff = y[head] - y[tail]
  d2 = (diff * diff).sum(1)
  power = d2 ** b
  pull = np.where(d2 > 0, -2 * a * b * power / np.where(d2 > 0, d2, 1.0) / (a * power + 1), 0.0)
  attract = np.clip(pull[:, None] * diff, -MAX_STEP, MAX_STEP)
  heads = np.repeat(head, NEGATIVE_SAMPLES)
  others = rng.integers(0, n, len(heads))
  diff = y[heads] - y[others]
  d2 = (diff * diff).sum(1)
  push = 2 * b / ((0.001 + d2) * (a * d2 ** b + 1))
  repel = np.where(d2[:, None] > 0, np.clip(push[:, None] * diff, -MAX_STEP, MAX_STEP), MAX_STEP)
  repel[heads == others] = 0.0
  return np.stack([np.bincount(head, attract[:, c], n) - np.bincount(tail, attract[:, c], n)
                   + np.bincount(heads, repel[:, c], n) for c in range(2)], axis=1)
