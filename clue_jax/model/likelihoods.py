"""Element-wise log-likelihoods of the decoder distributions (docs/method.md §1.3).

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
  # sum_k 1 / (z + k), k < 6, over two common denominators (two divisions instead of six; a denominator that
  # overflows, z > ~7e12, drops a term below 1e-12).
  return series - _reciprocal_sum(z, z + 1.0, z + 2.0) - _reciprocal_sum(z + 3.0, z + 4.0, z + 5.0)


def _reciprocal_sum(a, b, c):
  """1 / a + 1 / b + 1 / c for positive a, b, c."""
  return (b * c + a * (b + c)) / (a * b * c)


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


@jax.custom_vjp
def nb_softmax_row_log_probs(loc, scale, bias, library, theta, lgamma_theta, x):
  """Per-row mean over features of lgamma(x + theta) - lgamma(theta) + `nb_mean_part(x, mean, theta)`.

  The NB decoder's mean is softmax(scale * loc + bias) * library. `loc` is (..., B, F) (leading axes: decoder
  passes over the same cells), `library` (..., B); the per-(batch, feature) heads `scale`, `bias`, `theta`,
  `lgamma_theta` (= lgamma(theta)) and the counts `x` are (B, F), shared by the passes. Returns (..., B): log NB(x)
  but for the data constant -lgamma(x + 1), averaged over features.

  The gradient is written by hand: its backward pass reads the saved proportions and log1p(ratio) once instead of
  autodiff's chain of divisions through log1p, the ratio and the softmax, and it sums the per-pass cotangents of
  the shared (B, F) inputs slice by slice (XLA's CPU backend is very slow on reductions over a short leading axis).
  """
  return _nb_softmax_forward(loc, scale, bias, library, theta, lgamma_theta, x)[0]


def _nb_softmax_forward(loc, scale, bias, library, theta, lgamma_theta, x):
  proportions = jax.nn.softmax(scale * loc + bias, axis=-1)
  ratio = (proportions * library[..., None] + EPS) / theta
  log1p_ratio = jnp.log1p(ratio)
  n_features = x.shape[-1]
  mean_part = _row_sums(-theta * log1p_ratio - x * jnp.log1p(1.0 / ratio)) / n_features
  normaliser = _row_sums(lgamma_positive(x + theta) - lgamma_theta) / n_features
  return mean_part + normaliser, (proportions, log1p_ratio, loc, scale, library, theta, x)


def _nb_softmax_backward(residuals, g):
  """With m = p l + eps, r = m / theta, s = theta + m:

  d/dm = theta (x - m) / (m s); through the softmax, dlogits = p l (d/dm - sum_f p d/dm) and
  dl = sum_f p d/dm; d/dtheta = -log1p(r) - (x - m) / s + digamma(x + theta).
  """
  proportions, log1p_ratio, loc, scale, library, theta, x = residuals
  g = g[..., None] / x.shape[-1]
  shifted = proportions * library[..., None] + EPS
  excess = (x - shifted) / (theta + shifted)
  weighted = proportions * (g * theta * excess / shifted)
  d_library = _row_sums(weighted)
  d_logits = library[..., None] * (weighted - proportions * d_library[..., None])
  g_normaliser = _sum_leading(g)  # (B, 1): the normaliser enters every pass.
  digamma = digamma_positive(x + theta)
  d_theta = g_normaliser * digamma - _sum_leading(g * (log1p_ratio + excess))
  d_lgamma_theta = jnp.broadcast_to(-g_normaliser, theta.shape)
  # Dead code (removed by XLA) unless the counts are differentiated.
  d_x = g_normaliser * digamma - _sum_leading(g * jnp.log1p(theta / shifted))
  # d_logits * scale over flattened features: not the forward pass's broadcast of `scale`, which XLA would otherwise
  # share between the passes and materialise.
  d_loc = (d_logits.reshape(-1, scale.size) * scale.reshape(-1)).reshape(loc.shape)
  return (d_loc, _sum_leading(loc * d_logits), _sum_leading(d_logits), d_library, d_theta,
          d_lgamma_theta, d_x)


def _row_sums(a):
  """Sums over the last axis as a product with a vector of ones.

  XLA's CPU backend evaluates an element-wise expression feeding a dot in one loop, where its fused reductions
  often pull their inputs apart into several materialised arrays (the NB loss and gradient ran ~1.4x slower that
  way). HIGHEST precision: a full float32 sum on accelerators too (no TF32).
  """
  return jnp.dot(a, jnp.ones(a.shape[-1:], a.dtype), precision=jax.lax.Precision.HIGHEST)


def _sum_leading(d):
  """Sum of `d` (..., B, F) over its leading axes, as a chain of slice additions."""
  d = d.reshape((-1,) + d.shape[-2:])
  total = d[0]
  for i in range(1, d.shape[0]):
    total = total + d[i]
  return total


nb_softmax_row_log_probs.defvjp(_nb_softmax_forward, _nb_softmax_backward)


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
