"""Element-wise log-likelihoods of the decoder distributions (method.md §1.3).

Every function returns log p(x) with the shape of `x`, except the sham `mse` / `rmse` likelihoods, which, like the
reference, return minus the mean squared (root-mean-squared) error over all elements broadcast to `x`'s shape, so
that any mean over rows and features gives back exactly -MSE (-RMSE).
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

EPS = 1e-7
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def negative_binomial(x, mean, inverse_dispersion):
  """NB with the given mean and inverse dispersion theta, as torch's NegativeBinomial(theta, logits).

  The logits are log(mean + eps) - log(theta), as in the reference; x may be non-integer (lgamma form).
  """
  return (nb_normaliser(x, inverse_dispersion) - gammaln(x + 1.0)
          + nb_mean_part(x, mean, inverse_dispersion))


def nb_normaliser(x, theta, lgamma_theta=None):
  """lgamma(x + theta) - lgamma(theta): the part of log NB that depends on theta but not on the mean.

  `lgamma_theta` may pass lgamma(theta) when it is cheaper to compute elsewhere (per batch and feature).
  """
  return lgamma_positive(x + theta) - (gammaln(theta) if lgamma_theta is None else lgamma_theta)


_SHIFT = 6.0  # Recurrence steps before the asymptotic series (its error is below 1e-9 from 6 on).


@jax.custom_jvp
def lgamma_positive(z):
  """lgamma(z) for z > 0: Stirling's series at z + 6 minus log(z (z + 1) ... (z + 5)).

  A few logarithms per element where XLA:CPU's general lgamma (and its derivative, digamma) cost ~30x more.
  """
  w = z + _SHIFT
  series = (w - 0.5) * jnp.log(w) - w + _HALF_LOG_2PI + _stirling_tail(1.0 / w)
  # Two products of three factors: no overflow in float32 below z ~ 1e12.
  return series - jnp.log(z * (z + 1.0) * (z + 2.0)) - jnp.log((z + 3.0) * (z + 4.0) * (z + 5.0))


def _stirling_tail(inv):
  inv2 = inv * inv
  return inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))


def digamma_positive(z):
  """digamma(z) for z > 0, by the same shift and the asymptotic series of digamma."""
  w = z + _SHIFT
  inv = 1.0 / w
  inv2 = inv * inv
  series = jnp.log(w) - 0.5 * inv - inv2 * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 / 252.0))
  return series - sum(1.0 / (z + k) for k in range(int(_SHIFT)))


@lgamma_positive.defjvp
def _lgamma_positive_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  return lgamma_positive(z), digamma_positive(z) * dz


def nb_mean_part(x, mean, theta):
  """theta log(sigmoid(-logits)) + x log(sigmoid(logits)) with logits = log(r), r = (mean + eps) / theta.

  Evaluated as -theta log1p(r) - x log1p(1 / r): the same value with two logarithms instead of two log-sigmoids
  per element, and no cancellation for small or large r.
  """
  ratio = (mean + EPS) / theta
  return -theta * jnp.log1p(ratio) - x * jnp.log1p(1.0 / ratio)


def normal(x, loc, scale):
  z = (x - loc) / scale
  return -0.5 * z * z - jnp.log(scale) - _HALF_LOG_2PI


def zero_inflated_normal(x, loc, scale, zi_logits):
  """Normal mixed with a point mass at 0 of weight sigmoid(zi_logits); |x| < eps counts as zero.

  The zero case is log(exp(zi) + exp(log N(0)) + eps) - softplus(zi), with the reference's eps.
  """
  raw = normal(x, loc, scale)
  is_zero = jnp.abs(x) < EPS
  zero_case = jnp.logaddexp(jnp.logaddexp(zi_logits, raw), math.log(EPS)) - jax.nn.softplus(zi_logits)
  return jnp.where(is_zero, zero_case, raw - jax.nn.softplus(zi_logits))


def zero_inflated_log_normal(x, loc, scale, zi_logits):
  """LogNormal(loc, scale) mixed with a point mass at 0 of weight sigmoid(zi_logits)."""
  is_zero = jnp.abs(x) < EPS
  safe_x = jnp.where(is_zero, 1.0, x)
  log_x = jnp.log(safe_x)
  raw = normal(log_x, loc, scale) - log_x
  return jnp.where(is_zero, jax.nn.log_sigmoid(zi_logits), raw - jax.nn.softplus(zi_logits))


def bernoulli(x, logits):
  return x * jax.nn.log_sigmoid(logits) + (1.0 - x) * jax.nn.log_sigmoid(-logits)


def mse(x, loc):
  """Sham likelihood: -mean((x - loc)^2) over all elements, broadcast to x's shape."""
  return jnp.broadcast_to(-jnp.mean(jnp.square(x - loc)), x.shape)


def rmse(x, loc):
  """Sham likelihood: -sqrt(mean((x - loc)^2)) over all elements, broadcast to x's shape."""
  return jnp.broadcast_to(-jnp.sqrt(jnp.mean(jnp.square(x - loc))), x.shape)
