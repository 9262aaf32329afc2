"""clue_jax.model.likelihoods (and the MSE / RMSE reduction in losses) against scipy.stats, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import digamma, expit, gammaln

from clue_jax.model import likelihoods, losses

NORMAL_ATOL = 1e-12


@pytest.fixture(autouse=True)
def x64():
  with jax.enable_x64(True):
    yield


def grid(*axes):
  """Broadcast 1-D value lists against each other, flattened to float64 vectors."""
  return [a.ravel() for a in np.meshgrid(*[np.asarray(v, np.float64) for v in axes], indexing="ij")]


def evaluate(fn, *args):
  out = np.asarray(fn(*[jnp.asarray(a) for a in args]))
  assert out.dtype == np.float64
  return out


def nb_by_hand(x, mean, theta):
  """The lgamma continuation of the NB log-pmf, without the reference's eps."""
  return (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1) + theta * np.log(theta / (theta + mean))
          + x * np.log(mean / (theta + mean)))


def test_negative_binomial_matches_scipy():
  x, mean, theta = grid([0, 1, 2, 5, 17, 100, 1000, 5000], [0.5, 3.0, 40.0, 1000.0], [0.3, 2.0, 50.0])
  got = evaluate(likelihoods.negative_binomial, x, mean, theta)
  want = stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mean))
  # The reference's log(mean + 1e-7) shifts the result by < 1e-6 relative on this grid.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_negative_binomial_mean_is_the_mean():
  x = np.arange(20000, dtype=np.float64)
  for mean, theta in [(3.0, 0.7), (40.0, 5.0)]:
    pmf = np.exp(evaluate(likelihoods.negative_binomial, x, np.full_like(x, mean), np.full_like(x, theta)))
    np.testing.assert_allclose(pmf.sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose((pmf * x).sum(), mean, rtol=1e-6)


def test_negative_binomial_mean_part_is_accurate_in_float32():
  """The rearranged logits form keeps float32 accuracy where the mean is far below or far above theta."""
  x, mean, theta = grid([0, 1, 3, 20, 300], [1e-3, 0.1, 2.0, 50.0, 1e3], [0.05, 1.0, 30.0, 1e3, 1e5])
  logits = np.log(mean + 1e-7) - np.log(theta)
  want = -theta * np.logaddexp(0.0, logits) - x * np.logaddexp(0.0, -logits)  # torch's form, float64.
  got = np.asarray(likelihoods.nb_mean_part(*(jnp.asarray(a, jnp.float32) for a in (x, mean, theta))))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_negative_binomial_non_integer_counts():
  x, mean, theta = grid([0.5, 2.25, 7.5, 130.7], [0.5, 3.0, 40.0], [0.3, 2.0, 50.0])
  got = evaluate(likelihoods.negative_binomial, x, mean, theta)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, nb_by_hand(x, mean, theta), rtol=1e-6, atol=1e-9)
  # Where the pmf decreases (x above the mode), the value lies between its integer neighbours'.
  x, mean, theta = grid([5.5, 9.3, 20.5], [0.5, 1.0], [1.0, 3.0])
  lower = evaluate(likelihoods.negative_binomial, np.floor(x), mean, theta)
  middle = evaluate(likelihoods.negative_binomial, x, mean, theta)
  upper = evaluate(likelihoods.negative_binomial, np.ceil(x), mean, theta)
  assert (upper < middle).all() and (middle < lower).all()


def test_normal_matches_scipy():
  x, loc, scale = grid([-4.0, -0.3, 0.0, 1.0, 7.5], [-2.0, 0.0, 0.4], [1e-3, 0.5, 1.0, 3.0])
  got = evaluate(likelihoods.normal, x, loc, scale)
  np.testing.assert_allclose(got, stats.norm.logpdf(x, loc, scale), rtol=1e-9, atol=NORMAL_ATOL)


def test_zero_inflated_normal_matches_scipy():
  x, loc, scale, zi = grid([-2.0, 0.0, 5e-8, 0.3, 1.7], [-1.0, 0.0, 0.8], [0.2, 1.0, 2.5], [-6.0, -0.5, 0.0, 3.0])
  got = evaluate(likelihoods.zero_inflated_normal, x, loc, scale, zi)
  pi = expit(zi)
  is_zero = np.abs(x) < 1e-7  # 5e-8 counts as zero (the density is still taken at x), as in the reference.
  # The reference adds 1e-7 inside the log of the zero case: log(exp(zi) + N(0) + 1e-7) - softplus(zi).
  zero_case = np.log(np.exp(zi) + stats.norm.pdf(x, loc, scale) + 1e-7) - np.logaddexp(0, zi)
  want = np.where(is_zero, zero_case,
                  np.log1p(-pi) + stats.norm.logpdf(x, loc, scale))
  assert is_zero.any() and (~is_zero).any()
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=NORMAL_ATOL)


def test_zero_inflated_log_normal_matches_scipy():
  x, loc, scale, zi = grid([0.0, 1e-3, 0.5, 1.0, 4.0, 60.0], [-1.0, 0.0, 1.5], [0.3, 1.0, 2.0], [-4.0, 0.0, 2.5])
  got = evaluate(likelihoods.zero_inflated_log_normal, x, loc, scale, zi)
  pi = expit(zi)
  with np.errstate(divide="ignore"):
    want = np.where(x == 0, np.log(pi),
                    np.log1p(-pi) + stats.lognorm.logpdf(x, s=scale, scale=np.exp(loc)))
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=NORMAL_ATOL)


def test_zero_inflated_log_normal_gradient_at_zero_is_finite():
  grad = jax.grad(lambda x: likelihoods.zero_inflated_log_normal(x, 0.3, 1.2, -0.5).sum())(jnp.zeros(3))
  assert np.isfinite(np.asarray(grad)).all()


def test_bernoulli_matches_scipy():
  x, logits = grid([0.0, 1.0], [-8.0, -2.0, -0.1, 0.0, 0.7, 3.0, 8.0])
  got = evaluate(likelihoods.bernoulli, x, logits)
  np.testing.assert_allclose(got, stats.bernoulli.logpmf(x, p=expit(logits)), rtol=1e-10, atol=1e-12)


@pytest.fixture
def regression():
  rng = np.random.default_rng(0)
  x, loc = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  return x, loc, np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])


def test_sham_likelihoods_average_to_minus_mse(regression):
  x, loc, _ = regression
  mse = np.mean((x - loc) ** 2)
  np.testing.assert_allclose(np.mean(evaluate(likelihoods.mse, x, loc)), -mse, rtol=1e-12)
  np.testing.assert_allclose(np.mean(evaluate(likelihoods.rmse, x, loc)), -np.sqrt(mse), rtol=1e-12)


@pytest.mark.parametrize("likelihood", ["MSE", "RMSE"])
def test_reconstruction_nll_mse_over_selected_rows(regression, likelihood):
  x, loc, rows = regression
  root = np.sqrt if likelihood == "RMSE" else (lambda v: v)

  def nll(x, rows):
    return float(losses.reconstruction_nll(likelihood, jnp.asarray(x), {"loc": jnp.asarray(loc)}, jnp.asarray(rows)))

  selected = rows > 0
  masked = nll(x, rows)
  np.testing.assert_allclose(masked, root(np.mean((x[selected] - loc[selected]) ** 2)), rtol=1e-12)
  np.testing.assert_allclose(nll(x, np.ones(6)), root(np.mean((x - loc) ** 2)), rtol=1e-12)
  assert abs(masked - nll(x, np.ones(6))) > 1e-3
  # Unselected rows do not matter at all; no selected row gives 0.
  garbage = np.where(selected[:, None], x, 1e6)
  assert nll(garbage, rows) == masked
  assert nll(x, np.zeros(6)) == 0.0


def test_reconstruction_nll_nb_over_selected_rows():
  rng = np.random.default_rng(1)
  x = rng.poisson(3.0, (5, 3)).astype(np.float64)
  mean, theta = rng.uniform(0.5, 6.0, (5, 3)), rng.uniform(0.5, 4.0, (5, 3))
  rows = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
  got = losses.reconstruction_nll("NB", jnp.asarray(x), {"mean": jnp.asarray(mean),
                                                         "inverse_dispersion": jnp.asarray(theta)}, jnp.asarray(rows))
  want = -stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mean))[rows > 0].mean()
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_nb_log_factorial_hoisted_out_of_the_step_gives_the_same_nll():
  """reconstruction_nll with per-row sum_f lgamma(x_f + 1) (computed once from the sparse counts at load time)."""
  import scipy.sparse as sp
  from clue_jax.data import dataset as data_lib
  rng = np.random.default_rng(5)
  x = rng.poisson(2.0, (6, 9)).astype(np.float64)
  params = {"mean": rng.uniform(0.5, 4.0, (6, 9)), "inverse_dispersion": rng.uniform(0.5, 5.0, (6, 9))}
  rows = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
  log_factorial = data_lib.row_log_factorials(sp.csr_matrix(x)).astype(np.float64)
  np.testing.assert_allclose(log_factorial, gammaln(x + 1).sum(1), rtol=1e-6)
  direct = losses.reconstruction_nll("NB", x, params, rows)
  hoisted = losses.reconstruction_nll("NB", x, params, rows, log_factorial)
  np.testing.assert_allclose(hoisted, direct, rtol=1e-6)


def test_lgamma_positive_and_its_derivative_match_scipy():
  z = np.concatenate([np.geomspace(1e-6, 1e7, 500), np.arange(0.25, 40.0, 0.25)])
  with jax.enable_x64(True):
    got = np.asarray(likelihoods.lgamma_positive(jnp.asarray(z)))
    slope = np.asarray(jax.vmap(jax.grad(likelihoods.lgamma_positive))(jnp.asarray(z)))
  np.testing.assert_allclose(got, gammaln(z), rtol=1e-8, atol=1e-7)
  np.testing.assert_allclose(slope, digamma(z), rtol=1e-8, atol=1e-8)


def nb_softmax_inputs(lead=(3,), batch=5, n_features=7, seed=0):
  """Decoder outputs, heads, libraries and counts spanning extreme ratios (mean / theta from ~1e-20 to ~1e10).

  Spread logits (proportions down to ~e^-40), libraries from 0 (a ReLU's zero) to 1e6, theta from 1e-2 to 1e4,
  counts 0, small, non-integer and 1e4.
  """
  rng = np.random.default_rng(seed)
  loc = rng.normal(0.0, 5.0, lead + (batch, n_features))
  scale, bias = rng.uniform(0.2, 2.0, (batch, n_features)), rng.normal(0.0, 2.0, (batch, n_features))
  library = rng.choice([0.0, 1e-4, 1.0, 30.0, 1e3, 1e6], lead + (batch,))
  theta = 10.0 ** rng.uniform(-2.0, 4.0, (batch, n_features))
  x = rng.choice([0.0, 0.0, 1.0, 2.5, 7.0, 40.0, 1e4], (batch, n_features))
  return loc, scale, bias, library, theta, gammaln(theta), x


def nb_softmax_by_autodiff(loc, scale, bias, library, theta, lgamma_theta, x):
  """The straightforward composition that `nb_softmax_row_log_probs` fuses (autodiff gives its gradient)."""
  mean = jax.nn.softmax(scale * loc + bias, axis=-1) * library[..., None]
  return (likelihoods.nb_mean_part(x, mean, theta) + likelihoods.lgamma_positive(x + theta) - lgamma_theta).mean(-1)


# XLA's backend optimisations only cost compile time on graphs this small.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def value_and_grads(fn, args, weights):
  loss = jax.value_and_grad(lambda *a: (fn(*a) * weights).sum(), argnums=tuple(range(7)))
  return jax.jit(loss, compiler_options=FAST_COMPILE)(*args)


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_nb_softmax_row_log_probs_gradient_matches_autodiff(lead):
  """float64: the hand-written VJP against autodiff of the composition, for every input (counts included)."""
  args = [jnp.asarray(a) for a in nb_softmax_inputs(lead)]
  weights = jnp.asarray(np.random.default_rng(1).normal(size=lead + (5,)))
  np.testing.assert_allclose(jax.jit(likelihoods.nb_softmax_row_log_probs, compiler_options=FAST_COMPILE)(*args),
                             jax.jit(nb_softmax_by_autodiff, compiler_options=FAST_COMPILE)(*args), rtol=1e-12)
  got_value, got = value_and_grads(likelihoods.nb_softmax_row_log_probs, args, weights)
  want_value, want = value_and_grads(nb_softmax_by_autodiff, args, weights)
  np.testing.assert_allclose(got_value, want_value, rtol=1e-12)
  for name, g, w in zip(("loc", "scale", "bias", "library", "theta", "lgamma_theta", "x"), got, want):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-10 * np.abs(w).max(), err_msg=name)


def test_nb_softmax_row_log_probs_float32_is_as_accurate_as_autodiff():
  """float32 value and gradients against the float64 ones: no worse than float32 autodiff of the composition."""
  args64 = [jnp.asarray(a) for a in nb_softmax_inputs(seed=2)]
  args32 = [a.astype(jnp.float32) for a in args64]
  weights = jnp.asarray(np.random.default_rng(3).normal(size=(3, 5)))
  truth = value_and_grads(nb_softmax_by_autodiff, args64, weights)
  fused = value_and_grads(likelihoods.nb_softmax_row_log_probs, args32, weights.astype(jnp.float32))
  plain = value_and_grads(nb_softmax_by_autodiff, args32, weights.astype(jnp.float32))

  def error(got, want):  # Relative to the array's scale.
    return float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))

  for g, p, w in zip((fused[0],) + fused[1], (plain[0],) + plain[1], (truth[0],) + truth[1]):
    assert g.dtype == jnp.float32
    assert error(g, w) <= max(2.0 * error(p, w), 1e-6)
