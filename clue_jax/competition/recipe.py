"""The NeurIPS 2021 competition recipe (docs/method.md §3.5): the task files staged, pretraining, fine-tuning, and the
three tasks scored by the official metrics; `python -m clue_jax.competition` runs it."""

import json
import pathlib

import anndata as ad
import ml_collections
import numpy as np
import pandas as pd
import scipy.sparse as sp

from clue_jax import api, config as config_lib, outputs
from clue_jax.competition import task_data, task_files
from clue_jax.data import dataset as data_lib
from clue_jax.evaluate import embedding_metrics, metrics, run_report
from clue_jax.train import trainer
from clue_jax.train.errors import ConfigMismatch


# The competition's normalised scales of each feature type: what predict-modality scores compare against.
SCALES = {"GEX": "log1p", "ADT": "clr", "ATAC": "binary"}
METHOD_ID = "clue_jax"


def starter_settings(technology: str) -> ml_collections.ConfigDict:
  """The competition settings on an embedded starter's task files ("cite" or "multiome"): its three tasks, the
  competition's fine-tuning (lr 1e-3, no burn-in, at most 50 epochs, patience 8, LR patience 3), SNN k = 1 (or
  Sinkhorn at `epsilon`), and matching with the one fine-tuned run (`ensemble`: see `match_ensemble`)."""
  def prefix(task):
    return str(task_files.starter_file(technology, task, "x")).removesuffix(".x.h5ad")

  return ml_collections.ConfigDict({
      **{task: prefix(task) for task in task_files.TASKS},
      # Overrides of the training config for fine-tuning.
      "finetune": {"train": {"lr": 1e-3, "align_burnin": 0, "max_epochs": 50, "patience": 8,
                             "reduce_lr_patience": 3}},
      "match": {"method": "snn", "k": 1, "epsilon": 0.01},
      "ensemble": {"seeds": 1, "pretrained": False},
  })


def stage_configs(config: ml_collections.ConfigDict, competition: ml_collections.ConfigDict, files: dict) -> dict:
  """{"pretrain": config, "finetune": config}: `config` on each stage's files; fine-tuning with its overrides."""
  out = {}
  for stage in ("pretrain", "finetune"):
    overrides = {f"data.modalities.{name}.path": str(path) for name, path in files[stage].items()}
    overrides |= {f"data.modalities.{name}.batch_key": "batch" for name in files[stage]}
    if stage == "finetune":
      overrides |= dict(config_lib.leaves(competition.finetune))
    out[stage] = config_lib.apply_overrides(config, overrides)
  return out


def train_stage(config, workdir: pathlib.Path, init_from=None) -> dict:
  """Trains one stage unless it finished with the same config; returns the summary."""
  summary, saved = workdir / "summary.json", workdir / "config.json"
  if summary.is_file() and saved.is_file():
    if not config_lib.same_config(json.loads(saved.read_text()), config.to_dict()):
      raise ConfigMismatch(workdir, f"{workdir} holds a finished run with a different config (see {saved}); use a "
                                    f"new --workdir")
    return json.loads(summary.read_text())
  return trainer.train_and_evaluate(config, workdir, init_from=init_from)


def run(config: ml_collections.ConfigDict, competition: ml_collections.ConfigDict, workdir) -> dict:
  """All stages (see the module docstring); returns and writes the scores."""
  workdir = pathlib.Path(workdir)
  names = data_lib.modality_order(config.data)
  if len(names) != 2:
    raise config_lib.ConfigError(f"data.modality_order={config.data.modality_order!r}: the competition tasks have "
                                 f"two modalities, mod1 then mod2")
  files = task_data.stage_files(competition.match_modality, names, workdir / "data")
  members = ensemble_members(config, competition, workdir)
  summaries = {}
  for member_config, member_dir in members:
    configs = stage_configs(member_config, competition, files)
    summaries[member_dir] = {"pretrain": train_stage(configs["pretrain"], member_dir / "pretrain")}
    summaries[member_dir]["finetune"] = train_stage(configs["finetune"], member_dir / "finetune",
                                                    init_from=member_dir / "pretrain")
  fitted = api.load(workdir / "finetune")
  matcher = match_ensemble(fitted, [d for _, d in members], competition)
  scores = {"epochs": {stage: s["restored_epoch"] for stage, s in summaries[workdir].items()},
            "match_modality": match_modality(matcher, names, competition, workdir)}
  if isinstance(matcher, api.Ensemble):
    scores["ensemble"] = [str(r.workdir) for r in matcher.runs]
  if competition.predict_modality:
    scores["predict_modality"] = predict_modality(fitted, names, competition.predict_modality, workdir)
  if competition.joint_embedding:
    scores["joint_embedding"] = joint_embedding(fitted, names, competition.joint_embedding, workdir)
  scores = run_report.json_ready(scores)
  outputs.write_atomically(workdir / "scores.json", lambda p: p.write_text(json.dumps(scores, indent=2)))
  return scores


def ensemble_members(config, competition, workdir: pathlib.Path) -> list:
  """[(config, directory)] of the runs to train: `config` in `workdir`, and for `ensemble.seeds` = n > 1 the same
  config with seeds config.seed + 1 ... + n - 1 in WORKDIR/members/seed_<seed>."""
  seeds = int(competition.get("ensemble", {}).get("seeds", 1))
  if seeds < 1:
    raise config_lib.ConfigError(f"ensemble.seeds={seeds}: match with at least one run (1 is the reference's recipe)")
  out = [(config, workdir)]
  for offset in range(1, seeds):
    seed = config.seed + offset
    out.append((config_lib.apply_overrides(config, {"seed": seed}), workdir / "members" / f"seed_{seed}"))
  return out


def match_ensemble(fitted: api.Run, member_dirs: list, competition):
  """What matches the test cells: the fine-tuned run alone (the reference's recipe), or an `api.Ensemble` of every
  member's fine-tuned run and, with `ensemble.pretrained`, the pretrained runs they started from (which saw no test
  cell)."""
  with_pretrained = bool(competition.get("ensemble", {}).get("pretrained", False))
  if len(member_dirs) == 1 and not with_pretrained:
    return fitted
  runs = [fitted] + [api.load(d / "finetune") for d in member_dirs[1:]]
  if with_pretrained:
    runs += [api.load(d / "pretrain") for d in member_dirs]
  return api.Ensemble(runs)


def subtask(types: tuple[str, str]) -> str:
  return f"{types[0]}2{types[1]}"


def official(prefix: str) -> dict:
  """The baseline's official scores shipped next to the task files ({} when absent), on the metrics' own scale."""
  path = task_data.task_path(prefix, "scores")
  scores = task_files.read_scores(path) if path.is_file() else {}
  if scores.get("match_probability", 0.0) > 1.0:  # The Multiome starter's file holds 1000 x the score (EvalAI display).
    scores["match_probability"] /= 1000.0
  return scores


def write_prediction(path: pathlib.Path, matrix, obs_names, var_names, dataset_id: str):
  """A prediction file in the official format: X, obs / var names, uns dataset_id and method_id."""
  path.parent.mkdir(parents=True, exist_ok=True)
  prediction = ad.AnnData(X=matrix, obs=pd.DataFrame(index=pd.Index(obs_names, dtype=str)),
                          var=pd.DataFrame(index=pd.Index(var_names, dtype=str)))
  prediction.uns["dataset_id"] = dataset_id
  prediction.uns["method_id"] = METHOD_ID
  outputs.write_atomically(path, lambda p: prediction.write_h5ad(p))


def match_modality(fitted, names, competition, workdir: pathlib.Path) -> dict:
  """match_probability of both directions (SNN or Sinkhorn within the test batches, as configured) with `fitted`, an
  `api.Run` or `api.Ensemble`."""
  prefix = competition.match_modality
  cells, files = task_data.test_cells(prefix, names)
  solution = sp.csr_matrix(files["test_sol"].X)
  types = tuple(task_data.feature_type(files[k], k) for k in ("test_mod1", "test_mod2"))
  options = dict(competition.match)
  forward = fitted.match(cells[names[0]], names[0], cells[names[1]], names[1], batch_key="batch", **options).matrix
  backward = fitted.match(cells[names[1]], names[1], cells[names[0]], names[0], batch_key="batch", **options).matrix
  write_prediction(workdir / "match_modality" / "prediction.h5ad", forward, files["test_mod1"].obs_names,
                   files["test_mod2"].obs_names, str(files["test_sol"].uns.get("dataset_id", "")))
  baseline = official(prefix).get("match_probability")
  return {
      subtask(types): {"match_probability": metrics.match_probability(forward, solution), "baseline": baseline},
      subtask(types[::-1]): {"match_probability": metrics.match_probability(backward, solution.T.tocsr())},
  }


def predict_modality(fitted: api.Run, names, prefix: str, workdir: pathlib.Path) -> dict:
  """The official predict-modality scores of both directions, on the competition's normalised scales."""
  files = task_data.read_task(prefix, ("test_mod1", "test_mod2"))
  by_name = dict(zip(names, (files["test_mod1"], files["test_mod2"])))
  baseline = official(prefix)
  out = {}
  for source, target in (names, names[::-1]):
    types = (task_data.feature_type(by_name[source], source),
             task_data.feature_type(by_name[target], target))
    predicted, undecoded = predicted_values(fitted, by_name[source], source, target, by_name[target].var_names,
                                            SCALES[types[1]])
    scores = metrics.predict_modality_metrics(predicted, by_name[target].X) | {"undecoded_features": undecoded}
    if source == names[0]:
      write_prediction(workdir / "predict_modality" / "prediction.h5ad", predicted, by_name[source].obs_names,
                       by_name[target].var_names, str(files["test_mod2"].uns.get("dataset_id", "")))
      scores["baseline"] = {k: baseline[k] for k in ("rmse", "mae") if k in baseline}
    out[subtask(types)] = scores
  return out


def predicted_values(fitted: api.Run, cells: ad.AnnData, source: str, target: str, features, scale: str):
  """(predictions for `features` on `scale`, number of features the run does not decode).

  "binary" (binarised ATAC) is the expected count clipped to 1. Features the run does not decode (e.g. zero in
  every training cell) are predicted as 0.
  """
  prediction = fitted.predict(cells, source, target, normalized="counts" if scale == "binary" else scale)
  if scale == "binary":
    prediction.X = np.minimum(prediction.X, 1.0)
  columns = pd.Index(prediction.var_names).get_indexer(pd.Index(features))
  values = np.zeros((cells.n_obs, len(columns)), np.float32)
  values[:, columns >= 0] = prediction.X[:, columns[columns >= 0]]
  return values, int((columns < 0).sum())


def joint_embedding(fitted: api.Run, names, prefix: str, workdir: pathlib.Path) -> dict:
  """The six joint-embedding metrics of the mean of both modalities' embeddings of every cell."""
  files = task_data.read_task(prefix, ("mod1", "mod2"))
  mod1, mod2 = files["mod1"], files["mod2"][files["mod1"].obs_names]
  embedding = (fitted.encode(mod1, names[0]).obsm["X_clue"] + fitted.encode(mod2, names[1]).obsm["X_clue"]) / 2.0
  path = workdir / "joint_embedding" / "prediction.h5ad"
  write_prediction(path, embedding, mod1.obs_names, [f"clue_{i}" for i in range(embedding.shape[1])],
                   str(mod1.uns.get("dataset_id", "")))
  solution = task_data.task_path(prefix, "solution")
  scores = embedding_metrics.joint_embedding_metrics(**task_files.read_joint_embedding(path, solution))
  scores["baseline"] = official(prefix)
  return scores

