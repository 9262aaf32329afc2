"""Tests for clue_jax.data.preprocess on synthetic data."""

import io
import tracemalloc

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from clue_jax import config as config_lib
from clue_jax.data import dataset as data_lib
from clue_jax.data import preprocess as pp, sampler


def _counts(n=120, f=40, seed=0, lam=1.0):
  return np.random.default_rng(seed).poisson(lam, (n, f)).astype(np.float64)


def _low_rank(m=200, n=80, rank=6, seed=0):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
  v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
  s = np.geomspace(50.0, 2.0, rank)
  return (u * s) @ v.T + 1e-3 * rng.standard_normal((m, n))


def _reference_pca(train, n_components, clip=10.0):
  """Hand-written z-score + clip + eigh projection (dense numpy)."""
  mean, std = train.mean(0), train.std(0)
  std[std == 0] = 1.0
  z = np.clip((train - mean) / std, -clip, clip)
  _, vecs = np.linalg.eigh(z.T @ z)
  return mean, std, vecs[:, ::-1][:, :n_components].T


def _assert_same_rows_up_to_sign(a, b, atol):
  for ra, rb in zip(a, b):
    assert min(np.abs(ra - rb).max(), np.abs(ra + rb).max()) < atol


def _assert_same_subspace(a, b, atol):
  """Rows of a and b (orthonormal) span the same subspace."""
  np.testing.assert_allclose(np.linalg.svd(a @ b.T, compute_uv=False), 1.0, atol=atol)


# ---------------------------------------------------------- randomized SVD


@pytest.mark.parametrize("sparse", [False, True])
def test_randomized_svd_matches_numpy(sparse):
  a = _low_rank()
  if sparse:
    a[np.abs(a) < 0.05] = 0.0
    a = sp.csr_matrix(a)
  dense = a.toarray() if sparse else a
  u, s, vt = pp.randomized_svd(a, 6)
  u_ref, s_ref, vt_ref = np.linalg.svd(dense, full_matrices=False)
  assert u.shape == (200, 6) and s.shape == (6,) and vt.shape == (6, 80)
  np.testing.assert_allclose(s, s_ref[:6], rtol=1e-6)
  _assert_same_subspace(vt, vt_ref[:6], atol=1e-6)
  _assert_same_subspace(u.T, u_ref[:, :6].T, atol=1e-6)
  np.testing.assert_allclose((u * s) @ vt, (u_ref[:, :6] * s_ref[:6]) @ vt_ref[:6], atol=1e-6)


def test_randomized_svd_deterministic_sign_fixed_and_clamped():
  a = _low_rank(m=30, n=8, rank=8)
  u1, s1, vt1 = pp.randomized_svd(a, 100, seed=3)
  u2, s2, vt2 = pp.randomized_svd(a.copy(), 100, seed=3)
  assert vt1.shape == (8, 8)
  np.testing.assert_array_equal(vt1, vt2)
  np.testing.assert_array_equal(u1, u2)
  peaks = vt1[np.arange(8), np.abs(vt1).argmax(1)]
  assert (peaks > 0).all()
  _, _, vt_other = pp.randomized_svd(a, 100, seed=4)
  np.testing.assert_allclose(vt_other, vt1, atol=1e-8)  # sign fix makes seeds agree


# ---------------------------------------------------------- normalisations


def test_log1p_cp10k_dense_and_sparse():
  x = _counts()
  x[3] = 0.0
  before = x.copy()
  dense = pp.log1p_cp10k(x)
  sparse = pp.log1p_cp10k(sp.csr_matrix(x))
  np.testing.assert_array_equal(x, before)
  assert dense.dtype == np.float32 and isinstance(dense, np.ndarray)
  assert sp.issparse(sparse) and sparse.dtype == np.float32
  rows = x.sum(1, keepdims=True)
  expected = np.log1p(np.divide(x * 1e4, rows, out=np.zeros_like(x), where=rows > 0))
  np.testing.assert_allclose(dense, expected, rtol=1e-6)
  np.testing.assert_allclose(sparse.toarray(), expected, rtol=1e-6)
  assert (dense[3] == 0).all()


def test_clr_formula():
  x = _counts(f=14)
  x[7] = 0.0
  out = pp.clr(sp.csr_matrix(x))
  g = np.exp(np.log1p(x).mean(1, keepdims=True))
  np.testing.assert_allclose(out, np.log1p(x / g), rtol=1e-6)
  # per cell, expm1(y) is proportional to the counts (a pure rescaling)
  ratio = np.expm1(out[0].astype(np.float64))[x[0] > 0] / x[0][x[0] > 0]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
  assert (out[7] == 0).all() and out.dtype == np.float32


# --------------------------------------------------------------------- PCA


@pytest.mark.parametrize("sparse", [False, True])
def test_pca_matches_reference(sparse):
  rng = np.random.default_rng(1)
  x = rng.gamma(0.5, 2.0, (300, 25)) * (rng.random((300, 25)) < 0.6)
  x[0, 0] = 500.0  # gets clipped
  state = pp.fit_pca(sp.csr_matrix(x) if sparse else x, 7)
  mean, std, comps = _reference_pca(x, 7)
  np.testing.assert_allclose(state.mean, mean, rtol=1e-10)
  np.testing.assert_allclose(state.std, std, rtol=1e-10)
  z = np.clip((x - mean) / std, -10, 10)
  # Randomized SVD: on noise-like data single vectors are ill-determined, so compare captured variance.
  captured, best = np.square(z @ state.components.T).sum(), np.square(z @ comps.T).sum()
  assert best * (1 - 1e-4) <= captured <= best * (1 + 1e-9)
  np.testing.assert_allclose(state.components @ state.components.T, np.eye(7), atol=1e-8)
  out = pp.transform_pca(state, sp.csr_matrix(x) if sparse else x)
  assert z.max() == 10.0
  assert out.dtype == np.float32 and out.shape == (300, 7)
  np.testing.assert_allclose(out, z @ state.components.T, rtol=1e-5, atol=1e-4)


def test_pca_row_chunks_do_not_change_the_result(monkeypatch):
  """Z held in memory (small data) and Z re-standardised chunk by chunk (data over _MAX_CHUNK_ELEMENTS) agree."""
  x = _low_rank(m=150, n=30, rank=4, seed=2)
  whole = pp.fit_pca(x, 4)
  monkeypatch.setattr(pp, "_MAX_CHUNK_ROWS", 64)
  monkeypatch.setattr(pp, "_MAX_CHUNK_ELEMENTS", 64 * 30)
  calls = []
  operator = pp._standardised_operator
  monkeypatch.setattr(pp, "_standardised_operator", lambda *a: calls.append(1) or operator(*a))
  chunked = pp.fit_pca(sp.csr_matrix(x), 4)
  assert calls  # The chunked path ran.
  np.testing.assert_allclose(chunked.components, whole.components, atol=1e-6)


def test_pca_constant_feature_and_rank_clamp():
  x = _counts(n=60, f=14)
  x[:, 5] = 3.7  # constant, non-zero
  x[:, 9] = 0.0  # constant zero
  state = pp.fit_pca(x, 100)
  assert state.components.shape == (14, 14)
  assert state.std[5] == 1.0 and state.std[9] == 1.0
  out = pp.transform_pca(state, x)
  assert out.shape == (60, 14) and np.isfinite(out).all()
  np.testing.assert_allclose(state.components @ state.components.T, np.eye(14), atol=1e-8)
  assert pp.fit_pca(x[:5], 100).components.shape == (5, 14)


def test_pca_transform_uses_training_statistics():
  train, new = _counts(seed=0), 3.0 * _counts(n=50, seed=1) + 2.0
  state = pp.fit_pca(train, 5)
  z = np.clip((new - train.mean(0)) / train.std(0), -10, 10)
  np.testing.assert_allclose(pp.transform_pca(state, new), z @ state.components.T, rtol=1e-5, atol=1e-4)
  refit = pp.fit_pca(new, 5)
  assert not np.allclose(refit.mean, state.mean)


def _clipped_gamma(n=300, f=25, seed=1):
  rng = np.random.default_rng(seed)
  x = rng.gamma(0.5, 2.0, (n, f)) * (rng.random((n, f)) < 0.6)
  x[0, 0] = 500.0  # gets clipped
  x[:, 3] = 1.5  # constant
  return x


@pytest.mark.parametrize("sparse", [False, True])
def test_pca_gram_matches_dense_svd(sparse):
  x = _clipped_gamma()
  state = pp.fit_pca(sp.csr_matrix(x) if sparse else x, 7, solver="gram")
  mean, std, _ = _reference_pca(x, 7)
  np.testing.assert_array_equal(state.mean, pp.fit_pca(x, 7).mean)  # The same statistics as the randomized fit.
  np.testing.assert_array_equal(state.std, pp.fit_pca(x, 7).std)
  z = np.clip((x - mean) / std, -10, 10)
  assert z.max() == 10.0
  _, s, vt = np.linalg.svd(z, full_matrices=False)
  _assert_same_subspace(state.components, vt[:7], atol=1e-8)
  np.testing.assert_allclose(np.square(z @ state.components.T).sum(0), s[:7] ** 2, rtol=1e-6)  # Explained variances.
  flips = np.sign(vt[np.arange(7), np.abs(vt[:7]).argmax(1)])
  np.testing.assert_allclose(state.components, vt[:7] * flips[:, None], atol=1e-8)  # Largest |entry| positive.
  assert state.components.flags.c_contiguous and state.components.shape == (7, 25)


def test_pca_gram_agrees_with_randomized_and_keeps_the_state_layout():
  x = _low_rank(m=150, n=30, rank=4, seed=2)
  gram, randomized = pp.fit_pca(x, 4, solver="gram"), pp.fit_pca(x, 4)
  np.testing.assert_allclose(gram.components, randomized.components, atol=1e-6)  # Same vectors, same signs.
  arrays, reference = pp.state_to_arrays(gram), pp.state_to_arrays(randomized)
  assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
  np.testing.assert_allclose(pp.transform_pca(gram, x), pp.transform_pca(randomized, x), atol=1e-4)
  assert pp.fit_pca(x, 100, solver="gram").components.shape == (30, 30)  # Clamped like the randomized fit.
  with pytest.raises(ValueError, match="solver"):
    pp.fit_pca(x, 4, solver="exact")


def test_pca_gram_streams_row_chunks(monkeypatch):
  """Three passes over the rows (mean, std, Gram), each densifying one chunk at a time; chunking changes nothing."""
  x = sp.csr_matrix(_clipped_gamma(n=10_000, f=80, seed=3))
  whole = pp.fit_pca(x, 6, solver="gram")
  monkeypatch.setattr(pp, "_MAX_CHUNK_ROWS", 100)
  passes, rows = [], []
  chunks = pp._row_chunks

  def counted(matrix):
    passes.append(1)
    for start, stop, block in chunks(matrix):
      rows.append(len(block))
      yield start, stop, block

  monkeypatch.setattr(pp, "_row_chunks", counted)
  tracemalloc.start()
  chunked = pp.fit_pca(x, 6, solver="gram")
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert len(passes) == 3 and max(rows) == 100 and sum(rows) == 3 * 10_000
  assert peak < 10_000 * 80 * 8 / 8  # Well under one dense copy of x.
  np.testing.assert_allclose(chunked.components, whole.components, atol=1e-10)


def test_fit_representation_solver_and_cell_subset():
  """rep_solver reaches fit_pca and rep_fit_cells fits on a seeded subset of the training rows."""
  counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (200, 30)).astype(np.float32))
  adata = ad.AnnData(counts, obs={"batch": ["a"] * 200})
  adata.obs_names, adata.var_names = [f"c{i}" for i in range(200)], [f"g{j}" for j in range(30)]
  rows = np.arange(0, 200, 2)
  for solver in pp.PCA_SOLVERS:
    for cells in (0, 40, 500):
      spec = config_lib.modality("", layer="X", feature_selection="all", rep_dim=5, rep_normalize="log1p_cp10k",
                                 rep_solver=solver, rep_fit_cells=cells)
      raw = data_lib.read_modality("rna", spec, adata=adata)
      state = pp.state_from_arrays(data_lib.fit_representation(raw, "rna", rows, seed=3))
      used = rows if cells in (0, 500) else np.sort(sampler.rep_fit_stream(3).choice(rows, cells, replace=False))
      expected = pp.fit_pca(pp.log1p_cp10k(counts[used]), 5, seed=3, solver=solver)
      np.testing.assert_array_equal(state.mean, expected.mean)
      np.testing.assert_array_equal(state.components, expected.components)


# --------------------------------------------------------------------- LSI


def _atac(n=150, f=60, seed=0):
  rng = np.random.default_rng(seed)
  x = (rng.random((n, f)) < 0.15).astype(np.float64)
  x[: n // 2, : f // 2] += rng.random((n // 2, f // 2)) < 0.3  # structure
  x[:, 7] = 0.0  # peak without counts
  x[4] = 0.0  # cell without counts
  return x


def test_lsi_finite_and_standardised():
  x = _atac()
  state = pp.fit_lsi(sp.csr_matrix(x), 10)
  assert state.idf[7] == 0.0 and np.isfinite(state.idf).all()
  assert state.components.shape == (10, 60) and state.singular_values.shape == (10,)
  out = pp.transform_lsi(state, sp.csr_matrix(x))
  assert out.dtype == np.float32 and out.shape == (150, 10) and np.isfinite(out).all()
  assert (out[4] == 0).all()
  keep = np.ones(150, bool)
  keep[4] = False
  np.testing.assert_allclose(out[keep].mean(1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out[keep].std(1, ddof=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(pp.transform_lsi(state, x), out, rtol=1e-5, atol=1e-5)


def test_lsi_matches_hand_written_tfidf():
  x = _atac(seed=1)
  state = pp.fit_lsi(x, 5)
  with np.errstate(divide="ignore", invalid="ignore"):
    tf = np.nan_to_num(x / x.sum(1, keepdims=True))
    idf = np.nan_to_num(len(x) / x.sum(0), posinf=0.0)
  y = np.log1p(tf * idf * 1e4)
  _, s, vt = np.linalg.svd(y, full_matrices=False)
  np.testing.assert_allclose(state.idf, idf)
  np.testing.assert_allclose(state.singular_values, s[:5], rtol=1e-6)
  _assert_same_subspace(state.components, vt[:5], atol=1e-6)
  _assert_same_rows_up_to_sign(state.components, vt[:5], atol=1e-3)
  proj = y @ state.components.T / state.singular_values
  ok = x.sum(1) > 0
  proj = proj[ok] - proj[ok].mean(1, keepdims=True)
  proj /= proj.std(1, ddof=1, keepdims=True)
  np.testing.assert_allclose(pp.transform_lsi(state, x)[ok], proj, rtol=1e-4, atol=1e-4)


def test_lsi_rank_clamped():
  x = _atac(n=20, f=12)
  state = pp.fit_lsi(x, 100)
  assert state.components.shape == (12, 12)
  assert np.isfinite(pp.transform_lsi(state, x)).all()


# ------------------------------------------------------- feature selection


def test_select_by_total_counts():
  x = np.zeros((4, 6))
  x[:, 1] = 5.0
  x[:, 4] = 3.0
  x[:, 2] = 3.0  # ties with 4: lower index wins
  x[0, 0] = 1.0
  for data in (x, sp.csr_matrix(x)):
    np.testing.assert_array_equal(np.flatnonzero(pp.select_by_total_counts(data, 2)), [1, 2])
    np.testing.assert_array_equal(np.flatnonzero(pp.select_by_total_counts(data, 3)), [1, 2, 4])
    assert pp.select_by_total_counts(data, 10).all()


def test_select_by_dispersion_finds_planted_feature():
  rng = np.random.default_rng(0)
  x = rng.poisson(2.0, (400, 80)).astype(np.float64)
  x[:, 13] = rng.poisson(4.0, 400) * (rng.random(400) < 0.5)  # same mean, 3x variance
  x[:, 30] = 0.0  # zero mean: never needed here
  for data in (x, sp.csr_matrix(x)):
    mask = pp.select_by_dispersion(data, 10)
    assert mask.dtype == bool and mask.sum() == 10
    assert mask[13] and not mask[30]
  assert pp.select_by_dispersion(x, 80).all()
  np.testing.assert_array_equal(pp.select_by_dispersion(x, 10), pp.select_by_dispersion(sp.csr_matrix(x), 10))


def test_select_by_dispersion_zero_mean_only_to_fill():
  x = _counts(n=100, f=10)
  x[:, [2, 6]] = 0.0
  mask = pp.select_by_dispersion(x, 9)
  assert mask.sum() == 9 and mask[[0, 1, 3, 4, 5, 7, 8, 9]].all() and mask[2]


# ---------------------------------------------------------- serialisation


def test_state_round_trip_via_npz():
  x = _counts()
  for state in (pp.fit_pca(x, 4), pp.fit_lsi(x, 4)):
    arrays = pp.state_to_arrays(state)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
      back = pp.state_from_arrays(dict(loaded))
    assert type(back) is type(state)
    for name, value in arrays.items():
      if name != "kind":
        np.testing.assert_array_equal(getattr(back, name), value)
    np.testing.assert_array_equal(
      pp.transform_pca(back, x) if isinstance(back, pp.PCAState) else pp.transform_lsi(back, x),
      pp.transform_pca(state, x) if isinstance(state, pp.PCAState) else pp.transform_lsi(state, x),
    )


def test_inputs_not_modified():
  x = _counts()
  xs = sp.csr_matrix(x)
  data = xs.data.copy()
  pp.fit_pca(xs, 3)
  pp.transform_lsi(pp.fit_lsi(xs, 3), xs)
  pp.select_by_dispersion(xs, 5)
  pp.clr(x)
  np.testing.assert_array_equal(xs.data, data)
  np.testing.assert_array_equal(x, _counts())
