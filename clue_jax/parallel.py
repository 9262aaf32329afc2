"""The one sharding story: a 1-D mesh with axis "data"; state replicated, batches split on their batch axis.

Under `jax.jit` with these shardings, BatchNorm statistics and losses are global over the batch and random draws
depend only on the key and each element's global index (`rng.py`), so 1, 2, 4, ... devices train the same model.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clue_jax.config import ConfigError

AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"train.num_devices={num_devices} is not allowed: only {len(devices)} devices are visible; "
                        f"use 0 (all) or at most {len(devices)}")
    devices = devices[:num_devices]
  return Mesh(np.array(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Splits the given axis over the devices (axis 1 for chunks of shape (steps, batch, ...))."""
  return NamedSharding(mesh, P(*([None] * batch_axis), AXIS))


def check_batch_size(batch_size: int, mesh: Mesh):
  n = mesh.devices.size
  if batch_size % n:
    raise ConfigError(f"train.batch_size={batch_size} is not allowed: it must be divisible by the {n} devices; use a "
                      f"multiple of {n}, e.g. {max(n, batch_size // n * n)}")


def put(tree, sharding: NamedSharding):
  """Host arrays -> global device arrays with the given sharding."""
  return jax.device_put(tree, sharding)
