"""TEA-seq PBMC with three modalities (issue 34): CLUE's 3x3 encoder matrix trained fully paired and as a mosaic.

  python experiments/teaseq.py --data=../shared/data/teaseq_pbmc/teaseq_pbmc.h5mu --out=runs/teaseq \
      --seeds=0,1,2 [--settings=trimodal,mosaic] [--override=train.auto_epoch_cap=200 ...]

Per seed, OUT/seed_<seed>/:
1. split.json: --heldout_fraction of the cells (drawn with the seed) held out, never trained on (the inductive
   setting) and encoded afterwards; the rest train. For the mosaic, a third of the training cells (drawn with the
   seed) lose their ADT and another third their ATAC (their other modalities kept): they are absent from that
   modality's AnnData, so unpaired there (clue_jax/data/sampler.py `pair_cells`).
2. <setting>/train.h5mu: the training cells of the setting; <setting>/run: configs/teaseq.py trained on it
   (`trainer.train_and_evaluate`) with only its path, the seed and the --override keys changed. A finished run
   (summary.json) is reused.
3. Scores on the held-out cells, which have all three modalities, with L2-normalised embeddings (the model trains
   with normalize_u): FOSCTTM (both directions averaged) and top-1 (both directions averaged) per modality pair; kNN
   (k = 5) label transfer of `cell_type` per modality, from the training cells' embeddings of that modality, and
   for the joint embedding (a cell's mean over the modalities it has, re-normalised; training cells as they were
   trained, held-out cells with all three); ADT predicted from RNA, from ATAC and from RNA + ATAC (`Run.predict`,
   NB library size from the RNA / ATAC encoder's estimate) on the CLR scale against the held-out cells' CLR of their
   ADT counts (RMSE, Pearson per cell, per protein and overall). Training time: the sum of the epochs' wall times
   in metrics.jsonl (the first epoch's compilation included).

Writes OUT/results.json (every value) and prints markdown tables: mean +- sd over seeds (each seed's value), one
column per setting.
"""

import json
import os
import pathlib
import subprocess
import sys

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
from absl import app, flags, logging

from clue_jax import api, config as config_lib
from clue_jax.data import preprocess
from clue_jax.evaluate import matching, metrics
from clue_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parent.parent
_DATA = flags.DEFINE_string("data", None, "The TEA-seq .h5mu (mods rna, adt, atac; obs cell_type).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (runs, results.json).", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds: each draws its held-out cells, mosaic and model.")
_SETTINGS = flags.DEFINE_list("settings", ["trimodal", "mosaic"], "trimodal and/or mosaic.")
_HELDOUT = flags.DEFINE_float("heldout_fraction", 0.2, "Fraction of the cells held out from training.")
_REF_PYTHON = flags.DEFINE_string("ref_python", None, "Python of a venv with scglue 0.4.1: also run the reference.")
_REF_SEEDS = flags.DEFINE_list("ref_seeds", ["0"], "Seeds the reference runs for (with --ref_python).")
_REF_SETTINGS = flags.DEFINE_list("ref_settings", ["trimodal"], "Settings the reference runs for (--ref_python).")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "KEY=VALUE override of configs/teaseq.py (VALUE read as "
                                      "JSON, else as a string), e.g. train.auto_epoch_cap=200; repeatable.")

NAMES = ("rna", "adt", "atac")
PAIRS = (("rna", "adt"), ("rna", "atac"), ("adt", "atac"))
SOURCES = (("rna",), ("atac",), ("rna", "atac"))
LABEL_KEY, LABEL_K = "cell_type", 5
PREDICT_METRICS = ("rmse", "mean_pearson_per_cell", "mean_pearson_per_gene", "overall_pearson")


def split(obs_names, seed: int, fraction: float) -> dict:
  """Held-out and training cells, and the training cells the mosaic drops from ADT and from ATAC."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(obs_names))
  n_heldout = int(round(fraction * len(obs_names)))
  heldout, train = np.sort(order[:n_heldout]), np.sort(order[n_heldout:])
  drop = rng.permutation(train)
  third = len(train) // 3
  names = np.asarray(obs_names, str)
  return {"heldout": names[heldout].tolist(), "train": names[train].tolist(),
          "no_adt": names[np.sort(drop[:third])].tolist(), "no_atac": names[np.sort(drop[third:2 * third])].tolist()}


def training_data(mdata, cells: dict, setting: str) -> md.MuData:
  """The training cells of `setting`: every modality (trimodal), or ADT and ATAC each without a third (mosaic)."""
  train = cells["train"]
  dropped = {"adt": set(cells["no_adt"]), "atac": set(cells["no_atac"])} if setting == "mosaic" else {}
  mods = {}
  for name in NAMES:
    keep = [c for c in train if c not in dropped.get(name, ())]
    mods[name] = mdata.mod[name][keep].copy()
  return md.MuData(mods)


def train_run(directory: pathlib.Path, mdata, cells: dict, setting: str, seed: int, overrides: dict) -> pathlib.Path:
  """The finished run of one setting and seed (trained unless there already)."""
  workdir = directory / "run"
  if (workdir / "summary.json").is_file():
    return workdir
  path = directory / "train.h5mu"
  if not path.is_file():
    directory.mkdir(parents=True, exist_ok=True)
    training_data(mdata, cells, setting).write(directory / "train.tmp.h5mu")
    (directory / "train.tmp.h5mu").rename(path)
  module = config_lib.load_module(ROOT / "configs" / "teaseq.py")
  config = config_lib.apply_overrides(module.get_config(str(path)), {
      "seed": seed, "train.progress": False, "evals.plots": False, **overrides})
  trainer.train_and_evaluate(config, workdir)
  return workdir


def joint(embeddings: dict, obs_names) -> np.ndarray:
  """Per cell of `obs_names`, the mean of its L2-normalised embeddings over the modalities it has, re-normalised.
  `embeddings`: {modality: (obs_names, embedding)}."""
  total = np.zeros((len(obs_names), next(iter(embeddings.values()))[1].shape[1]))
  for names, emb in embeddings.values():
    total[obs_names.get_indexer(names)] += matching.l2_rows(emb)
  return matching.l2_rows(total)


def scores(train: md.MuData, heldout: md.MuData, fitted: dict, test: dict, predicted: dict | None = None) -> dict:
  """Every score of one run on the held-out cells (see the module docstring). `fitted` / `test`: {modality:
  embedding of every cell of train.mod[m] / heldout.mod[m]}; `predicted`: {sources: CLR ADT of the held-out cells}."""
  unit = {m: matching.l2_rows(test[m]) for m in NAMES}
  out = {}
  for a, b in PAIRS:
    out[f"foscttm {a}-{b}"] = metrics.foscttm(unit[a], unit[b])
    out[f"top1 {a}-{b}"] = (metrics.top1_accuracy(unit[a], unit[b]) + metrics.top1_accuracy(unit[b], unit[a])) / 2
  labels = heldout.mod["rna"].obs[LABEL_KEY].to_numpy(str)
  train_labels = {}
  for m in NAMES:
    train_labels.update(zip(train.mod[m].obs_names, train.mod[m].obs[LABEL_KEY].astype(str)))
    out[f"label_transfer {m}"] = metrics.knn_label_transfer_accuracy(
        matching.l2_rows(fitted[m]), train.mod[m].obs[LABEL_KEY].to_numpy(str), unit[m], labels, LABEL_K)
  train_joint = joint({m: (train.mod[m].obs_names, fitted[m]) for m in NAMES}, train.obs_names)
  test_joint = joint({m: (heldout.mod[m].obs_names, test[m]) for m in NAMES}, heldout.obs_names)
  out["label_transfer joint"] = metrics.knn_label_transfer_accuracy(
      train_joint, [train_labels[c] for c in train.obs_names], test_joint, heldout.obs_names.map(
          dict(zip(heldout.mod["rna"].obs_names, labels))).to_numpy(str), LABEL_K)
  if predicted is not None:
    adt = heldout.mod["adt"]
    for sources, values in predicted.items():
      values = metrics.predict_modality_metrics(values, preprocess.clr(adt.X))
      out.update({f"adt from {'+'.join(sources)}: {k}": values[k] for k in PREDICT_METRICS})
  return out


def clue_scores(workdir: pathlib.Path, train: md.MuData, heldout: md.MuData) -> dict:
  """`scores` of the clue_jax run in `workdir`."""
  run = api.load(workdir)
  if list(run.features("adt")) != list(heldout.mod["adt"].var_names):
    raise ValueError("the run decodes other proteins than the held-out ADT holds, or in another order")
  fitted = {m: run.encode(train, m).obsm["X_clue"] for m in NAMES}
  test = {m: run.encode(heldout, m).obsm["X_clue"] for m in NAMES}
  predicted = {}
  for sources in SOURCES:
    prediction = run.predict(heldout, sources, "adt", normalized="clr")
    if list(prediction.obs_names) != list(heldout.mod["adt"].obs_names):
      raise ValueError("predicted cells are not in the held-out ADT's order")
    predicted[sources] = prediction.X
  return scores(train, heldout, fitted, test, predicted)


def reference_scores(directory: pathlib.Path, workdir: pathlib.Path, train: md.MuData, heldout: md.MuData) -> dict:
  """The reference (experiments/reference_scglue.py, scglue 0.4.1) trained on `train` with the clue_jax run's
  decoder features, encoder inputs, sizes, weights, seed and epoch plan, scored by `scores` (no ADT prediction: the
  reference's cross_predict refuses NB targets). Returns {"scores", "training"}; its files go under `directory`."""
  run = api.load(workdir)
  reference = directory / "reference"
  if not (reference / "embeddings.npz").is_file():
    reference.mkdir(parents=True, exist_ok=True)
    command = [_REF_PYTHON.value, str(ROOT / "experiments" / "reference_scglue.py"), "--preset", "competition_cite",
               "--seed", str(run.config.seed), "--out", str(reference / "result.json"),
               "--embeddings", str(reference / "embeddings.npz")]
    plan = json.loads((workdir / "summary.json").read_text())["plan"]
    for key in ("max_epochs", "align_burnin", "patience", "reduce_lr_patience"):
      command += [f"--{key.replace('_', '-')}", str(int(plan[key]))]
    for flag, cells in (("--mod", train), ("--encode", heldout)):
      for m in NAMES:
        path = reference / f"{flag[2:]}_{m}.h5ad"
        exported = ad.AnnData(X=cells.mod[m][:, run.features(m)].X.astype(np.float32),
                              obs=pd.DataFrame({"batch": pd.Categorical(["0"] * cells.mod[m].n_obs)},
                                               index=cells.mod[m].obs_names))
        exported.layers["counts"] = exported.X
        exported.obsm["X_rep"] = np.asarray(run.representation(cells, m), np.float32)
        exported.write_h5ad(path)
        command += [flag, f"{m}={path}"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
  saved = np.load(reference / "embeddings.npz", allow_pickle=False)
  for m in NAMES:
    if list(saved[f"{m}_obs_names"]) != list(heldout.mod[m].obs_names):
      raise ValueError(f"the reference's {m} embeddings are not of the held-out cells in order")
  result = json.loads((reference / "result.json").read_text())
  return {"training": {"seconds": result["fit_seconds"], "cpu_seconds": result["fit_cpu_seconds"],
                       "epochs_run": result["epochs_run"], "max_epochs": result["max_epochs"]},
          "scores": scores(train, heldout, {m: saved[f"train_{m}"] for m in NAMES}, {m: saved[m] for m in NAMES})}


def training_record(workdir: pathlib.Path) -> dict:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  summary = json.loads((workdir / "summary.json").read_text())
  return {"seconds": float(sum(r["time/epoch_s"] for r in records if "time/epoch_s" in r)),
          "epochs_run": summary["epochs_run"], "restored_epoch": summary["restored_epoch"],
          "max_epochs": summary["plan"]["max_epochs"]}


def table(results: dict) -> str:
  """Markdown: one row per score, one column per setting (and reference setting): mean +- sd over the seeds that
  have it (each seed's value)."""
  rows = results["seeds"]
  columns = [c for c in ("trimodal", "mosaic", "reference trimodal", "reference mosaic")
             if any(c in r for r in rows.values())]
  if not columns:
    return ""

  def cell(column, part, key):
    values = [r[column][part][key] for r in rows.values() if column in r and key in r[column][part]]
    if not values:
      return "-"
    spread = f" +- {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
    return f"{np.mean(values):.4f}{spread} ({', '.join(f'{v:.4f}' for v in values)})"

  seeds = {c: ", ".join(s for s, r in rows.items() if c in r) for c in columns}
  lines = ["| score | " + " | ".join(f"{c} (seeds {seeds[c]})" for c in columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  keys = list(dict.fromkeys(k for r in rows.values() for c in columns if c in r for k in r[c]["scores"]))
  for key in keys:
    lines.append(f"| {key} | " + " | ".join(cell(c, "scores", key) for c in columns) + " |")
  for key in ("seconds", "cpu_seconds", "epochs_run", "restored_epoch", "max_epochs"):
    lines.append(f"| training {key} | " + " | ".join(cell(c, "training", key) for c in columns) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  unknown = set(_SETTINGS.value) - {"trimodal", "mosaic"}
  if unknown:
    raise app.UsageError(f"--settings: unknown {sorted(unknown)}; use trimodal and/or mosaic")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  mdata = md.read_h5mu(_DATA.value)
  results_path = out / "results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else {}
  results.update({"data": _DATA.value, "heldout_fraction": _HELDOUT.value,
                  "overrides": config_lib.parse_overrides(_OVERRIDE.value),
                  "command": " ".join(["python", "experiments/teaseq.py"] + sys.argv[1:])})
  results.setdefault("seeds", {})
  for seed in (int(s) for s in _SEEDS.value):
    directory = out / f"seed_{seed}"
    split_path = directory / "split.json"
    if not split_path.is_file():
      directory.mkdir(parents=True, exist_ok=True)
      split_path.write_text(json.dumps(split(mdata.obs_names, seed, _HELDOUT.value)))
    cells = json.loads(split_path.read_text())
    heldout = md.MuData({m: mdata.mod[m][cells["heldout"]].copy() for m in NAMES})
    for setting in _SETTINGS.value:
      workdir = train_run(directory / setting, mdata, cells, setting, seed, config_lib.parse_overrides(_OVERRIDE.value))
      train = md.read_h5mu(directory / setting / "train.h5mu")
      row = {"n_train": {m: train.mod[m].n_obs for m in NAMES}, "n_heldout": len(cells["heldout"]),
             "training": training_record(workdir), "scores": clue_scores(workdir, train, heldout)}
      results["seeds"].setdefault(str(seed), {})[setting] = row
      if _REF_PYTHON.value and str(seed) in _REF_SEEDS.value and setting in _REF_SETTINGS.value:
        results_path.write_text(json.dumps(results, indent=2))
        results["seeds"][str(seed)][f"reference {setting}"] = reference_scores(directory / setting, workdir, train,
                                                                              heldout)
      results_path.write_text(json.dumps(results, indent=2))
      print(json.dumps({seed: {setting: row}}), flush=True)
  print(table(results))


if __name__ == "__main__":
  app.run(main)
