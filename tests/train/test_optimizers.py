"""train.optimizer, train.warmup_epochs and train.monitor=unseen_foscttm: first steps, and the keys in whole runs."""

import json

import jax
import numpy as np
import pytest

from clue_jax import api, config as config_lib
from clue_jax.data import dataset as data_lib, sampler
from clue_jax.train import run_dir, steps, trainer
from run_helpers import load_config

LR = 1e-3


@pytest.fixture(scope="module")
def first_step():
  """{optimizer: (initial params, params after one step)} on the same smoke minibatch."""
  config = load_config()
  dataset = trainer.load_data(config)
  model = run_dir.model_args(config, dataset).build()
  weights = trainer.loss_weights(config, dataset.names)
  rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng(0), config.train.batch_size, True)
  chunk = data_lib.steps_chunk(dataset, rows, 0, 1, config.train.batch_size)
  out = {}
  for name in config_lib.OPTIMIZERS:
    initial = steps.init_state(model, jax.random.key(0), name)
    train_chunk = jax.jit(steps.make_train_chunk(model, weights, name))
    state, measured = train_chunk(initial, chunk, np.int32(1), jax.random.key(1), np.float32(LR), np.float32(1.0))
    assert bool(measured["finite"][0])
    out[name] = jax.device_get((initial.params, state.params))
  return out


def steps_taken(first_step, name):
  before, after = first_step[name]
  return [(np.asarray(b), np.asarray(a) - np.asarray(b)) for b, a in zip(jax.tree.leaves(before),
                                                                         jax.tree.leaves(after))]


def test_every_configurable_optimizer_has_an_update_rule():
  assert set(steps.UPDATE_RULES) == set(config_lib.OPTIMIZERS)
  config = load_config()
  config.train.optimizer = "sgd"
  with pytest.raises(config_lib.ConfigError, match=r"train.optimizer='sgd' is not allowed"):
    config_lib.validate(config)


def test_rmsprop_and_adam_first_steps_have_their_sizes(first_step):
  # RMSprop (decay 0.99) first moves an entry by lr g / sqrt(0.01 g^2) = 10 lr; Adam (bias-corrected) by lr.
  for name, size in (("rmsprop", 10 * LR), ("adam", LR)):
    largest = max(np.abs(d).max() for _, d in steps_taken(first_step, name))
    assert largest == pytest.approx(size, rel=1e-3), name


def test_lamb_scales_each_layers_step_to_its_weight_norm(first_step):
  scaled = 0
  for before, delta in steps_taken(first_step, "lamb"):
    if np.linalg.norm(before) > 0 and np.linalg.norm(delta) > 0:
      assert np.linalg.norm(delta) == pytest.approx(LR * np.linalg.norm(before), rel=1e-3)
      scaled += 1
  assert scaled > 10  # Kernels and BatchNorm scales of every network.


def test_warmup_and_another_optimizer_in_a_whole_run(tmp_path):
  config = load_config()
  config.train.update(optimizer="lamb", warmup_epochs=2, max_epochs=3, progress=False)
  summary = trainer.train_and_evaluate(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["lr"] for r in records] == pytest.approx([config.train.lr / 3, 2 * config.train.lr / 3, config.train.lr])
  run = api.load(tmp_path)  # Restores the LAMB optimiser states the run saved.
  assert run.epoch == summary["restored_epoch"]


def test_the_unseen_monitor_keeps_the_epoch_whose_unseen_cells_match_best(tmp_path):
  config = load_config()
  config.train.update(monitor="unseen_foscttm", keep_best=1, patience=0, max_epochs=4, progress=False)
  summary = trainer.train_and_evaluate(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  after_burnin = [r for r in records if r["epoch"] > config.train.align_burnin]
  best = min(after_burnin, key=lambda r: r["val/unseen_foscttm"])
  assert summary["restored_epoch"] == best["epoch"]
  assert summary["unseen_foscttm"] == pytest.approx(best["val/unseen_foscttm"], abs=1e-6)
