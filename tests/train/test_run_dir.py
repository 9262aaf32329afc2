"""The run directory (`train/run_dir.py`): a model is rebuilt from its saved constructor arguments, and a run
written by an older clue_jax (tests/fixtures/run_f495932, see tests/fixtures/README.md) still loads, encodes as it
did, and resumes."""

import json
import shutil

import anndata as ad
import jax
import numpy as np
import pytest

from clue_jax import api
from clue_jax.evaluate import run_outputs
from clue_jax.model import network
from clue_jax.train import checkpoint, run_dir, steps, trainer
from run_helpers import ROOT, assert_trees_close, load_config

FIXTURE = ROOT / "tests" / "fixtures" / "run_f495932"
STARTER = ROOT / "clue_jax" / "datasets" / "bmmc_cite_starter"


@pytest.fixture
def old_run(tmp_path, monkeypatch):
  """A copy of the fixture run; its config names the embedded data relative to the repository root."""
  monkeypatch.chdir(ROOT)
  workdir = tmp_path / "old"
  shutil.copytree(FIXTURE, workdir)
  return workdir


def encodes_as_saved(run, workdir, name, atol):
  saved = ad.read_h5ad(workdir / "embeddings" / f"{name}.h5ad")
  cells = ad.read_h5ad(STARTER / f"{name}.h5ad")[saved.obs_names]
  np.testing.assert_allclose(run.encode(cells, name).obsm["X_clue"], saved.obsm["X_clue"], atol=atol)


def test_a_run_written_before_run_meta_loads_and_encodes_as_it_did(old_run):
  run = api.load(old_run)
  assert run.epoch == 2 and run.modalities == ("rna", "adt")
  for name in run.modalities:
    encodes_as_saved(run, old_run, name, atol=1e-5)
  finished = run_dir.finished(old_run)
  finished.close()
  meta = finished.saved.meta
  assert meta.model == run_dir.ModelArgs.from_json(meta.model.to_json())  # Read once the old way, then saved.
  assert run_dir.RunMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta


def test_a_run_written_before_run_meta_resumes_and_keeps_its_held_out_cells(old_run, capsys):
  replayed = run_outputs.load(old_run).heldout_ids  # No cells.json: the seeded draw of that version, replayed.
  assert len(replayed) == 60
  config = load_config()  # Keys added since that version keep their defaults, as in the user's config file.
  config.update(json.loads((old_run / "config.json").read_text()))
  config.train.max_epochs = 3
  summary = trainer.train_and_evaluate(config, old_run)
  assert f"Continuing {old_run} from epoch 2, train.max_epochs 2 -> 3." in capsys.readouterr().out
  assert summary["epochs_run"] == 3
  assert json.loads((old_run / "cells.json").read_text())["heldout_pairs"] == replayed
  assert run_outputs.load(old_run).heldout_ids == replayed
  assert api.load(old_run).epoch == summary["restored_epoch"]


def test_renaming_a_layer_does_not_break_loading(tmp_path, monkeypatch):
  """Flax names layers after their classes: a run saved with `Linear` renamed (as the trainer saves its epochs) loads
  with the same parameters, since the model is rebuilt from its saved constructor arguments, not from the names."""
  class Dense(network.Linear):
    pass

  monkeypatch.setattr(network, "Linear", Dense)
  config = load_config()
  dataset = trainer.load_data(config)
  args = run_dir.model_args(config, dataset)
  state = steps.init_state(args.build(), jax.random.key(0))
  ckpts = checkpoint.Checkpoints(tmp_path / "checkpoints", config.train.keep_best)
  ckpts.save(1, state, {}, run_dir.preprocess_tree(dataset), run_dir.run_meta(config, dataset, args).to_json())
  ckpts.close()
  (tmp_path / run_dir.CONFIG).write_text(config.to_json())
  (tmp_path / run_dir.SUMMARY).write_text(json.dumps({"restored_epoch": 1}))
  run = api.load(tmp_path)
  assert "Dense_0" in run.state.params["encoders_adt"]["subspaces"]["HiddenBlock_0"]
  assert_trees_close(jax.device_get(run.state.params), jax.device_get(state.params), atol=0)
