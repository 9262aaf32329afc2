"""The held-out-site benchmark on a BMMC 5k .h5mu (issue 34): sites 1-3 train, site 4 test, both settings.

  python experiments/heldout_site.py --data=../shared/data/neurips2021_bmmc_cite_5k/bmmc_cite_5k.h5mu \
      --out=runs/heldout_cite --seeds=0,1,2 [--ref_python=/tmp/ref/bin/python] [--override=loss.lam_kl=0.1 ...]

1. OUT/tasks/: the competition's task files of the split (experiments/heldout_tasks.py): match_modality,
   predict_modality and joint_embedding, site 4's cells the test cells.
2. Per seed, OUT/seed_<seed>/: the competition recipe (`configs/competition/<technology>.py`, or --config) through
   `clue_jax.competition.recipe.run`: pretraining on the paired training cells (at most 200 epochs, early stopping),
   transductive fine-tuning on train + unpaired test cells (at most 50); with --ref_python the reference (scglue
   0.4.1) runs the same recipe on the same files through experiments/competition.py's `run_reference`.
3. Both stages of both implementations are scored by the same code on the test cells: the pretrained model is the
   inductive setting (site 4 never trained on, encoded afterwards), the fine-tuned one the competition's. Scores:
   match probability (SNN k = 1 and Sinkhorn, within the test batches, both directions), FOSCTTM and top-1
   accuracy (both directions averaged), kNN (k = 5) label transfer from the training cells of the same modality,
   the joint-embedding metrics of the test cells (mean of the two modalities' embeddings: NMI, cell-type ASW, batch
   ASW, graph connectivity, cell-cycle conservation) and, for CITE, ADT predicted from RNA (CLR of the expected
   counts, by the pretrained model averaged over its training batches, as it knows no test batch: RMSE, Pearson).
   FOSCTTM, top-1, label transfer and the joint embedding use L2-normalised embeddings (the models are trained with
   normalize_u). The same scores (prediction aside) of each run's two checkpoints as one (`both_checkpoints`: the
   fine-tuned and the pretrained model matched by their mean cosine similarity, as `api.Ensemble` joins runs; no
   training beyond the run's). Training time: clue_jax's sum of its epochs' wall times (metrics.jsonl, the
   first epoch's compilation included), the reference's model.fit wall time.

Writes OUT/results.json (every value) and OUT/results.png, and prints two markdown tables: mean +- sd over seeds
with the values, and clue_jax minus the reference with Welch's t. Flags --out, --seeds, --ref_python, --epsilon and
--sinkhorn_iterations are experiments/competition.py's (imported with it; its --technologies is not used here).
Finished runs are reused, so the same OUT scored again (another --epsilon) trains nothing.
"""

import json
import os
import pathlib
import sys
import time

import anndata as ad
import mudata as md
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import competition as comp_exp  # noqa: E402  (experiments/competition.py: its flags, run_reference, match_scores)
from heldout_tasks import write_task_files  # noqa: E402

from clue_jax import api, config as config_lib  # noqa: E402
from clue_jax.competition import recipe, task_data  # noqa: E402
from clue_jax.data import dataset as data_lib, preprocess  # noqa: E402
from clue_jax.evaluate import embedding_metrics, matching, metrics  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
_DATA = flags.DEFINE_string("data", None, "Paired .h5mu (mods rna + adt or rna + atac; obs batch, Site, cell_type).")
_CONFIG = flags.DEFINE_string("config", None, "Competition config file; default configs/competition/<technology>.py.")
_TEST_SITE = flags.DEFINE_string("test_site", "site4", "obs Site value of the test cells.")
_SPLIT_SEED = flags.DEFINE_integer("split_seed", 0, "Seed of the mod2 row shuffles of the task files.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "KEY=VALUE override of the training config of both stages "
                                      "(VALUE read as JSON, else as a string), e.g. loss.lam_kl=0.1; repeatable.")

LABEL_K = 5
JOINT_METRICS = ("nmi", "asw_label", "asw_batch", "graph_conn", "cc_cons")
PREDICT_METRICS = ("rmse", "mean_pearson_per_cell", "mean_pearson_per_gene", "overall_pearson")


# ------------------------------------------------------------------------------------------------ scoring
class TestCells:
  """Rows of the fine-tuning files (train-i, test-mod1-i, test-mod2-j), pairing, labels and truths of one run."""

  def __init__(self, workdir: pathlib.Path, names, prefixes: dict):
    self.names = names
    self.test = comp_exp.test_cells(workdir, names)  # {name: (rows in task-file order, batches)}
    obs = ad.read_h5ad(workdir / "data" / f"finetune_{names[0]}.h5ad", backed="r").obs
    ids = obs.index.to_numpy(str)
    self.train = np.flatnonzero(np.char.startswith(ids, "train-"))
    self.train = self.train[np.argsort([int(i[len("train-"):]) for i in ids[self.train]])]
    files = task_data.read_task(prefixes["match_modality"], ("test_mod1", "test_sol"))
    self.partner = task_data.partners(files["test_sol"], "test_sol")  # mod2 row of each mod1 test row
    je = task_data.read_task(prefixes["joint_embedding"], ("solution",))["solution"]
    self.train_labels = je.obs["cell_type"].loc[obs["task_obs_name"].to_numpy(str)[self.train]].to_numpy(str)
    test_names = files["test_mod1"].obs_names
    self.labels = je.obs["cell_type"].loc[test_names].to_numpy(str)
    self.batches = self.test[names[0]][1]
    self.expression, self.genes = je[test_names].X, je.var_names.to_numpy(str)
    self.truth = None
    if prefixes.get("predict_modality"):
      pm = task_data.read_task(prefixes["predict_modality"], ("test_mod1", "test_mod2"))
      if not (pm["test_mod1"].obs_names == test_names).all():
        raise ValueError("predict_modality test cells are not in match_modality test_mod1's order")
      self.truth = pm["test_mod2"].X


def stage_embeddings(workdir: pathlib.Path, names, method: str, stage: str) -> dict:
  """{modality: embedding of every row of its fine-tuning file} of one implementation and stage."""
  if method == "reference":
    saved = np.load(workdir / "reference" / "embeddings.npz", allow_pickle=False)
    return {n: saved[f"{'pretrain_' if stage == 'pretrain' else ''}{n}"] for n in names}
  fitted = api.load(workdir / stage)
  return {n: fitted.encode(ad.read_h5ad(workdir / "data" / f"finetune_{n}.h5ad"), n).obsm["X_clue"] for n in names}


def both_checkpoints(embeddings: dict, names) -> dict:
  """One run's fine-tuned and pretrained checkpoints as one embedding, as `api.Ensemble` joins runs: both L2-normalised
  side by side over sqrt(2), so that cosine similarities are the mean of the two (no training beyond the run's)."""
  return {n: np.hstack([matching.l2_rows(embeddings[s][n]) for s in ("finetune", "pretrain")]) / np.sqrt(2)
          for n in names}


def clue_predicted_counts(workdir: pathlib.Path, names, rows, stage: str) -> np.ndarray:
  """mod2 counts expected from the test cells' mod1: the fine-tuned run with each cell's batch, the pretrained one
  (which knows no test batch) averaged over its training batches."""
  fitted = api.load(workdir / stage)
  cells = ad.read_h5ad(workdir / "data" / f"finetune_{names[0]}.h5ad")[rows]
  if stage == "finetune":
    return fitted.predict(cells, names[0], names[1]).X
  known = fitted.batch_categories(names[1])
  return sum(fitted.predict(cells, names[0], names[1], batch=b).X for b in known) / len(known)


def scores(embeddings: dict, cells: TestCells, comp, predicted_counts=None) -> dict:
  """Every score of one implementation and stage on the test cells (see the module docstring)."""
  names = cells.names
  test = {n: (embeddings[n][rows], batch) for n, (rows, batch) in cells.test.items()}
  out = {f"match {k}": v for k, v in comp_exp.match_scores(test, names, comp).items()}
  x = matching.l2_rows(test[names[0]][0])
  y = matching.l2_rows(test[names[1]][0])[cells.partner]
  out["foscttm"] = metrics.foscttm(x, y)
  out["top1"] = (metrics.top1_accuracy(x, y) + metrics.top1_accuracy(y, x)) / 2
  for name, z in zip(names, (x, y)):
    source = matching.l2_rows(embeddings[name][cells.train])
    out[f"label_transfer {name}"] = metrics.knn_label_transfer_accuracy(source, cells.train_labels, z, cells.labels,
                                                                      LABEL_K)
  joint = embedding_metrics.joint_embedding_metrics((x + y) / 2, cells.labels, cells.batches, cells.expression,
                                                    cells.genes)
  out.update({f"joint {k}": joint[k] for k in JOINT_METRICS})
  if predicted_counts is not None:
    predicted = metrics.predict_modality_metrics(preprocess.clr(predicted_counts), cells.truth)
    out.update({f"predict {k}": predicted[k] for k in PREDICT_METRICS})
  return out


def clue_seconds(workdir: pathlib.Path) -> float:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  return float(sum(r["time/epoch_s"] for r in records if "time/epoch_s" in r))


def run_seed(config, comp, workdir: pathlib.Path, prefixes: dict) -> dict:
  """Trains (or finds) both implementations' runs of one seed; returns their scores, epochs and times."""
  names = data_lib.modality_order(config.data)
  predicting = bool(comp.predict_modality)
  start = time.perf_counter()
  recipe.run(config, config_lib.apply_overrides(comp, {"predict_modality": "", "joint_embedding": ""}), workdir)
  row = {"wall_seconds": {"clue_jax": time.perf_counter() - start}, "epochs": {}, "seconds": {}, "scores": {}}
  summaries = {s: json.loads((workdir / s / "summary.json").read_text()) for s in ("pretrain", "finetune")}
  row["epochs"]["clue_jax"] = {s: {"run": v["epochs_run"], "restored": v["restored_epoch"],
                                   "max": v["plan"]["max_epochs"]} for s, v in summaries.items()}
  row["seconds"]["clue_jax"] = {s: clue_seconds(workdir / s) for s in summaries}
  cells = TestCells(workdir, names, prefixes)
  rows = cells.test[names[0]][0]
  embeddings = {}
  for stage in ("pretrain", "finetune"):
    counts = clue_predicted_counts(workdir, names, rows, stage) if predicting else None
    embeddings[stage] = stage_embeddings(workdir, names, "clue_jax", stage)
    row["scores"][f"clue_jax {stage}"] = scores(embeddings[stage], cells, comp, counts)
  row["scores"]["clue_jax checkpoints"] = scores(both_checkpoints(embeddings, names), cells, comp)
  if comp_exp._REF_PYTHON.value:
    start = time.perf_counter()
    extra = ["--predict", f"{names[0]}={names[1]}"] if predicting else []
    comp_exp.run_reference(workdir, config, comp, names, extra)
    row["wall_seconds"]["reference"] = time.perf_counter() - start
    result = json.loads((workdir / "reference" / "result.json").read_text())
    row["epochs"]["reference"] = {s: {"run": result[s]["epochs_run"], "max": result[s]["fit_settings"]["max_epochs"]}
                                  for s in ("pretrain", "finetune")}
    row["seconds"]["reference"] = {s: result[s]["fit_seconds"] for s in ("pretrain", "finetune")}
    row["cpu_seconds_reference"] = {s: result[s]["fit_cpu_seconds"] for s in ("pretrain", "finetune")}
    saved = np.load(workdir / "reference" / "embeddings.npz", allow_pickle=False)
    for stage in ("pretrain", "finetune"):
      key = f"{'pretrain_' if stage == 'pretrain' else ''}predict_{names[0]}_{names[1]}"
      counts = saved[key][rows] if predicting else None
      embeddings[stage] = stage_embeddings(workdir, names, "reference", stage)
      row["scores"][f"reference {stage}"] = scores(embeddings[stage], cells, comp, counts)
    row["scores"]["reference checkpoints"] = scores(both_checkpoints(embeddings, names), cells, comp)
  return row


# ------------------------------------------------------------------------------------------------ report
def table(results: dict) -> str:
  """Markdown: one row per score, one column per implementation and setting: mean +- sd (values by seed)."""
  seeds = list(results["seeds"])
  rows = [results["seeds"][s] for s in seeds]
  columns = [c for c in ("clue_jax finetune", "reference finetune", "clue_jax pretrain", "reference pretrain",
                         "clue_jax checkpoints", "reference checkpoints") if all(c in r["scores"] for r in rows)]
  titles = {"finetune": "competition (fine-tuned)", "pretrain": "inductive (pretrained)",
            "checkpoints": "both checkpoints"}
  head = [f"{c.split()[0]}, {titles[c.split()[1]]}" for c in columns]
  lines = [f"| score (seeds {', '.join(seeds)}) | " + " | ".join(head) + " |", "|---" * (len(columns) + 1) + "|"]

  def cell(values):
    values = [v for v in values if v is not None]
    if not values:
      return "-"
    spread = f" +- {np.std(values, ddof=1):.4f}" if len(values) > 1 else ""
    return f"{np.mean(values):.4f}{spread} ({', '.join(f'{v:.4f}' for v in values)})"

  for key in rows[0]["scores"][columns[0]]:
    lines.append(f"| {key} | " + " | ".join(cell([r["scores"][c].get(key) for r in rows]) for c in columns) + " |")
  for who in ("clue_jax", "reference"):
    if all(who in r["seconds"] for r in rows):
      for stage in ("pretrain", "finetune"):
        epochs = ", ".join(str(r["epochs"][who][stage]["run"]) for r in rows)
        seconds = [r["seconds"][who][stage] for r in rows]
        lines.append(f"| {who} {stage}: training s (epochs run) | " + cell(seconds) + f" (epochs {epochs})"
                     + " |" * (len(columns) - 1))
  return "\n".join(lines)


def differences(results: dict) -> str:
  """Markdown: clue_jax's mean minus the reference's per score and setting, with Welch's t over the seeds."""
  rows = list(results["seeds"].values())
  stages = [s for s in ("finetune", "pretrain") if all(f"reference {s}" in r["scores"] for r in rows)]
  if not stages or len(rows) < 2:
    return ""
  lines = ["| score | " + " | ".join(f"clue_jax - reference, {s} (Welch t)" for s in stages) + " |",
           "|---" * (len(stages) + 1) + "|"]
  for key in rows[0]["scores"][f"clue_jax {stages[0]}"]:
    cells = []
    for stage in stages:
      a, b = (np.array([r["scores"][f"{who} {stage}"][key] for r in rows]) for who in ("clue_jax", "reference"))
      spread = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
      cells.append(f"{a.mean() - b.mean():+.4f} ({(a.mean() - b.mean()) / spread:+.1f})" if spread > 0 else "-")
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path, keys=("match GEX2ADT SNN", "foscttm", "top1", "label_transfer rna",
                                                 "joint nmi", "joint asw_batch", "predict overall_pearson")):
  """Bars of a few scores: mean and sd over seeds per implementation and setting, each seed's value as a dot."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = list(results["seeds"].values())
  columns = [c for c in ("clue_jax finetune", "reference finetune", "clue_jax pretrain", "reference pretrain")
             if all(c in r["scores"] for r in rows)]
  keys = [k for k in keys if k in rows[0]["scores"][columns[0]]]
  fig, axes = plt.subplots(1, len(keys), figsize=(2.2 * len(keys), 3.2))
  for ax, key in zip(np.atleast_1d(axes), keys):
    for i, column in enumerate(columns):
      values = np.array([r["scores"][column][key] for r in rows])
      ax.bar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else None, capsize=3,
             color=("C0" if column.startswith("clue_jax") else "C1"), alpha=1.0 if "finetune" in column else 0.5)
      ax.plot(np.full(len(values), i), values, "k.", markersize=4)
    ax.set_xticks(range(len(columns)), [c.replace(" finetune", "\nfine-tuned").replace(" pretrain", "\npretrained")
                                        for c in columns], rotation=90, fontsize=7)
    ax.set_title(key, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # The reference's torch threads, on a shared machine.
  out = pathlib.Path(comp_exp._OUT.value)
  mdata = md.read_h5mu(_DATA.value)
  technology = "cite" if "adt" in mdata.mod else "multiome"
  dataset_id = pathlib.Path(_DATA.value).stem + f"_{_TEST_SITE.value}"
  tasks = out / "tasks"
  if not (tasks / "done.json").is_file():
    prefixes = write_task_files(mdata, tasks, dataset_id, _TEST_SITE.value, _SPLIT_SEED.value)
    (tasks / "done.json").write_text(json.dumps(prefixes, indent=2))
  prefixes = json.loads((tasks / "done.json").read_text())
  module = config_lib.load_module(pathlib.Path(_CONFIG.value) if _CONFIG.value
                                  else ROOT / "configs" / "competition" / f"{technology}.py")
  comp = config_lib.apply_overrides(module.get_competition(), {
      "match_modality": prefixes["match_modality"], "joint_embedding": prefixes["joint_embedding"],
      "predict_modality": prefixes["predict_modality"] if technology == "cite" else ""})
  seeds = [int(s) for s in comp_exp._SEEDS.value] or [module.get_config().seed]
  overrides = config_lib.parse_overrides(_OVERRIDE.value)
  results_path = out / "results.json"
  results = json.loads(results_path.read_text()) if results_path.is_file() else {}
  results.update({"data": _DATA.value, "technology": technology, "test_site": _TEST_SITE.value,
                  "split_seed": _SPLIT_SEED.value, "competition": comp.to_dict(),
                  "overrides": overrides,
                  "sinkhorn": {"epsilon": comp_exp._EPSILON.value, "n_iter": comp_exp._SINKHORN_ITERATIONS.value}})
  results.setdefault("seeds", {})
  for seed in seeds:
    config = config_lib.apply_overrides(module.get_config(), {"seed": seed, "train.progress": False,
                                                              "evals.plots": False, **overrides})
    row = run_seed(config, comp, out / f"seed_{seed}", prefixes)
    results["seeds"][str(seed)] = row
    results_path.write_text(json.dumps(results, indent=2))
    print(json.dumps({seed: row}), flush=True)
  print(table(results))
  print(differences(results))
  plot(results, out / "results.png")


if __name__ == "__main__":
  app.run(main)
