"""Training data on the devices: the gathered minibatches and the trained state equal the host path's, the hot loop
copies nothing between host and devices, and the chunk compiles once."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from clue_jax import batch as batch_lib
from clue_jax.data import dataset as data_lib, device_data, sampler
from clue_jax.train import parallel, run_dir, steps, trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]
BATCH = 64


@pytest.fixture(scope="module")
def setup():
  spec = importlib.util.spec_from_file_location("config_smoke", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  dataset = trainer.load_data(config)
  mesh = parallel.make_mesh(4)
  rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng(0), BATCH, drop_last=True)
  return config, dataset, mesh, rows


def test_the_devices_hold_the_counts_at_their_csr_size(setup):
  """Counts on the devices cost their non-zeros (not the longest cell's number for every cell)."""
  _, dataset, _, _ = setup
  arrays = device_data.host_arrays(dataset)
  for name, m in dataset.modalities.items():
    assert arrays[name]["values"].shape == arrays[name]["indices"].shape == (m.counts.nnz,)
    assert arrays[name]["indptr"].shape == (m.counts.shape[0] + 1,)
    longest = device_data.widths(dataset)[name][1]
    assert longest == np.diff(m.counts.indptr).max() and m.counts.nnz < m.counts.shape[0] * longest


def test_gathered_minibatch_equals_host_minibatch(setup):
  _, dataset, _, rows = setup
  indices, count = device_data.epoch_chunks(rows, 2, BATCH, 2)[0]
  assert count == 2
  arrays = device_data.host_arrays(dataset)
  for step in range(2):
    gathered = device_data.gather(arrays, jax.tree.map(lambda a: a[step], indices), device_data.widths(dataset))
    host = data_lib.steps_chunk(dataset, rows, step, 1, BATCH)
    jax.tree.map(lambda g, h: np.testing.assert_array_equal(np.asarray(g), h[0]), gathered, host)


def test_device_chunk_trains_like_the_host_chunk_without_transfers_or_recompiles(setup):
  """Over an epoch whose last chunk is short (padded, its steps counted): the same parameters bitwise, and one
  compiled program for every chunk of either path."""
  config, dataset, mesh, rows = setup
  model = run_dir.model_args(config, dataset).build()
  weights = trainer.loss_weights(config, dataset.names)
  per = config.train.steps_per_dispatch
  n_steps = 2 * per + 1
  chunk_sharding = parallel.batch_sharding(mesh, 1)
  init = jax.jit(lambda k: steps.init_state(model, k), out_shardings=parallel.replicated(mesh))
  key, lr, noise = jax.random.key(1), np.float32(2e-3), np.float32(0.5)

  host_chunk = jax.jit(steps.make_train_chunk(model, weights))
  host_state = init(jax.random.key(0))
  for first in range(0, n_steps, per):
    count = min(per, n_steps - first)
    batches = batch_lib.padded_steps(data_lib.steps_chunk(dataset, rows, first, count, BATCH), per)
    host_state, _ = host_chunk(host_state, parallel.put(batches, chunk_sharding), np.int32(count), key, lr, noise)
  assert host_chunk._cache_size() == 1

  device_chunk = jax.jit(steps.make_device_train_chunk(model, weights, device_data.widths(dataset)))
  arrays = parallel.put(device_data.host_arrays(dataset), parallel.replicated(mesh))
  chunks, counts = zip(*device_data.epoch_chunks(rows, n_steps, BATCH, per))
  assert counts == (per, per, 1)
  chunks, counts = parallel.put((list(chunks), [np.int32(c) for c in counts]),
                                (chunk_sharding, parallel.replicated(mesh)))
  scalars = jax.device_put((key, lr, noise), parallel.replicated(mesh))
  state = init(jax.random.key(0))
  state, _ = device_chunk(state, arrays, chunks[0], counts[0], *scalars)
  with jax.transfer_guard("disallow"):
    for chunk, count in zip(chunks[1:], counts[1:]):
      state, measured = device_chunk(state, arrays, chunk, count, *scalars)
  assert device_chunk._cache_size() == 1
  assert np.asarray(measured["finite"]).tolist() == [1.0] + [0.0] * (per - 1)  # One real step in the last chunk.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.params,
               host_state.params)
