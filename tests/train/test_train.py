"""Whole-loop tests on the embedded CITE starter with the tiny smoke config (4 fake devices)."""

import errno
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pytest

import jax

from clue_jax import api, config as config_lib, outputs
from clue_jax.data import dataset as data_lib, sampler
from clue_jax.train import encoding, errors, parallel, run_dir, steps, trainer
from run_helpers import EPOCHS, ROOT, assert_trees_close, flatten, load_config, saved_params, tensorboard_tags


def test_run_directory_is_complete(smoke_run):
  workdir, config, summary = smoke_run
  assert json.loads((workdir / "config.json").read_text()) == json.loads(config.to_json_best_effort())
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
  for record in records:
    for key in ("train/loss_self_rna", "train/loss_kl_adt", "train/loss_joint_cross_rna", "train/loss_real_cross_adt",
                "train/loss_cos", "train/loss_dsc", "train/loss_gen", "val/loss_gen", "val/loss_self_adt",
                "val/heldout_foscttm", "val/unseen_foscttm"):
      assert np.isfinite(record[key]), key
  assert {"train/loss_self_rna", "val/loss_gen", "val/heldout_foscttm"} <= tensorboard_tags(workdir / "tb")
  assert summary["epochs_run"] == EPOCHS
  assert 0 <= summary["unseen_foscttm"] < 0.5 and 0 <= summary["heldout_foscttm"] < 0.5
  # Both NB library-size heads alive: a positive size for every cell, in both decoders.
  assert summary["library_heads"] == {"rna": {"rna": 1.0, "adt": 1.0}, "adt": {"rna": 1.0, "adt": 1.0}}

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
  dataset = trainer.load_data(config)
  model = run_dir.model_args(config, dataset).build()
  weights = trainer.loss_weights(config, dataset.names)
  batch_size = config.train.batch_size
  rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng(0), batch_size, True)
  chunk = data_lib.steps_chunk(dataset, rows, 0, 1, batch_size)
  initial = jax.device_get(steps.init_state(model, jax.random.key(0)))
  train_chunk = steps.make_train_chunk(model, weights)
  results = {}
  for n_devices in (1, 4):
    mesh = parallel.make_mesh(n_devices)
    state, measured = jax.jit(train_chunk)(parallel.put(initial, parallel.replicated(mesh)),
                                           parallel.put(chunk, parallel.batch_sharding(mesh, 1)), np.int32(1),
                                           jax.random.key(1), np.float32(2e-3), np.float32(1.0))
    results[n_devices] = jax.device_get((state.params, state.batch_stats, measured))
  (params_1, stats_1, losses_1), (params_4, stats_4, losses_4) = results[1], results[4]
  for key in losses_1:
    np.testing.assert_allclose(losses_1[key], losses_4[key], rtol=1e-5, err_msg=key)
  flat_1, flat_4 = dict(flatten(params_1)), dict(flatten(params_4))
  differ, total = 0, 0
  for key in flat_1:
    diff = np.abs(flat_1[key] - flat_4[key])
    assert diff.max() <= 2 * 10 * 2e-3 * 1.01, key
    if not is_pre_batchnorm_bias(key):
      differ, total = differ + int((diff > 1e-5).sum()), total + diff.size
  assert differ / total < 1e-3, f"{differ} of {total} parameters differ"
  for (key, a), (_, b) in zip(flatten(stats_1), flatten(stats_4)):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("matmul_dtype", ["float32", "bfloat16"])
def test_a_non_finite_step_changes_nothing_but_the_step_counter(matmul_dtype):
  """On 4 devices: an infinite anneal noise makes the discriminator loss NaN, and the step keeps every parameter,
  optimiser state and running statistic as it was; the same step with finite noise changes every one of them."""
  config = load_config()
  config.model.matmul_dtype = matmul_dtype
  dataset = trainer.load_data(config)
  model = run_dir.model_args(config, dataset).build()
  rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng(0), config.train.batch_size, True)
  mesh = parallel.make_mesh(4)
  chunk = data_lib.steps_chunk(dataset, rows, 0, 1, config.train.batch_size)
  initial = steps.init_state(model, jax.random.key(0))
  train_chunk = jax.jit(steps.make_train_chunk(model, trainer.loss_weights(config, dataset.names)))
  for noise, finite in ((np.inf, False), (1.0, True)):
    state, measured = train_chunk(parallel.put(initial, parallel.replicated(mesh)),
                                  parallel.put(chunk, parallel.batch_sharding(mesh, 1)), np.int32(1),
                                  jax.random.key(1), np.float32(2e-3), np.float32(noise))
    assert int(state.step) == 1 and bool(measured["finite"][0]) == finite
    for name in ("params", "batch_stats", "opt_vae", "opt_dsc"):
      pairs = zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(initial, name)))
      unchanged = [np.array_equal(new, old) for new, old in pairs]
      assert (not any(unchanged)) if finite else all(unchanged), (noise, name, unchanged)


def cli(workdir, *flags):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
  for key in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs"):
    env[key.upper()] = str(getattr(jax.config, key))
  command = [sys.executable, "-m", "clue_jax.train", f"--config={ROOT / 'configs' / 'smoke.py'}",
             f"--workdir={workdir}", f"--config.train.max_epochs={EPOCHS}", "--config.train.progress=False", *flags]
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def completed_epochs(workdir) -> list:
  latest = workdir / "checkpoints" / "latest"
  return sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) if latest.exists() else []


def run_until_killed(workdir, records: int, delay: float, *flags):
  """Runs the CLI in `workdir` and SIGKILLs it `delay` s after metrics.jsonl holds `records` lines.

  A record is written just before its epoch's checkpoint, so short delays tend to land inside a checkpoint save.
  """
  process = cli(workdir, *flags)
  metrics = workdir / "metrics.jsonl"
  while process.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") < records):
    time.sleep(0.005)
  time.sleep(delay)
  process.send_signal(signal.SIGKILL)
  assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_run_killed_twice_resumes_to_the_same_model(smoke_run, tmp_path, storage):
  """SIGKILL at two seeded random moments, then a resumed run ends bitwise where the uninterrupted one did; also
  with the rows streamed from disk (the store is rebuilt on resumption)."""
  workdir, _, _ = smoke_run
  flags = [f"--config.data.storage={storage}"]
  rng = np.random.default_rng(7)
  first = int(rng.integers(1, EPOCHS - 1))
  for records in (first, int(rng.integers(first + 1, EPOCHS))):
    run_until_killed(tmp_path, records, float(rng.uniform(0.0, 0.3)), *flags)
  kept = completed_epochs(tmp_path)
  resumed = cli(tmp_path, *flags)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err
  if kept:
    assert f"Resuming {tmp_path} from epoch {kept[-1]}" in out
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
  # Same data order, same keys: the resumed run ends exactly where the uninterrupted one does.
  assert_trees_close(saved_params(tmp_path, EPOCHS), saved_params(workdir, EPOCHS), atol=0)


def flip_state_bytes(step_dir):
  """Inverts 64 bytes in the middle of every data file of a checkpoint step's state (Orbax's OCDBT store)."""
  for target in (step_dir / "state").glob("**/d/*"):
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    target.write_bytes(bytes(raw))


def test_damaged_last_checkpoint_falls_back_to_the_previous_one(smoke_run, tmp_path):
  """The last checkpoint damaged, a save cut by a kill and a cut metrics line: the run warns, resumes from the
  checkpoint before, and still ends bitwise where the uninterrupted run did."""
  workdir, config, _ = smoke_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  flip_state_bytes(run / "checkpoints" / "latest" / str(EPOCHS))
  shutil.copytree(run / "checkpoints" / "latest" / str(EPOCHS - 1),
                  run / "checkpoints" / "latest" / f"{EPOCHS + 1}.orbax-checkpoint-tmp")
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 5, "train/lo')
  with pytest.warns(UserWarning, match=rf"latest/{EPOCHS} cannot be read \(ValueError: .*OCDBT.*\); skipped it "
                                       rf"\(moved to .*damaged/latest-{EPOCHS}\)"):
    trainer.train_and_evaluate(config, run)
  assert completed_epochs(run) == [EPOCHS - 1, EPOCHS]
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
  assert_trees_close(saved_params(run, EPOCHS), saved_params(workdir, EPOCHS), atol=0)


def test_a_dead_library_head_is_reported(smoke_run):
  """The smoke run's model with the RNA encoder's library head pushed below zero for every cell (a dead ReLU):
  library_heads reports 0 for it and warns with the fix."""
  workdir, config, _ = smoke_run
  run = api.load(workdir)
  dataset = trainer.load_data(config)  # The same data, split and preprocessing as in training.
  params = jax.tree.map(np.asarray, run.state.params)
  params["encoders_rna"]["library"]["bias"] = np.full_like(params["encoders_rna"]["library"]["bias"], -1e6)
  encoder = encoding.Encoder(run.model, dataset, parallel.make_mesh())
  with pytest.warns(UserWarning, match=r"library-size head of rna's encoder is dead \(a ReLU at 0 for every cell\) "
                                       r"for the decoder of rna and adt.*--config.model.library_activation=softplus"):
    report = trainer.library_heads(encoder, run.state.replace(params=params), dataset)
  assert report == {"rna": {"rna": 0.0, "adt": 0.0}, "adt": {"rna": 1.0, "adt": 1.0}}


def test_every_checkpoint_unreadable_is_a_clear_error(smoke_run, tmp_path):
  workdir, config, _ = smoke_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  for epoch in completed_epochs(run):
    (run / "checkpoints" / "latest" / str(epoch) / "meta" / "metadata").write_text("{cut")
  with pytest.warns(UserWarning), pytest.raises(trainer.TrainingError,
                                                match=r"no checkpoint in .*latest can be read .*pass --overwrite"):
    trainer.train_and_evaluate(config, run)


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
  process = cli(tmp_path, "--config.data.modalities.rna.path=missing.h5ad")
  _, err = process.communicate(timeout=120)
  assert process.returncode == 1
  assert "missing.h5ad: no such file (data.modalities.rna.path)" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, message", [
    ("--config.train.batchsize=3", "error: --config.train.batchsize: no such config key 'batchsize' (did you mean "
                                   "'batch_size'?). Every config key is in clue_jax/config.py"),
    ("--config.train.batch_size=abc", "error: flag --config.train.batch_size=abc: invalid literal for int() with "
                                      "base 10: 'abc'. Every config key, its type and default are in"),
], ids=["unknown_key", "wrong_type"])
def test_cli_reports_bad_config_flags_in_one_line(tmp_path, flag, message):
  process = cli(tmp_path, flag)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 1 and message in err and "Traceback" not in err, err


def test_init_from_starts_from_a_finished_runs_parameters(smoke_run, tmp_path, capsys):
  workdir, _, summary = smoke_run
  epoch = summary["restored_epoch"]
  config = load_config(lr=1e-9)  # Tiny steps: the new run's parameters stay where the finished run's ended.
  config.train.max_epochs = 1
  trainer.train_and_evaluate(config, tmp_path, init_from=workdir)
  assert f"Starting from the parameters of {workdir} (epoch {epoch})." in capsys.readouterr().out
  kind = "best" if (workdir / "checkpoints" / "best" / str(epoch)).exists() else "latest"
  assert_trees_close(saved_params(tmp_path, 1), saved_params(workdir, epoch, kind), atol=1e-6)


def test_init_from_needs_a_finished_run_with_the_same_shapes(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  with pytest.raises(trainer.TrainingError, match=r"--init_from=.*nothing: no finished run there \(no summary.json\)"):
    trainer.train_and_evaluate(load_config(), tmp_path / "a", init_from=tmp_path / "nothing")
  config = load_config()
  config.model.latent_dim = 4
  with pytest.raises(trainer.TrainingError, match=r"--init_from=.*: its model does not fit this config \(params/\S+: "
                                                  r"shape \([\d, ]+\) saved, \([\d, ]+\) in this model: only the "
                                                  r"batch categories may differ"):
    trainer.train_and_evaluate(config, tmp_path / "b", init_from=workdir)


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(pathlib.Path, "write_text", no_space)
  with pytest.raises(outputs.OutputError, match=rf"cannot write {re.escape(str(tmp_path / 'config.json'))}: No space "
                                               rf"left on device. Free disk space"):
    trainer.train_and_evaluate(load_config(), tmp_path)


def test_workdir_with_another_run_is_refused(smoke_run):
  workdir, _, _ = smoke_run
  with pytest.raises(errors.ConfigMismatch, match="holds a run with a different config"):
    trainer.train_and_evaluate(load_config(lr=1e-3), workdir)


def test_a_finished_run_goes_on_when_only_its_epoch_budget_grows(smoke_run, tmp_path, capsys):
  """Raising train.max_epochs on a finished run continues it from its latest checkpoint, to the model of a run that
  had the larger budget from the start; any other change is still refused."""
  workdir = tmp_path / "run"
  trainer.train_and_evaluate(load_config(max_epochs=2), workdir)
  summary = trainer.train_and_evaluate(load_config(), workdir)
  out = capsys.readouterr().out
  assert f"Continuing {workdir} from epoch 2, train.max_epochs 2 -> {EPOCHS}." in out
  for line in (r"clue_jax: rna: read 600 cells x 1,000 features of \S+rna.h5ad in \d+\.\d s",
               r"clue_jax: data read and preprocessed in \d+\.\d s", r"clue_jax: epoch 3 \(its programs compiled",
               r"clue_jax: embeddings encoded and written in \d+\.\d s"):
    assert re.search(line, out), line
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
  continued = [None, None, {"train.max_epochs": [2, EPOCHS]}] + [None] * (EPOCHS - 3)
  assert [r.get("continued") for r in records] == continued
  assert summary["epochs_run"] == EPOCHS and summary["plan"]["max_epochs"] == EPOCHS
  assert summary["continued"] == {"from_epoch": 2, "changes": {"train.max_epochs": [2, EPOCHS]}}
  assert json.loads((workdir / "config.json").read_text())["train"]["max_epochs"] == EPOCHS
  assert_trees_close(saved_params(workdir, EPOCHS), saved_params(smoke_run[0], EPOCHS), atol=0)
  with pytest.raises(trainer.TrainingError, match="different config.*only train.max_epochs, train.patience"):
    trainer.train_and_evaluate(load_config(lr=1e-3, max_epochs=EPOCHS + 1), workdir)


def test_runs_saved_before_a_config_key_existed_still_resume():
  """A saved config without a key added later matches while the key holds its default, and only then."""
  current = load_config().to_dict()
  older = json.loads(json.dumps(current))
  del older["model"]["matmul_dtype"], older["data"]["modalities"]["rna"]["weight"]
  assert config_lib.same_config(older, current)
  for key, value in (("model", {"matmul_dtype": "bfloat16"}), ("train", {"lr": 1e-3})):
    changed = json.loads(json.dumps(current))
    changed[key].update(value)
    assert not config_lib.same_config(older, changed)
  assert not config_lib.same_config(current, older)  # A key the current config lacks is a different config.


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
  """A diverging run stops naming the epoch, step and loss term, and keeps its last good checkpoint."""
  config = load_config(lr=1e12, checkpoint_interval_s=0.0)
  with pytest.raises(trainer.TrainingError, match=r"non-finite loss in epoch \d+, step \d+ of \d+ .*: \w+="):
    trainer.train_and_evaluate(config, tmp_path)
  latest = tmp_path / "checkpoints" / "latest"
  epochs = sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) if latest.exists() else []
  for value in jax.tree.leaves(saved_params(tmp_path, epochs[-1])) if epochs else []:
    assert np.isfinite(np.asarray(value)).all()


def test_non_finite_loss_names_the_last_good_checkpoint(smoke_run, tmp_path, monkeypatch):
  """A non-finite step after a checkpoint: the message names the epoch, step, term and that checkpoint."""
  workdir, config, _ = smoke_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  shutil.rmtree(run / "checkpoints" / "latest" / str(EPOCHS))  # Resume from EPOCHS - 1, run epoch EPOCHS again.
  measured = trainer.per_step_values

  def third_step_not_finite(measurements):
    values = measured(measurements)
    values["finite"][2], values["gen"][2] = 0, np.nan
    return values

  monkeypatch.setattr(trainer, "per_step_values", third_step_not_finite)
  latest = re.escape(str(run / "checkpoints" / "latest"))
  with pytest.raises(trainer.TrainingError, match=rf"non-finite loss in epoch {EPOCHS}, step 3 of \d+ \(global step "
                                                  rf"\d+\): gen=nan\. .* the last good checkpoint is epoch "
                                                  rf"{EPOCHS - 1} in {latest}\. Lower train.lr"):
    trainer.train_and_evaluate(config, run)
