"""The kNN graph the competition's joint-embedding metrics run on: scanpy's `pp.neighbors` defaults (15 exact Euclidean
neighbours counting the cell itself, UMAP fuzzy connectivities), in numpy/scipy.

UMAP connectivities (McInnes et al. 2018): cell i's kth neighbour gets weight exp(-(d_ik - rho_i) / sigma_i), rho_i the
distance to its nearest other cell and sigma_i chosen so that its weights sum to log2(k); the directed weights P are
symmetrised by the fuzzy union P + P^T - P * P^T. scanpy searches neighbours approximately from 8,192 cells on; here
the search is always exact.
"""

import numpy as np
import scipy.sparse as sp

from clue_jax.evaluate.metrics import nearest_rows

N_NEIGHBORS = 15
_BISECTION_STEPS = 64  # umap's smooth_knn_dist: 64 bisection steps, tolerance 1e-5, sigma >= 1e-3 * mean distance.
_SIGMA_TOLERANCE = 1e-5
_MIN_SIGMA_SCALE = 1e-3


def umap_connectivities(indices: np.ndarray, distances: np.ndarray) -> sp.csr_matrix:
  """Symmetric fuzzy-union connectivities (cells x cells) from each cell's k nearest cells, itself first
  (`metrics.nearest_rows(x, x, k, same=True)`)."""
  n, k = indices.shape
  others = distances[:, 1:]
  positive = np.where(others > 0, others, np.inf)
  rho = np.where(np.isfinite(positive.min(axis=1)), positive.min(axis=1), 0.0)
  sigma = _bandwidths(others, rho, np.log2(k))
  floor = _MIN_SIGMA_SCALE * np.where(rho > 0, distances.mean(axis=1), distances.mean())
  sigma = np.maximum(sigma, floor)
  excess = others - rho[:, None]
  weights = np.where((excess <= 0) | (sigma[:, None] == 0), 1.0,
                     np.exp(-np.maximum(excess, 0) / np.where(sigma > 0, sigma, 1.0)[:, None]))
  directed = sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(n), k - 1), indices[:, 1:].ravel())), shape=(n, n))
  directed.eliminate_zeros()
  union = directed + directed.T - directed.multiply(directed.T)
  union.eliminate_zeros()
  return sp.csr_matrix(union)


def _bandwidths(others: np.ndarray, rho: np.ndarray, target: float) -> np.ndarray:
  """Per cell, the sigma with sum_j exp(-max(d_j - rho, 0) / sigma) = target, by umap's bisection."""
  lo, hi, mid = np.zeros(len(rho)), np.full(len(rho), np.inf), np.ones(len(rho))
  active = np.ones(len(rho), bool)
  excess = np.maximum(others - rho[:, None], 0.0)
  for _ in range(_BISECTION_STEPS):
    total = np.exp(-excess / mid[:, None]).sum(axis=1)
    active &= np.abs(total - target) >= _SIGMA_TOLERANCE
    if not active.any():
      break
    above = active & (total > target)
    below = active & ~(total > target)
    hi = np.where(above, mid, hi)
    lo = np.where(below, mid, lo)
    mid = np.where(above, (lo + hi) / 2, np.where(below, np.where(np.isinf(hi), mid * 2, (lo + hi) / 2), mid))
  return mid


def neighbor_graph(embedding: np.ndarray, k: int = N_NEIGHBORS) -> sp.csr_matrix:
  """scanpy `pp.neighbors(use_rep=...)` connectivities of an embedding."""
  return umap_connectivities(*nearest_rows(embedding, embedding, k, same=True))
