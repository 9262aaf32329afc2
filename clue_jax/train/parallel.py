"""The one sharding story: a 1-D mesh with axis "data"; state replicated, batches split on their batch axis.

Under `jax.jit` with these shardings, BatchNorm statistics and losses are global over the batch and random draws
depend only on the key and each element's global index (`model/rng.py`), so 1, 2, 4, ... devices train the same model.

Multi-host: `initialize` joins the processes of a run through JAX's own distributed runtime (`jax.distributed`);
the mesh then spans the devices of every process. Every process runs the same program on the same files, so it
knows every global batch; it reads and densifies only `process_rows` of each (the rows its own devices hold) and
`put_local` assembles the global array from those shares. With one process every function here is the plain
single-process call (`jax.device_put`, `jax.device_get`), so nothing changes there.
"""

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, Sharding

from clue_jax.config import ConfigError

AXIS = "data"


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None):
  """Joins a multi-process run (`jax.distributed.initialize`); call before anything else touches JAX devices.

  Arguments left None are auto-detected by JAX where it can (JAX_COORDINATOR_ADDRESS, Slurm, Open MPI, Cloud TPU).
  CPU collectives go through gloo (TCP), so that CPU processes, e.g. on one machine in tests, can stand in for hosts.

  On CPU the persistent compilation cache is switched off: there its keys include a per-process topology fingerprint
  and only process 0 writes, so with a warm cache process 0 loads each program at once while the others compile it,
  and gloo fails a collective whose peers arrive more than 30 s apart ("Gloo context initialization failed").
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  if jax.process_count() > 1 and jax.default_backend() == "cpu":
    jax.config.update("jax_enable_compilation_cache", False)


def slurm_step_tasks(environ) -> int:
  """The number of tasks of the SLURM `srun` step that a process with environment `environ` belongs to; 1 outside
  a step. A batch script's own process has its allocation's SLURM_NTASKS but no step variables, so it counts 1.
  In a step of several tasks, `initialize()` without arguments joins them (JAX reads SLURM_STEP_NODELIST,
  SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID; the coordinator is the step's first node)."""
  if "SLURM_STEP_NODELIST" not in environ:
    return 1
  value = environ.get("SLURM_STEP_NUM_TASKS", "1")
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"SLURM_STEP_NUM_TASKS={value!r} is not an integer") from None


def use_compilation_cache(directory: str):
  """Turns JAX's persistent compilation cache on in `directory` ("auto": a per-user cache directory; "": off).

  Left as it is when a cache directory is already set (by the user, a test, or a run before in this process) or the
  cache was switched off (`initialize` on CPU).
  """
  if not directory or jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
    return
  if directory == "auto":
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(root, "clue_jax", "jit")
  jax.config.update("jax_compilation_cache_dir", directory)


def is_main_process() -> bool:
  """True in the process that writes the run's files (process 0; the only one without jax.distributed)."""
  return jax.process_index() == 0


def describe() -> str:
  """The processes and devices this run trains on, in words."""
  return f"{jax.process_count()} processes, {jax.device_count()} {jax.default_backend()} devices in all"


def make_mesh(num_devices: int = 0) -> Mesh:
  devices = jax.devices()
  if num_devices and jax.process_count() > 1 and num_devices != len(devices):
    raise ConfigError(f"train.num_devices={num_devices} is not allowed with {jax.process_count()} processes: a "
                      f"multi-process run uses every device of every process; use 0 (all, here {len(devices)})")
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


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a global batch of `batch_size` that this process's devices hold (all of them with one process)."""
  held = [index[0] for index in batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()]
  start, stop = min(s.start or 0 for s in held), max(s.stop or batch_size for s in held)
  if sum((s.stop or batch_size) - (s.start or 0) for s in held) != stop - start:
    raise RuntimeError("this process's devices do not hold one contiguous part of the batch; order the mesh's "
                       "devices by process")
  return slice(start, stop)


def put(tree, sharding):
  """Global host arrays (the same in every process) -> global device arrays with the given sharding.

  `sharding` is one sharding or a tree of them that is a prefix of `tree`, as for `jax.device_put`. With several
  processes each one copies only the parts its own devices hold (and JAX's cross-process equality check of
  `jax.device_put` is skipped).
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  if isinstance(sharding, Sharding):
    return jax.tree.map(lambda x: _global(x, sharding), tree)
  return jax.tree.map(lambda s, subtree: jax.tree.map(lambda x: _global(x, s), subtree), sharding, tree)


def _global(x, sharding: Sharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(_global(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_local(tree, sharding: NamedSharding):
  """This process's share (`process_rows` of the sharded axis) of host arrays -> global device arrays.

  With one process the share is everything and this is `jax.device_put`.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def fetch(tree):
  """Device arrays -> host numpy arrays, in every process: replicated ones from a local copy, sharded ones gathered
  from all processes (a collective: every process must call it). With one process this is `jax.device_get`."""
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def one(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def agree(value):
  """Process 0's `value` in every process (for host decisions that all processes must take alike, e.g. from the
  clock); `value` itself with one process."""
  if jax.process_count() == 1:
    return value
  return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def barrier(name: str):
  """Waits until every process gets here (after process 0 changed files the others will read); no-op alone."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
