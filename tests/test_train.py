"""Whole-loop tests on the embedded CITE starter with the tiny smoke config (4 fake devices)."""

import importlib.util
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jax

from clue_jax import data, parallel, sampler, steps, trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPOCHS = 4


def load_config(name="smoke", **train):
  spec = importlib.util.spec_from_file_location(f"config_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.update(dict(max_epochs=EPOCHS, progress=False, **train))
  return config


def saved_params(workdir, epoch, kind="latest"):
  manager = ocp.CheckpointManager((workdir / "checkpoints" / kind).absolute())
  restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return restored["state"]["params"]


def assert_trees_close(a, b, atol):
  flat_a, flat_b = dict(_flatten(a)), dict(_flatten(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(np.asarray(flat_a[key]), np.asarray(flat_b[key]), atol=atol, rtol=0, err_msg=key)


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def tensorboard_tags(directory):
  """Scalar tags in the tensorboardX event files (TFRecord framing parsed by hand)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in directory.glob("events.out.tfevents.*"):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      offset += 12 + length + 4
  return tags


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  config = load_config()
  summary = trainer.train_and_evaluate(config, workdir)
  return workdir, config, summary


def test_run_directory_is_complete(smoke_run):
  workdir, config, summary = smoke_run
  assert json.loads((workdir / "config.json").read_text()) == json.loads(config.to_json_best_effort())
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
  for record in records:
    for key in ("train/loss_self_rna", "train/loss_kl_adt", "train/loss_joint_cross_rna", "train/loss_real_cross_adt",
                "train/loss_cos", "train/loss_dsc", "train/loss_gen", "val/loss_gen", "val/loss_self_adt",
                "val/heldout_foscttm"):
      assert np.isfinite(record[key]), key
  assert {"train/loss_self_rna", "val/loss_gen", "val/heldout_foscttm"} <= tensorboard_tags(workdir / "tb")
  assert summary["epochs_run"] == EPOCHS

  for name, n_cells in (("rna", 600), ("adt", 600)):
    embedding = ad.read_h5ad(workdir / "embeddings" / f"{name}.h5ad")
    source = ad.read_h5ad(ROOT / "clue_jax" / "datasets" / "bmmc_cite_starter" / f"{name}.h5ad")
    assert embedding.obsm["X_clue"].shape == (n_cells, 2 * config.model.latent_dim)
    assert (embedding.obs_names == source.obs_names).all()
    assert list(embedding.obs.columns) == list(source.obs.columns)
    assert np.isfinite(embedding.obsm["X_clue"]).all()
  joint = ad.read_h5ad(workdir / "embeddings" / "joint.h5ad")
  rna = ad.read_h5ad(workdir / "embeddings" / "rna.h5ad").obsm["X_clue"]
  adt = ad.read_h5ad(workdir / "embeddings" / "adt.h5ad").obsm["X_clue"]
  np.testing.assert_allclose(joint.obsm["X_clue"], (rna + adt) / 2, rtol=1e-6)


def test_checkpoints_keep_latest_and_best(smoke_run):
  workdir, config, summary = smoke_run
  latest = sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir() if p.name.isdigit())
  best = sorted(int(p.name) for p in (workdir / "checkpoints" / "best").iterdir() if p.name.isdigit())
  assert latest == [EPOCHS - 1, EPOCHS]
  assert 1 <= len(best) <= config.train.keep_best and min(best) > config.train.align_burnin
  assert summary["restored_epoch"] == max(best)


def is_pre_batchnorm_bias(key):
  """Biases of hidden Linear layers (Linear -> LeakyReLU -> BatchNorm)."""
  return "HiddenBlock" in key and key.endswith("Linear_0/bias")


def test_same_step_on_one_and_four_devices():
  """A train step on the same batch gives the same losses and parameters on 1 and on 4 devices.

  Exact equality over many steps is not possible with RMSprop: its first update is ~10 lr sign(g), so an entry
  whose exact gradient is 0 (e.g. the bias of a hidden unit whose pre-activations all sit on one side of the
  LeakyReLU, so that BatchNorm cancels it) steps +-0.02 on the sign of its round-off, which depends on the
  summation order. Those entries are few; everything else must agree to 1e-5.
  """
  config = load_config()
  dataset = data.load_dataset(config)
  model = trainer.model_from(config, dataset)
  weights = trainer.loss_weights(config, dataset.names)
  batch_size = config.train.batch_size
  rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng(0), batch_size, True)
  chunk = data.steps_chunk(dataset, rows, 0, 1, batch_size)
  initial = jax.device_get(steps.init_state(model, jax.random.key(0), jax.tree.map(lambda x: x[0], chunk)))
  train_chunk = steps.make_train_chunk(model, weights, True)
  results = {}
  for n_devices in (1, 4):
    mesh = parallel.make_mesh(n_devices)
    state, measured = jax.jit(train_chunk)(parallel.put(initial, parallel.replicated(mesh)),
                                           parallel.put(chunk, parallel.batch_sharding(mesh, 1)),
                                           jax.random.key(1), np.float32(2e-3), np.float32(1.0))
    results[n_devices] = jax.device_get((state.params, state.batch_stats, measured))
  (params_1, stats_1, losses_1), (params_4, stats_4, losses_4) = results[1], results[4]
  for key in losses_1:
    np.testing.assert_allclose(losses_1[key], losses_4[key], rtol=1e-5, err_msg=key)
  flat_1, flat_4 = dict(_flatten(params_1)), dict(_flatten(params_4))
  differ, total = 0, 0
  for key in flat_1:
    diff = np.abs(flat_1[key] - flat_4[key])
    assert diff.max() <= 2 * 10 * 2e-3 * 1.01, key
    if not is_pre_batchnorm_bias(key):
      differ, total = differ + int((diff > 1e-5).sum()), total + diff.size
  assert differ / total < 1e-3, f"{differ} of {total} parameters differ"
  for (key, a), (_, b) in zip(_flatten(stats_1), _flatten(stats_4)):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=key)


def cli(workdir, *flags):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
  for key in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs"):
    env[key.upper()] = str(getattr(jax.config, key))
  command = [sys.executable, "-m", "clue_jax.train", f"--config={ROOT / 'configs' / 'smoke.py'}",
             f"--workdir={workdir}", f"--config.train.max_epochs={EPOCHS}", "--config.train.progress=False", *flags]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_run_resumes_to_the_same_model(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  process = cli(tmp_path)
  first = tmp_path / "checkpoints" / "latest" / "1"
  while not first.exists() and process.poll() is None:
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  killed_at = max(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit())
  assert killed_at < EPOCHS, "the run finished before it could be killed"
  resumed = cli(tmp_path)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err
  assert f"Resuming {tmp_path} from epoch {killed_at}" in out
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
  # Same data order, same keys: the resumed run ends exactly where the uninterrupted one does.
  assert_trees_close(saved_params(tmp_path, EPOCHS), saved_params(workdir, EPOCHS), atol=0)


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
  process = cli(tmp_path, "--config.data.modalities.rna.path=missing.h5ad")
  _, err = process.communicate(timeout=120)
  assert process.returncode == 1
  assert "missing.h5ad: no such file (data.modalities.rna.path)" in err and "Traceback" not in err


def test_workdir_with_another_run_is_refused(smoke_run):
  workdir, _, _ = smoke_run
  with pytest.raises(trainer.TrainingError, match="holds a run with a different config"):
    trainer.train_and_evaluate(load_config(lr=1e-3), workdir)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
  """A diverging run stops naming the epoch, step and loss term, and keeps its last good checkpoint."""
  config = load_config(lr=1e12, checkpoint_interval_s=0.0)
  with pytest.raises(trainer.TrainingError, match=r"non-finite loss in epoch \d+, step \d+ of \d+ .*: \w+="):
    trainer.train_and_evaluate(config, tmp_path)
  latest = tmp_path / "checkpoints" / "latest"
  epochs = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) if latest.exists() else []
  for value in jax.tree.leaves(saved_params(tmp_path, epochs[-1])) if epochs else []:
    assert np.isfinite(np.asarray(value)).all()
