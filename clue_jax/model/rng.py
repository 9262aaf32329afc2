"""Fast random draws for the train step: dropout masks and Gaussian noise.

`jax.random` lowers its threefry hash to a rolled loop on XLA:CPU, which made random draws a fifth of the train
step's time there. Here each element's 32 random bits are a counter-based hash of its index (two rounds of
MurmurHash3's 32-bit finaliser), keyed by two words drawn once per call with `jax.random`. The draws vectorise and
fuse with their consumers, and, being a pure function of the key and the element's global index, they are the same
on any number of devices.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax


def _fmix32(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def random_bits(key, shape) -> jax.Array:
  """uint32 words of `shape` (at most 2**32 elements)."""
  seed = jax.random.bits(key, (2,), jnp.uint32)
  index = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  return _fmix32(_fmix32(index ^ seed[0]) + seed[1])


def uniform(key, shape, dtype=jnp.float32) -> jax.Array:
  """U[0, 1) with 23 random mantissa bits."""
  bits = (random_bits(key, shape) >> 9) | jnp.uint32(0x3F800000)
  return (lax.bitcast_convert_type(bits, jnp.float32) - 1.0).astype(dtype)


def bernoulli(key, p, shape) -> jax.Array:
  """True with probability `p`."""
  return uniform(key, shape) < p


def normal(key, shape, dtype=jnp.float32) -> jax.Array:
  """N(0, 1) by the inverse error function of a uniform draw on (-1, 1), as `jax.random.normal`."""
  u = 2.0 * uniform(key, shape, dtype) - 1.0
  u = jnp.maximum(u, jnp.nextafter(jnp.asarray(-1.0, dtype), jnp.asarray(0.0, dtype)))
  return math.sqrt(2.0) * lax.erf_inv(u)
