"""Matching on hand-built embeddings: SNN scores as docs/method.md §4.3 works them out, Sinkhorn marginals, the
official format, batches."""

import numpy as np
import pytest
import scipy.sparse as sp

from clue_jax.evaluate import matching, metrics


def on_circle(degrees):
  angles = np.deg2rad(np.asarray(degrees, np.float64))
  return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def permutation_matrix(partner):
  n = len(partner)
  return sp.csr_matrix((np.ones(n), (np.arange(n), partner)), shape=(n, n))


def noisy_pairs(n=200, dim=16, noise=0.8, seed=0):
  """x, y = a noisy copy of x with shuffled rows, and the column of each x row's partner."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim))
  order = rng.permutation(n)
  y = (x + noise * rng.normal(size=(n, dim)))[order]
  return x, y, np.argsort(order)


def assert_official_format(matrix, n_rows, limit=matching.MAX_NONZEROS_PER_ROW):
  assert sp.isspmatrix_csr(matrix)
  np.testing.assert_allclose(np.asarray(matrix.sum(axis=1)).ravel(), 1.0, atol=1e-12)
  assert np.diff(matrix.indptr).max() <= limit
  assert (matrix.data > 0).all()
  if matrix.shape == (n_rows, n_rows):
    metrics.check_match_prediction(matrix, n_rows)


def test_snn_k1_scores_one_way_neighbours_one_third_and_mutual_ones_one():
  # x0 and y0 are mutual nearest neighbours; x1's nearest y is y1, but y1's nearest x is x0.
  x, y = on_circle([0, 90]), on_circle([5, 40])
  np.testing.assert_allclose(matching.snn_scores(x, y, 1).toarray(), [[1.0, 1 / 3], [0.0, 1 / 3]])
  np.testing.assert_allclose(matching.snn_matching(x, y).toarray(), [[0.75, 0.25], [0.0, 1.0]])


def test_snn_scores_are_jaccard_indices_of_the_joint_neighbourhoods():
  x = np.random.default_rng(1).normal(size=(30, 5))
  k = 3
  # Identical sets: a cell and its copy share all 2k neighbours.
  np.testing.assert_allclose(matching.snn_scores(x, x.copy(), k).diagonal(), 1.0)
  scores = matching.snn_scores(x, np.random.default_rng(2).normal(size=(25, 5)), k)
  allowed = [v / (4 * k - v) for v in range(1, 2 * k + 1)]
  assert np.isin(np.round(scores.data, 12), np.round(allowed, 12)).all()


def test_snn_recovers_known_partners_exactly():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(50, 8))
  order = rng.permutation(50)
  y = x[order] + 1e-4 * rng.normal(size=(50, 8))
  matrix = matching.snn_matching(x, y)
  assert_official_format(matrix, 50)
  np.testing.assert_array_equal(matrix.toarray(), permutation_matrix(np.argsort(order)).toarray())


def test_snn_keeps_at_most_the_limit_per_row():
  x, y, _ = noisy_pairs(n=120, noise=2.0)
  matrix = matching.snn_matching(x, y, k=20, max_per_row=5)
  assert_official_format(matrix, 120, limit=5)
  assert np.diff(matching.snn_matching(x, y, k=20).indptr).max() > 5  # The limit did bind.


def test_matching_stays_within_batches():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(40, 6))
  batch_x = np.repeat(["a", "b"], 20)
  # y: batch "a" holds exact copies of x's batch "b" cells, which must still not be matched across batches.
  y = np.concatenate([x[20:], x[:20]]) + 1e-3 * rng.normal(size=(40, 6))
  batch_y = np.repeat(["a", "b"], 20)
  for matrix in (matching.snn_matching(x, y, 1, batch_x, batch_y),
                 matching.sinkhorn_matching(x, y, 0.05, 100, batch_x, batch_y)):
    assert_official_format(matrix, 40)
    rows, cols = matrix.nonzero()
    assert (batch_x[rows] == batch_y[cols]).all()


def test_batch_errors_name_the_problem():
  x = np.zeros((4, 2)) + [1, 0]
  with pytest.raises(ValueError, match=r"batches \['c'\] have cells in x but none in y"):
    matching.snn_matching(x, x, 1, ["a", "a", "c", "c"], ["a", "a", "b", "b"])
  with pytest.raises(ValueError, match="for both x and y"):
    matching.snn_matching(x, x, 1, ["a"] * 4, None)
  with pytest.raises(ValueError, match="one entry per cell"):
    matching.snn_matching(x, x, 1, ["a"] * 3, ["a"] * 4)


@pytest.mark.parametrize("call, message", [
    (lambda x: matching.snn_matching(x, x, k=0), "k=0"),
    (lambda x: matching.snn_matching(x, x[:, :2]), "same width"),
    (lambda x: matching.sinkhorn_matching(x, x, epsilon=0.0), "epsilon=0.0"),
    (lambda x: matching.sinkhorn_matching(x, x, n_iter=0), "n_iter=0"),
    (lambda x: matching.sinkhorn_matching(x, x, top_k=1001), "top_k=1001"),
])
def test_argument_errors(call, message):
  with pytest.raises(ValueError, match=message):
    call(np.random.default_rng(0).normal(size=(5, 3)))


def test_sinkhorn_plan_satisfies_both_marginals():
  rng = np.random.default_rng(5)
  cost = matching.cosine_cost(rng.normal(size=(7, 4)), rng.normal(size=(5, 4)))
  plan = np.exp(np.asarray(matching.sinkhorn_log_plan(cost, 0.2, 300), np.float64))
  assert np.abs(plan.sum(axis=1) - 1 / 7).sum() < 1e-3  # ott-jax's stopping threshold on the marginals' L1 error.
  assert np.abs(plan.sum(axis=0) - 1 / 5).sum() < 1e-3
  assert plan.sum() == pytest.approx(1.0, abs=1e-3)


def test_sinkhorn_recovers_a_permutation_of_well_separated_points():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(60, 16))
  order = rng.permutation(60)
  matrix = matching.sinkhorn_matching(x, x[order], epsilon=0.01, n_iter=300)
  assert_official_format(matrix, 60)
  partner = np.argsort(order)
  np.testing.assert_array_equal(matching.best_partners(matrix), partner)
  assert matrix[np.arange(60), partner].min() > 0.99


def test_sinkhorn_top_k_sparsifies_within_the_limit():
  x, y, partner = noisy_pairs(n=50)
  matrix = matching.sinkhorn_matching(x, y, epsilon=0.05, top_k=3)
  assert_official_format(matrix, 50, limit=3)
  assert np.diff(matrix.indptr).min() == 3


def test_sinkhorn_scores_at_least_as_well_as_snn_on_a_noisy_toy_case():
  # Measured (seed 0, 200 cells, noise 0.8 per dimension): SNN 0.820, Sinkhorn (epsilon 0.01) 0.942.
  x, y, partner = noisy_pairs()
  solution = permutation_matrix(partner)
  snn = metrics.match_probability(matching.snn_matching(x, y), solution)
  sinkhorn = metrics.match_probability(matching.sinkhorn_matching(x, y, epsilon=0.01, n_iter=300), solution)
  assert 0.5 < snn <= sinkhorn
