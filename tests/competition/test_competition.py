"""The competition recipe on the embedded starters' task files: stage files, both stages, official-format outputs."""

import pathlib

import anndata as ad
import numpy as np
import pytest

from clue_jax import api, config as config_lib
from clue_jax.competition import __main__ as cli, recipe, task_data, task_files as cf
from clue_jax.evaluate import metrics
from clue_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[2]


def starter_recipe(technology):
  module = config_lib.load_module(ROOT / "configs" / "competition" / f"{technology}.py")
  return module.get_config(), module.get_competition()


def test_stage_files_pair_training_cells_through_the_solution_and_leave_test_cells_unpaired(tmp_path):
  _, comp = starter_recipe("multiome")
  files = task_data.stage_files(comp.match_modality, ("rna", "atac"), tmp_path)
  task = task_data.read_task(comp.match_modality)
  partner = np.asarray(task["train_sol"].X.argmax(axis=1)).ravel()
  pretrain = {n: ad.read_h5ad(p) for n, p in files["pretrain"].items()}
  assert (pretrain["rna"].obs_names == pretrain["atac"].obs_names).all()
  np.testing.assert_array_equal(pretrain["atac"].layers["counts"].toarray(),
                                task["train_mod2"].layers["counts"][partner].toarray())
  # The Multiome ATAC files have no batch column: training cells take their partner's, test cells the test batch.
  assert (pretrain["atac"].obs["batch"] == "s1d1").all()
  finetune = {n: ad.read_h5ad(p) for n, p in files["finetune"].items()}
  test_ids = {n: [i for i in a.obs_names if i.startswith("test-")] for n, a in finetune.items()}
  assert len(test_ids["rna"]) == task["test_mod1"].n_obs and not set(test_ids["rna"]) & set(test_ids["atac"])
  assert set(finetune["atac"].obs["batch"]) == {"s1d1", "s1d2"}


def test_official_baselines_are_on_the_metrics_scale():
  """The Multiome starter's match file holds 1000 x the baseline's probability (as EvalAI displayed it)."""
  prefixes = {t: starter_recipe(t)[1].match_modality for t in ("cite", "multiome")}
  stored = cf.read_scores(task_data.task_path(prefixes["multiome"], "scores"))["match_probability"]
  assert stored > 1.0
  assert recipe.official(prefixes["multiome"])["match_probability"] == pytest.approx(stored / 1000.0)
  cite = recipe.official(prefixes["cite"])["match_probability"]
  assert 0.0 < cite < 1.0
  assert cite == cf.read_scores(task_data.task_path(prefixes["cite"], "scores"))["match_probability"]


def test_a_missing_task_file_names_the_file(tmp_path):
  with pytest.raises(task_data.TaskFileError, match=rf"{tmp_path}/x.train_mod1.h5ad: no such task file"):
    task_data.read_task(str(tmp_path / "x"))


def test_set_overrides_competition_settings_with_their_types_and_names_a_wrong_key():
  _, comp = starter_recipe("cite")
  pairs = ["ensemble.seeds=3", "ensemble.pretrained=true", "match.method=sinkhorn", "match.epsilon=0.02"]
  changed = config_lib.apply_overrides(comp, cli.parse_settings(pairs))
  assert (changed.ensemble.seeds, changed.ensemble.pretrained) == (3, True)
  assert (changed.match.method, changed.match.epsilon, changed.match.k) == ("sinkhorn", 0.02, 1)
  assert (comp.ensemble.seeds, comp.match.method) == (1, "snn")  # The settings given are not changed.
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'ensemble.seed'.*ensemble.seeds"):
    config_lib.apply_overrides(comp, cli.parse_settings(["ensemble.seed=3"]))
  with pytest.raises(config_lib.ConfigError, match=r"ensemble.seeds='three' has type str; expected int"):
    config_lib.apply_overrides(comp, cli.parse_settings(["ensemble.seeds=three"]))
  with pytest.raises(config_lib.ConfigError, match=r"write KEY=VALUE"):
    cli.parse_settings(["ensemble.seeds"])


def test_both_stages_then_official_format_predictions_and_every_score(tmp_path):
  config, comp = starter_recipe("cite")
  # Tiny sizes and one epoch per stage: the recipe's plumbing, not its quality.
  config.model.update(latent_dim=4, encoder_width=16, decoder_width=16, discriminator_width=16)
  config.train.update(max_epochs=1, progress=False)
  config.evals.plots = False
  comp.finetune.train.max_epochs = 1
  scores = recipe.run(config, comp, tmp_path)

  fitted = api.load(tmp_path / "finetune")
  assert fitted.batch_categories("rna") == ("s1d1", "s1d2")  # The unseen test batch was added.
  assert set(scores["match_modality"]) == {"GEX2ADT", "ADT2GEX"}
  assert set(scores["predict_modality"]) == {"GEX2ADT", "ADT2GEX"}
  assert 0.0 <= scores["joint_embedding"]["arithmetic_mean"] <= 1.0

  solution = cf.read_matrix(task_data.task_path(comp.match_modality, "test_sol"))
  prediction = cf.read_anndata(tmp_path / "match_modality" / "prediction.h5ad")
  metrics.check_match_prediction(prediction.X, solution.shape[0])
  assert prediction.uns["dataset_id"] == "openproblems_bmmc_cite_starter_MM_gex2adt"
  assert prediction.uns["method_id"] == "clue_jax"
  np.testing.assert_allclose(np.asarray(prediction.X.sum(axis=1)).ravel(), 1.0, rtol=1e-6)
  assert scores["match_modality"]["GEX2ADT"]["match_probability"] == pytest.approx(
      metrics.match_probability(prediction.X, solution))
  predicted = cf.read_anndata(tmp_path / "predict_modality" / "prediction.h5ad")
  truth = cf.read_anndata(task_data.task_path(comp.predict_modality, "test_mod2"))
  assert predicted.shape == truth.shape and (predicted.var_names == truth.var_names).all()
  assert scores["predict_modality"]["GEX2ADT"]["rmse"] == pytest.approx(metrics.rmse(predicted.X, truth.X))

  # Finished stages are not trained again.
  (tmp_path / "scores.json").unlink()
  before = (tmp_path / "finetune" / "summary.json").stat().st_mtime_ns
  assert recipe.run(config, comp, tmp_path)["match_modality"] == scores["match_modality"]
  assert (tmp_path / "finetune" / "summary.json").stat().st_mtime_ns == before

  # An ensemble of two seeds with their pretrained runs: only the second seed is trained; its four runs match.
  comp.ensemble.update(seeds=2, pretrained=True)
  ensembled = recipe.run(config, comp, tmp_path)
  member = tmp_path / "members" / f"seed_{config.seed + 1}"
  assert ensembled["ensemble"] == [str(d / s) for s in ("finetune", "pretrain") for d in (tmp_path, member)]
  assert (tmp_path / "finetune" / "summary.json").stat().st_mtime_ns == before
  assert api.load(member / "pretrain").config.seed == config.seed + 1
  ensemble = api.Ensemble([api.load(d) for d in ensembled["ensemble"]])
  test, _ = task_data.test_cells(comp.match_modality, ("rna", "adt"))
  matched = ensemble.match(test["rna"], "rna", test["adt"], "adt", batch_key="batch", **comp.match)
  assert ensembled["match_modality"]["GEX2ADT"]["match_probability"] == pytest.approx(
      metrics.match_probability(matched.matrix, solution))
  comp.ensemble.update(seeds=1, pretrained=False)
  config.seed += 1
  with pytest.raises(trainer.TrainingError, match=r"pretrain holds a finished run with a different config"):
    recipe.run(config, comp, tmp_path)
