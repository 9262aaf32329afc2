"""The train step's random draws: distributions, independence across keys, and the same values on any mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from clue_jax.model import rng
from clue_jax.train import parallel

KEY = jax.random.key(7)


def test_uniform_is_uniform_on_unit_interval():
  u = np.asarray(rng.uniform(KEY, (200_000,)))
  assert u.min() >= 0.0 and u.max() < 1.0
  assert stats.kstest(u, "uniform").pvalue > 1e-3
  # Neighbouring indices are not correlated.
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_bernoulli_rate_and_normal_moments():
  keep = np.asarray(rng.bernoulli(KEY, 0.8, (500, 400)))
  assert abs(keep.mean() - 0.8) < 0.005
  z = np.asarray(rng.normal(KEY, (200_000,)))
  assert np.isfinite(z).all()
  assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
  assert stats.kstest(z, "norm").pvalue > 1e-3


def test_draws_are_deterministic_and_differ_across_keys():
  a, b = rng.random_bits(KEY, (64, 32)), rng.random_bits(KEY, (64, 32))
  np.testing.assert_array_equal(a, b)
  c = rng.random_bits(jax.random.fold_in(KEY, 1), (64, 32))
  assert (np.asarray(a) == np.asarray(c)).mean() < 0.01


def test_draws_do_not_depend_on_the_device_count():
  mesh = parallel.make_mesh(4)
  sharded = jax.jit(lambda k: rng.normal(k, (16, 8)), out_shardings=parallel.batch_sharding(mesh))(KEY)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(lambda k: rng.normal(k, (16, 8)))(KEY)))
  assert sharded.sharding.num_devices == 4
  assert jnp.asarray(sharded).dtype == jnp.float32
