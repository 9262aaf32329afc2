"""Metrics in numpy/scipy: matching on embeddings (FOSCTTM, top-1), kNN label transfer, and the NeurIPS 2021
competition's match- and predict-modality scores exactly as its official metric components compute them
(openproblems-bio/neurips2021_multimodal_viash, `src/{match,predict}_modality/metrics/`). Joint-embedding scores:
`embedding_metrics`; reading the official files: `competition_files`.
"""

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

MAX_MATCH_NONZEROS_PER_CELL = 1000  # The competition's format check: at most 1000 * N non-zeros in an N x N pairing.
ROW_SUM_TOLERANCE = 1e-5  # The format check's `all.equal(rowSums, 1, tolerance = 1e-5)`.


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


def match_probability(prediction, solution) -> float:
  """The competition's match-modality score: the mean over mod1 cells of the weight on the true partner (unscaled).

  `prediction` is the N x N pairing matrix (mod1 test cells x mod2 test cells, dense or sparse), `solution` the
  `test_sol` permutation matrix. Negative weights count as 0 and each row is divided by its sum, as officially.
  """
  return float(match_probability_per_cell(prediction, solution).mean())


def match_probability_per_cell(prediction, solution) -> np.ndarray:
  """Per mod1 cell: weight on its true partner / its row's total weight (the official `per_cell` output)."""
  prediction, solution = sp.csr_matrix(prediction, dtype=np.float64), sp.csr_matrix(solution, dtype=np.float64)
  check_match_prediction(prediction, solution.shape[0])
  if solution.shape != prediction.shape or np.any(solution.getnnz(axis=1) != 1):
    raise ValueError(f"solution must be an N x N permutation matrix with one partner per row; got shape "
                     f"{solution.shape}: pass the task's test_sol matrix")
  prediction.data = np.maximum(prediction.data, 0.0)
  return np.asarray(prediction.multiply(solution).sum(axis=1)).ravel() / np.asarray(prediction.sum(axis=1)).ravel()


def check_match_prediction(prediction, n_cells: int) -> None:
  """The competition's format check of a pairing matrix; a ValueError names what is wrong and the fix."""
  if prediction.shape != (n_cells, n_cells):
    raise ValueError(f"prediction has shape {prediction.shape} but the test set has {n_cells} cells per modality: "
                     f"give an {n_cells} x {n_cells} matrix, rows = test mod1 cells and columns = test mod2 cells in "
                     f"file order")
  prediction = sp.csr_matrix(prediction)
  limit = MAX_MATCH_NONZEROS_PER_CELL * n_cells
  if prediction.nnz > limit:
    raise ValueError(f"prediction has {prediction.nnz} non-zeros, over the limit of {MAX_MATCH_NONZEROS_PER_CELL} "
                     f"per cell ({limit}): keep only each row's top {MAX_MATCH_NONZEROS_PER_CELL} candidates (sparse "
                     f"matrix)")
  if not np.all(np.isfinite(prediction.data)):
    raise ValueError("prediction holds NaN or infinite weights: give finite weights")
  empty = np.flatnonzero(np.asarray(prediction.maximum(0).sum(axis=1)).ravel() <= 0)
  if len(empty):  # The official score would be NaN: the row is divided by its total positive weight.
    raise ValueError(f"{len(empty)} prediction rows (first: {empty[0]}) have no positive weight: give every mod1 cell "
                     "a positive weight on at least one candidate partner")
  totals = np.asarray(prediction.sum(axis=1)).ravel()
  if np.abs(totals - 1.0).mean() > ROW_SUM_TOLERANCE:
    raise ValueError(f"prediction rows must sum to 1 (row sums range {totals.min():.6g}..{totals.max():.6g}): divide "
                     "each row by its sum")


def rmse(prediction, solution) -> float:
  """The predict-modality ranking metric: root mean squared error over all test cells x features."""
  prediction, solution = _dense_pair(prediction, solution)
  return float(np.sqrt(np.mean((solution - prediction) ** 2)))


def mae(prediction, solution) -> float:
  """Mean absolute error over all test cells x features (reported, not ranked)."""
  prediction, solution = _dense_pair(prediction, solution)
  return float(np.mean(np.abs(solution - prediction)))


def predict_modality_metrics(prediction, solution) -> dict:
  """Every predict-modality score the official components report, by metric id.

  Per-cell and per-feature correlations are set to 0 where either vector is constant, as officially; Spearman uses
  average ranks of ties.
  """
  prediction, solution = _dense_pair(prediction, solution)
  pred_ranks, sol_ranks = rankdata(prediction, axis=1), rankdata(solution, axis=1)
  pred_col_ranks, sol_col_ranks = rankdata(prediction, axis=0), rankdata(solution, axis=0)
  return {
      "rmse": rmse(prediction, solution),
      "mae": mae(prediction, solution),
      "mean_pearson_per_cell": float(rowwise_correlation(solution, prediction).mean()),
      "mean_spearman_per_cell": float(rowwise_correlation(sol_ranks, pred_ranks).mean()),
      "mean_pearson_per_gene": float(rowwise_correlation(solution.T, prediction.T).mean()),
      "mean_spearman_per_gene": float(rowwise_correlation(sol_col_ranks.T, pred_col_ranks.T).mean()),
      "overall_pearson": _overall_correlation(solution.ravel(), prediction.ravel()),
      "overall_spearman": _overall_correlation(rankdata(solution.ravel()), rankdata(prediction.ravel())),
  }


def rowwise_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson correlation of each row of `x` with the same row of `y`; 0 where either row is constant."""
  x = x - x.mean(axis=1, keepdims=True)
  y = y - y.mean(axis=1, keepdims=True)
  norms = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
  covariances = (x * y).sum(axis=1)
  return np.where(norms > 0, covariances / np.where(norms > 0, norms, 1.0), 0.0)


def _overall_correlation(x: np.ndarray, y: np.ndarray) -> float:
  return float(rowwise_correlation(x[None], y[None])[0])


def _dense_pair(prediction, solution):
  prediction, solution = (np.asarray(m.toarray() if sp.issparse(m) else m, np.float64) for m in (prediction, solution))
  if prediction.shape != solution.shape:
    raise ValueError(f"prediction has shape {prediction.shape} but the solution has {solution.shape}: predict every "
                     "test cell (rows) x every target feature (columns), in the solution's order")
  return prediction, solution


def knn_label_transfer_accuracy(source_embedding, source_labels, target_embedding, target_labels, k: int) -> float:
  """Fraction of target cells whose label is the majority label of their `k` nearest (Euclidean) source cells.

  A tie between labels goes to the one with the nearest member among the neighbours.
  """
  source_labels, target_labels = np.asarray(source_labels), np.asarray(target_labels)
  if len(source_labels) != len(source_embedding) or len(target_labels) != len(target_embedding):
    raise ValueError("each embedding needs one label per row")
  if not 1 <= k <= len(source_labels):
    raise ValueError(f"k={k} must be between 1 and the number of source cells ({len(source_labels)})")
  categories, source_codes = np.unique(source_labels, return_inverse=True)
  neighbours, _ = nearest_rows(target_embedding, source_embedding, k)
  codes = source_codes[neighbours]  # (targets, k), nearest first.
  counts = np.zeros((len(codes), len(categories)), np.int64)
  np.add.at(counts, (np.arange(len(codes))[:, None], codes), 1)
  is_top = counts[np.arange(len(codes))[:, None], codes] == counts.max(axis=1, keepdims=True)
  predicted = categories[codes[np.arange(len(codes)), is_top.argmax(axis=1)]]
  return float((predicted == target_labels).mean())


def nearest_rows(queries, references, k: int, same: bool = False, chunk: int = 256):
  """(indices, distances), each (queries, k): the `k` rows of `references` nearest each query row (Euclidean),
  nearest first; chunked over queries.

  `same=True`: the queries are the references, and each row comes first among its own neighbours (distance 0).
  """
  queries, references = np.asarray(queries, np.float64), np.asarray(references, np.float64)
  k = min(k, len(references))
  indices, distances = np.empty((len(queries), k), np.int64), np.empty((len(queries), k))
  for start in range(0, len(queries), chunk):
    rows = np.arange(start, min(start + chunk, len(queries)))
    d2 = np.maximum(squared_distances(queries[rows], references), 0.0)
    if same:
      d2[np.arange(len(rows)), rows] = -1.0  # Itself first, whatever the rounding.
    part = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < d2.shape[1] else np.tile(np.arange(k), (len(rows), 1))
    part_d2 = np.take_along_axis(d2, part, axis=1)
    order = np.argsort(part_d2, axis=1, kind="stable")
    indices[rows] = np.take_along_axis(part, order, axis=1)
    distances[rows] = np.sqrt(np.maximum(np.take_along_axis(part_d2, order, axis=1), 0.0))
  return indices, distances
