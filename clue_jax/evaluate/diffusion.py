"""Diffusion map and diffusion pseudotime (Haghverdi et al. 2016) as scanpy's `tl.diffmap` and `tl.dpt` compute them.

The kernel is the kNN connectivities W, density-normalised (K = Q^-1 W Q^-1, q = column sums) and made symmetric
(T = Z^-1 K Z^-1, z = sqrt of K's column sums); its leading eigenvectors (largest magnitude, seeded ARPACK as scanpy)
are the diffusion components. DPT distance from the root weighs component l by lambda_l / (1 - lambda_l), or by 1 for
the stationary ones (lambda >= 0.9994).
"""

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

N_COMPONENTS = 15  # scanpy tl.diffmap default.
N_DCS = 10  # scanpy tl.dpt default.
STATIONARY = 0.9994
ROOT_DIMS = 3  # scib get_root: components voting for the root cell.


def diffusion_map(connectivities, n_comps: int = N_COMPONENTS):
  """(eigenvalues, eigenvectors) of the symmetric diffusion operator, eigenvalues in decreasing order."""
  w = sp.csr_matrix(connectivities, dtype=np.float64)
  inv_q = sp.diags(1.0 / np.asarray(w.sum(axis=0)).ravel())
  kernel = inv_q @ w @ inv_q
  inv_z = sp.diags(1.0 / np.sqrt(np.asarray(kernel.sum(axis=0)).ravel()))
  operator = sp.csr_matrix(inv_z @ kernel @ inv_z)
  n = operator.shape[0]
  k = min(n - 1, n_comps)
  if n <= 2 * k + 1:  # Too small for ARPACK: all eigenpairs, keep the k of largest magnitude.
    values, vectors = np.linalg.eigh(operator.toarray())
    keep = np.sort(np.argsort(-np.abs(values), kind="stable")[:k])
    values, vectors = values[keep], vectors[:, keep]
  else:
    values, vectors = eigsh(operator, k=k, which="LM", v0=np.random.RandomState(0).standard_normal(n))
  order = np.argsort(values, kind="stable")[::-1]
  return values[order], vectors[:, order]


def root_vote(eigenvectors: np.ndarray, candidates: np.ndarray) -> int:
  """Index into `candidates` of the root: most votes for being the candidates' extreme in the first components.

  In each component the candidates' minimum is taken if their mean lies below the mean of all cells, else their
  maximum (scib `get_root`).
  """
  votes = np.zeros(len(candidates))
  for dim in range(min(ROOT_DIMS, eigenvectors.shape[1])):
    coordinate = eigenvectors[:, dim]
    values = coordinate[candidates]
    votes[values.argmin() if values.mean() < coordinate.mean() else values.argmax()] += 1
  return int(votes.argmax())


def dpt_pseudotime(eigenvalues: np.ndarray, eigenvectors: np.ndarray, root: int, n_dcs: int = N_DCS) -> np.ndarray:
  """DPT distance of every cell from `root` over the first `n_dcs` components, divided by its maximum."""
  values, vectors = eigenvalues[:n_dcs], eigenvectors[:, :n_dcs]
  weights = np.where(values < STATIONARY, values / np.where(values < STATIONARY, 1 - values, 1.0), 1.0)
  distance = np.sqrt((((vectors[root] - vectors) * weights) ** 2).sum(axis=1))
  return distance / distance.max() if distance.max() > 0 else distance
