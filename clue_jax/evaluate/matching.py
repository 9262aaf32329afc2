"""Cell matching between two modalities' embeddings, as the competition's sparse pairing matrix.

Two methods, both on L2-normalised embeddings and only within a batch when batch labels are given
(docs/method.md §4.3):
* `snn_matching`: shared nearest neighbours. Each cell's neighbourhood is its k nearest cells of its own modality
  (itself included) and its k nearest of the other; a pair scores the Jaccard index of their two neighbourhoods.
  With k = 1 (the competition's) a one-way nearest neighbour scores 1/3 and a mutual one 1.
* `sinkhorn_matching`: entropic optimal transport with uniform marginals on the cosine distance, solved by
  ott-jax's Sinkhorn solver; each row of the plan keeps its `top_k` largest weights.

Both return a CSR matrix (rows: cells of `x`, columns: cells of `y`) whose rows sum to 1 with at most
`MAX_NONZEROS_PER_ROW` non-zeros each, the format `metrics.check_match_prediction` accepts.
"""

import functools
import warnings

import jax
import numpy as np
import scipy.sparse as sp

with warnings.catch_warnings():  # ott-jax still imports jaxopt, which announces its end of maintenance.
  warnings.simplefilter("ignore", DeprecationWarning)
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

from clue_jax.evaluate import metrics

MAX_NONZEROS_PER_ROW = metrics.MAX_MATCH_NONZEROS_PER_CELL


def snn_matching(x, y, k: int = 1, batch_x=None, batch_y=None,
                 max_per_row: int = MAX_NONZEROS_PER_ROW) -> sp.csr_matrix:
  """Shared-nearest-neighbour matching of the rows of `x` to the rows of `y` (Jaccard scores, rows summing to 1)."""
  if k < 1:
    raise ValueError(f"k={k}: the number of nearest neighbours must be at least 1 (the competition used k=1)")
  return within_batches(lambda a, b: snn_scores(a, b, k), x, y, batch_x, batch_y, max_per_row)


def sinkhorn_matching(x, y, epsilon: float = 0.01, n_iter: int = 500, batch_x=None, batch_y=None,
                      top_k: int = MAX_NONZEROS_PER_ROW) -> sp.csr_matrix:
  """Entropic-OT matching of the rows of `x` to the rows of `y`: the plan's rows, each keeping its `top_k` largest
  weights and rescaled to sum to 1.

  `epsilon` is the entropic regularisation on the cosine-distance cost (range [0, 2]): smaller is sharper and needs
  more iterations; `n_iter` is the most the solver runs. Each iteration costs two log-sum-exps over the
  (cells of x) x (cells of y) matrix of a batch.
  """
  if not epsilon > 0:
    raise ValueError(f"epsilon={epsilon}: the entropic regularisation must be positive, e.g. 0.01")
  if n_iter < 1:
    raise ValueError(f"n_iter={n_iter}: run at least one Sinkhorn iteration, e.g. 500")
  if not 1 <= top_k <= MAX_NONZEROS_PER_ROW:
    raise ValueError(f"top_k={top_k}: keep between 1 and {MAX_NONZEROS_PER_ROW} (the competition's limit) weights "
                     f"per row")

  def scores(a, b):
    log_plan = np.asarray(sinkhorn_log_plan(cosine_cost(a, b), epsilon, n_iter), np.float64)
    return np.exp(log_plan - log_plan.max(axis=1, keepdims=True))

  return within_batches(scores, x, y, batch_x, batch_y, top_k)


def best_partners(matrix) -> np.ndarray:
  """The column of each row's largest weight (the most likely partner of each cell of `x`)."""
  return np.asarray(sp.csr_matrix(matrix).argmax(axis=1)).ravel()


# ------------------------------------------------------------------------------------------------------- SNN
def l2_rows(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_graph(queries, references, k: int, same: bool = False) -> sp.csr_matrix:
  """(queries x references) 0/1 matrix of each query's `k` nearest references (itself first when `same`)."""
  indices, _ = metrics.nearest_rows(queries, references, k, same=same)
  rows = np.repeat(np.arange(len(queries)), indices.shape[1])
  return sp.csr_matrix((np.ones(indices.size), (rows, indices.ravel())), shape=(len(queries), len(references)))


def snn_scores(x, y, k: int) -> sp.csr_matrix:
  """Jaccard index of the joint neighbourhoods of every (x_i, y_j) pair that shares at least one neighbour."""
  x, y = l2_rows(x), l2_rows(y)
  kx, ky = min(k, len(x)), min(k, len(y))
  x_to_x, x_to_y = knn_graph(x, x, kx, same=True), knn_graph(x, y, ky)
  y_to_x, y_to_y = knn_graph(y, x, kx), knn_graph(y, y, ky, same=True)
  shared = (x_to_x @ y_to_x.T + x_to_y @ y_to_y.T).tocsr()
  shared.data = shared.data / (2.0 * (kx + ky) - shared.data)  # |A ∩ B| / |A ∪ B|, |A| = |B| = kx + ky.
  return shared


# -------------------------------------------------------------------------------------------------- Sinkhorn
def cosine_cost(x, y) -> np.ndarray:
  """1 - cosine similarity of every row of `x` with every row of `y`, float32."""
  return (1.0 - l2_rows(x) @ l2_rows(y).T).astype(np.float32)


@functools.partial(jax.jit, static_argnums=2)
def sinkhorn_log_plan(cost, epsilon, n_iter: int):
  """log of the entropic OT plan between uniform marginals (rows sum to 1/n, columns to 1/m) for `cost` (n, m).

  ott-jax's log-domain Sinkhorn solver: at most `n_iter` iterations, fewer once the marginals' error is below its
  threshold (1e-3, checked every 10 iterations); experiments/sinkhorn_ott.py measured it against a fixed-iteration
  solver.
  """
  geom = geometry.Geometry(cost_matrix=cost, epsilon=epsilon)
  out = sinkhorn.Sinkhorn(max_iterations=n_iter)(linear_problem.LinearProblem(geom))
  return (out.f[:, None] + out.g[None, :] - cost) / epsilon


# ------------------------------------------------------------------------------------------------ assembling
def within_batches(block_scores, x, y, batch_x, batch_y, max_per_row: int) -> sp.csr_matrix:
  """The block-diagonal matrix of `block_scores(x[batch], y[batch])` over the batches of `x`, each row keeping its
  `max_per_row` largest scores and divided by its sum."""
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"x and y must be 2-D embeddings of the same width; got shapes {x.shape} and {y.shape}")
  if len(x) == 0 or len(y) == 0:
    raise ValueError(f"nothing to match: x has {len(x)} cells and y {len(y)}")
  if not 1 <= max_per_row <= MAX_NONZEROS_PER_ROW:
    raise ValueError(f"max_per_row={max_per_row}: keep between 1 and {MAX_NONZEROS_PER_ROW} (the competition's "
                     f"limit) weights per row")
  groups = batch_groups(batch_x, batch_y, len(x), len(y))
  rows, cols, values = [], [], []
  for row_index, col_index in groups:
    block = sp.coo_matrix(top_per_row(block_scores(x[row_index], y[col_index]), max_per_row))
    rows.append(row_index[block.row])
    cols.append(col_index[block.col])
    values.append(block.data)
  matrix = sp.csr_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(len(x), len(y)))
  return normalize_rows(matrix)


def batch_groups(batch_x, batch_y, n_x: int, n_y: int) -> list:
  """[(rows of x, rows of y)] per batch of x; one group of all cells without batch labels."""
  if (batch_x is None) != (batch_y is None):
    raise ValueError("give batch labels for both x and y (batch_x and batch_y), or for neither")
  if batch_x is None:
    return [(np.arange(n_x), np.arange(n_y))]
  batch_x, batch_y = np.asarray(batch_x).astype(str), np.asarray(batch_y).astype(str)
  if batch_x.shape != (n_x,) or batch_y.shape != (n_y,):
    raise ValueError(f"batch labels need one entry per cell: batch_x has shape {batch_x.shape} for {n_x} cells, "
                     f"batch_y {batch_y.shape} for {n_y} cells")
  in_x, in_y = sorted(set(batch_x.tolist())), sorted(set(batch_y.tolist()))
  missing = sorted(set(in_x) - set(in_y))
  if missing:
    raise ValueError(f"batches {missing} have cells in x but none in y, so those cells have no candidate partner; "
                     f"y's batches are {in_y}: use the same batch labels in both, or match without batches")
  return [(np.flatnonzero(batch_x == b), np.flatnonzero(batch_y == b)) for b in in_x]


def top_per_row(scores, limit: int) -> sp.csr_matrix:
  """`scores` (dense or sparse, non-negative) with only the `limit` largest positive entries of each row kept."""
  if not sp.issparse(scores) and scores.shape[1] > limit:
    keep = np.argpartition(-scores, limit - 1, axis=1)[:, :limit]
    rows = np.repeat(np.arange(scores.shape[0]), limit)
    scores = sp.csr_matrix((np.take_along_axis(scores, keep, axis=1).ravel(), (rows, keep.ravel())),
                           shape=scores.shape)
  scores = sp.csr_matrix(scores)
  scores.eliminate_zeros()
  for i in np.flatnonzero(np.diff(scores.indptr) > limit):  # Sparse rows over the limit (rare): drop the smallest.
    values = scores.data[scores.indptr[i]:scores.indptr[i + 1]]
    values[np.argsort(-values, kind="stable")[limit:]] = 0.0
  scores.eliminate_zeros()
  return scores


def normalize_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
  totals = np.asarray(matrix.sum(axis=1)).ravel()
  if (totals <= 0).any():
    raise ValueError(f"{int((totals <= 0).sum())} rows have no positive score (first: "
                     f"{np.flatnonzero(totals <= 0)[0]})")
  return sp.csr_matrix(sp.diags(1.0 / totals) @ matrix)
