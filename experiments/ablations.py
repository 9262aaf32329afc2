"""The ablation grids of configs/ablations/ scored and compared with the paper's ablation claims.

  python experiments/ablations.py [--datasets=cite,multiome,pbmc] [--runs=runs] [--train] [--parallel=2]
      [--out=experiments/results]

For each dataset the grid lives in RUNS/ablations_<dataset>/ (one run directory per point, clue_jax/sweep/runner.py). With
--train the grid is first trained (`python -m clue_jax.sweep`, which skips finished points); without it only the
points that have finished are read, and the others are reported as missing. Each finished point is scored from its
outputs (cached in its directory as ablation_scores.json):

* held-out FOSCTTM of the first modality pair over the cells whose pairing training never saw (lower is better);
* held-out match probability: SNN (k = 1) matching of the held-out cells of the first modality to those of the
  second, within batches when the obs has a `batch` column, scored by `metrics.match_probability` against the true
  pairing; chance is the mean over those cells of 1 / (held-out cells in their batch);
* kNN label transfer between the modalities (both directions averaged, all cells) when the obs has `cell_type`.

Writes OUT/ablations.md (also printed: setup, one table per dataset, the paper's claims beside ours) and
OUT/ablations.png (per dataset: match probability and FOSCTTM per setting, mean ± sd, seeds as dots).
"""

import json
import math
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pandas as pd
import scipy.sparse as sp
from absl import app, flags
from matplotlib.figure import Figure

from clue_jax import outputs
from clue_jax.evaluate import evaluation, matching, metrics, run_outputs
from clue_jax.sweep import grid, runner

ROOT = pathlib.Path(__file__).resolve().parent.parent


def define_flags():
  """The command line (defined only when run as a program: importing this module, as the tests do, defines none)."""
  flags.DEFINE_list("datasets", ["cite", "multiome", "pbmc"], "Grids: configs/ablations/<name>.py.")
  flags.DEFINE_string("runs", "runs", "Directory holding the grids, RUNS/ablations_<dataset>/.")
  flags.DEFINE_bool("train", False, "Train each grid first (finished points are skipped).")
  flags.DEFINE_integer("parallel", 2, "Points trained at the same time with --train.", lower_bound=1)
  flags.DEFINE_string("out", "experiments/results", "Directory for ablations.md and ablations.png.")


SCORES_FILE = "ablation_scores.json"
SCORES_VERSION = 1  # Bump when the scoring changes: older cached scores are recomputed.
LABEL_KEY, BATCH_KEY = run_outputs.CONVENTIONAL_LABEL_KEY, run_outputs.CONVENTIONAL_BATCH_KEY
METRICS = {  # key: (column title, higher is better)
    "match_probability": ("match prob. ↑", True),
    "foscttm": ("FOSCTTM ↓", False),
    "label_transfer": ("label transfer ↑", True),
}
OVERRIDE_LABELS = {
    "loss.lam_align": "no adversarial",
    "loss.lam_cos": "no cosine alignment",
    "loss.lam_joint_cross": "no joint-cross",
    "loss.lam_real_cross": "no real-cross",
    "loss.lam_kl": "no KL",
    "model.shared_latent": "shared latent (no modality subspaces)",
}
FULL_MODEL = "full model"
# The paper's ablations of the matching score (docs/method.md §6, a third-party summary, unverified) and our settings.
CLAIMS = (
    ("adversarial loss", -47.3, ("loss.lam_align",)),
    ("latent alignment (cosine/MSE) loss", -16.5, ("loss.lam_cos",)),
    ("cross loss", -17.6, ("loss.lam_joint_cross", "loss.lam_real_cross")),
)


# ----------------------------------------------------------------------------------------------------- settings
def setting_label(overrides: dict) -> str:
  """The human-readable name of a grid setting (its overrides without the seed)."""
  keys = set(grid.setting(overrides))
  if not keys:
    return FULL_MODEL
  if any(k.endswith(".batch_key") for k in keys):
    return "no batch covariate"
  labels = [OVERRIDE_LABELS.get(k, f"{k}={overrides[k]}") for k in sorted(keys)]
  return ", ".join(labels)


def grid_spec(dataset: str) -> str:
  return str(ROOT / "configs" / "ablations" / f"{dataset}.py")


def train_grid(dataset: str, workdir: pathlib.Path, parallel: int) -> int:
  """Runs the dataset's grid with clue_jax.sweep (finished points are skipped); returns its exit status."""
  command = [sys.executable, "-m", "clue_jax.sweep", f"--config={grid_spec(dataset)}", f"--workdir={workdir.resolve()}",
             f"--parallel={parallel}"]
  print(f"training: {' '.join(command)}", file=sys.stderr, flush=True)
  return subprocess.run(command, check=False, cwd=ROOT).returncode


# ------------------------------------------------------------------------------------------------------ scoring
def heldout_match(outputs: run_outputs.RunOutputs, a: str, b: str) -> dict:
  """SNN (k = 1) match probability of the held-out cells of `a` to those of `b` (within batches), and chance."""
  ids = pd.Index(outputs.heldout_ids).intersection(outputs.obs[a].index).intersection(outputs.obs[b].index)
  rows = {m: outputs.obs[m].index.get_indexer(ids) for m in (a, b)}
  batches = {m: None for m in (a, b)}
  if all(BATCH_KEY in outputs.obs[m].columns for m in (a, b)):
    batches = {m: outputs.obs[m][BATCH_KEY].to_numpy(object)[rows[m]].astype(str) for m in (a, b)}
  prediction = matching.snn_matching(outputs.embeddings[a][rows[a]], outputs.embeddings[b][rows[b]], k=1,
                                     batch_x=batches[a], batch_y=batches[b])
  probability = metrics.match_probability(prediction, sp.identity(len(ids), format="csr"))
  if batches[a] is None:
    chance = 1.0 / len(ids)
  else:
    _, inverse, counts = np.unique(batches[a], return_inverse=True, return_counts=True)
    chance = float(np.mean(1.0 / counts[inverse]))
  return {"match_probability": probability, "chance": chance, "heldout_cells": len(ids),
          "batches": 1 if batches[a] is None else len(set(batches[a]))}


def score_run(run_dir: pathlib.Path) -> dict:
  """The scores of one finished run, from its embeddings."""
  outputs = run_outputs.load(run_dir)
  a, b = list(outputs.embeddings)[:2]
  labelled = all(LABEL_KEY in o.columns for o in outputs.obs.values())
  result = evaluation.evaluate(outputs.embeddings, outputs.obs, label_key=LABEL_KEY if labelled else "",
                               heldout_ids=outputs.heldout_ids,
                               metric_names=("foscttm", "label_transfer") if labelled else ("foscttm",))
  transfer = result.get("label_transfer") or {}
  summary = json.loads((run_dir / "summary.json").read_text())
  return {"version": SCORES_VERSION, "pair": f"{a}_{b}",
          "foscttm": result.get("heldout_foscttm", {}).get(f"{a}_{b}"),
          **heldout_match(outputs, a, b),
          "label_transfer": float(np.mean(list(transfer.values()))) if transfer else None,
          "label_transfer_directions": transfer,
          "epochs_run": summary.get("epochs_run"), "restored_epoch": summary.get("restored_epoch"),
          "max_epochs": summary.get("plan", {}).get("max_epochs")}


def cached_scores(run_dir: pathlib.Path) -> dict:
  """score_run's result, read from RUN/ablation_scores.json when it is current, else computed and written there."""
  path = run_dir / SCORES_FILE
  if path.is_file() and path.stat().st_mtime >= (run_dir / "summary.json").stat().st_mtime:
    cached = json.loads(path.read_text())
    if cached.get("version") == SCORES_VERSION:
      return cached
  scores = score_run(run_dir)
  outputs.write_text_atomically(path, json.dumps(scores, indent=2) + "\n")
  return scores


def collect(dataset: str, workdir: pathlib.Path) -> dict:
  """The grid's points, each with its scores (None while unfinished), and the grid's base config."""
  points = runner.load_grid(grid_spec(dataset))
  rows = []
  for point in points:
    run_dir = workdir / point.name
    finished = (run_dir / "summary.json").is_file()
    rows.append({"name": point.name, "setting": setting_label(point.overrides), "overrides": point.overrides,
                 "seed": point.overrides.get(grid.SEED), "scores": cached_scores(run_dir) if finished else None,
                 "stale": finished and not runner.is_finished(point, run_dir)})
  return {"dataset": dataset, "workdir": workdir, "config": points[0].config, "rows": rows}


# -------------------------------------------------------------------------------------------------- aggregation
def mean_sd(values) -> tuple:
  """(mean, sd with ddof = 1 or None for one value, n); (None, None, 0) for no values."""
  values = [float(v) for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None, 0
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def relative_change(value, reference):
  """100 * (value - reference) / |reference|, or None."""
  if value is None or reference is None or reference == 0:
    return None
  return 100.0 * (value - reference) / abs(reference)


def pooled_sd(sd_a: float, n_a: int, sd_b: float, n_b: int) -> float:
  """The pooled standard deviation of two groups of n_a and n_b values (each n >= 2)."""
  return math.sqrt(((n_a - 1) * sd_a ** 2 + (n_b - 1) * sd_b ** 2) / (n_a + n_b - 2))


def verdict(base: list, ablated: list, worse_is_lower: bool) -> str:
  """Whether removing the part made the metric worse: "supported" if the mean moved in the worse direction by more
  than the pooled sd of the two settings, "not supported" if it moved the other way by more, else "inconclusive"."""
  (m0, s0, n0), (m1, s1, n1) = mean_sd(base), mean_sd(ablated)
  if n0 == 0 or n1 == 0:
    return "no data"
  if n0 < 2 or n1 < 2:
    return "inconclusive (n < 2)"
  difference = m1 - m0
  if abs(difference) <= pooled_sd(s0, n0, s1, n1):
    return "inconclusive (sd overlaps)"
  return "supported" if (difference < 0) == worse_is_lower else "not supported"


def values(rows: list, setting: str, metric: str) -> list:
  return [r["scores"][metric] for r in rows if r["setting"] == setting and r["scores"]
          and r["scores"].get(metric) is not None]


def settings_in_order(rows: list) -> list:
  return list(dict.fromkeys(r["setting"] for r in rows))


# ----------------------------------------------------------------------------------------------------- markdown
def fmt(mean, sd, digits: int = 3) -> str:
  if mean is None:
    return "–"
  return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


def fmt_change(change) -> str:
  return "–" if change is None else f"{change:+.1f} %"


def table(header: list, body: list) -> list:
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return [line(header), line(["---"] * len(header))] + [line(cells) for cells in body]


def epochs_text(rows: list) -> str:
  """restored/run epochs of the finished points: one value, or the range."""
  pairs = sorted({(r["scores"]["restored_epoch"], r["scores"]["epochs_run"]) for r in rows if r["scores"]})
  if not pairs:
    return "–"
  if len(pairs) == 1:
    return f"{pairs[0][0]}/{pairs[0][1]}"
  restored, run = zip(*pairs)
  return f"{min(restored)}–{max(restored)}/{min(run)}–{max(run)}"


def setting_table(rows: list, labelled: bool) -> list:
  """One line per setting: n seeds, epochs, each metric's mean ± sd and its change vs the full model."""
  header = ["setting", "n seeds", "epochs (restored/run)"]
  for metric, (title, higher) in METRICS.items():
    header += [title, f"Δ vs full ({'+' if higher else '−'} = better)"]
  body = []
  for setting in settings_in_order(rows):
    group = [r for r in rows if r["setting"] == setting]
    line = [setting, f"{sum(r['scores'] is not None for r in group)}/{len(group)}", epochs_text(group)]
    for metric in METRICS:
      if metric == "label_transfer" and not labelled:
        line += ["n/a", "n/a"]
        continue
      mean, sd, _ = mean_sd(values(rows, setting, metric))
      base, _, _ = mean_sd(values(rows, FULL_MODEL, metric))
      line += [fmt(mean, sd), "" if setting == FULL_MODEL else fmt_change(relative_change(mean, base))]
    body.append(line)
  return table(header, body)


def dataset_section(result: dict) -> list:
  """The markdown of one dataset: what was scored, the settings table, missing and stale points."""
  dataset, rows, config = result["dataset"], result["rows"], result["config"]
  lines = [f"## {dataset}", ""]
  if not result["workdir"].is_dir():
    return lines + [f"No grid yet ({result['workdir']} does not exist).", ""]
  done = [r for r in rows if r["scores"]]
  lines.append(f"Grid `{result['workdir']}`: {len(done)} of {len(rows)} points finished.")
  if not done:
    return lines + ["", "No finished point yet.", ""]
  scores = [r["scores"] for r in done]
  labelled = any(s["label_transfer"] is not None for s in scores)
  lines += [data_line(config, scores, labelled), ""] + setting_table(rows, labelled) + missing_lines(rows)
  return lines + [""]


def data_line(config, scores: list, labelled: bool) -> str:
  """Held-out cells, batches, epochs, chance and the label-transfer setup of a dataset's finished points."""
  return (f"Held-out pairs {config.data.heldout_pairs:.0%} ({fmt_range([s['heldout_cells'] for s in scores])} cells "
          f"of pair {scores[0]['pair']}, {fmt_range([s['batches'] for s in scores])} batch(es)); epochs "
          f"{epoch_plan(config)}, planned max epochs {fmt_range([s['max_epochs'] for s in scores])}; "
          f"match-probability chance {statistics.mean(s['chance'] for s in scores):.4f}; label transfer: "
          f"{'kNN, k = ' + str(evaluation.LABEL_TRANSFER_K) if labelled else 'n/a (no cell_type column)'}.")


def missing_lines(rows: list) -> list:
  """The unfinished seeds per setting, and finished points whose config is no longer the grid's."""
  missing = {s: [str(r["seed"]) for r in rows if r["setting"] == s and not r["scores"]]
             for s in settings_in_order(rows)}
  stale = [r["name"] for r in rows if r["stale"]]
  lines = []
  if any(missing.values()):
    lines += ["", "Missing (not finished): " + "; ".join(f"{s} (seed {', '.join(seeds)})"
                                                      for s, seeds in missing.items() if seeds) + "."]
  if stale:
    lines += ["", f"Config differs from the grid's current one (scored anyway): {', '.join(f'`{n}`' for n in stale)}."]
  return lines


def fmt_range(numbers: list) -> str:
  low, high = min(numbers), max(numbers)
  return str(low) if low == high else f"{low}–{high}"


def epoch_plan(config) -> str:
  if config.train.max_epochs > 0:
    return f"max_epochs {config.train.max_epochs}"
  return f"automatic (train.auto_epoch_cap {config.train.auto_epoch_cap})"


def claims_table(results: list) -> list:
  """The paper's three claims beside our relative changes and verdicts, per dataset and setting."""
  header = ["paper: removed", "paper Δ match score", "dataset", "our setting", "n (full/ablated)",
            "Δ match prob.", "verdict (match prob.)", "Δ FOSCTTM (+ = worse)", "verdict (FOSCTTM)"]
  body = []
  for claim, paper, keys in CLAIMS:
    for result in [r for r in results if any(row["scores"] for row in r["rows"])]:
      rows = result["rows"]
      for key in keys:
        setting = OVERRIDE_LABELS[key]
        line = [claim, f"{paper:+.1f} %", result["dataset"], setting]
        n = (len(values(rows, FULL_MODEL, "match_probability")), len(values(rows, setting, "match_probability")))
        line.append(f"{n[0]}/{n[1]}")
        for metric, worse_is_lower in (("match_probability", True), ("foscttm", False)):
          base, ablated = values(rows, FULL_MODEL, metric), values(rows, setting, metric)
          line += [fmt_change(relative_change(mean_sd(ablated)[0], mean_sd(base)[0])),
                   verdict(base, ablated, worse_is_lower)]
        body.append(line)
  return table(header, body)


SCORING = (
    "- Scores per finished point, from its embeddings: held-out FOSCTTM of the first modality pair; held-out "
    "match probability (SNN, k = 1, of the held-out cells of the first modality to those of the second, within "
    "`batch` when the obs has it, for every setting including \"no batch covariate\"; `metrics.match_probability` "
    "against the true pairing; chance = mean over those cells of 1 / held-out cells in their batch); kNN label "
    "transfer between the modalities over all cells (both directions averaged) when the obs has `cell_type`. "
    "The held-out cells depend on the seed only, so the settings of one seed share them.")
AGGREGATION = (
    "- Per setting: mean ± sd over the finished seeds (sd with ddof = 1; none for one seed); Δ = relative change "
    "of the mean vs the full model's mean.")
VERDICT_RULE = (
    "- Verdict rule (paper vs ours): \"supported\" if the ablated mean is worse than the full model's (match "
    "probability lower, FOSCTTM higher) by more than the two settings' pooled sd; \"not supported\" if it is "
    "better by more than that; \"inconclusive (sd overlaps)\" otherwise; \"inconclusive (n < 2)\" with fewer than "
    "two seeds in either setting. Only the direction is tested, not the paper's size of the effect.")


def setup_lines(results: list, command: str) -> list:
  """The top of the report: command, datasets, seeds, how points are scored and aggregated, the verdict rule."""
  seeds = sorted({r["seed"] for result in results for r in result["rows"]})
  settings = max((len(settings_in_order(result["rows"])) for result in results), default=0)
  grids = ("each grid trained by `python -m clue_jax.sweep --config=configs/ablations/<dataset>.py "
           f"--workdir=<runs>/ablations_<dataset>` ({settings} settings x {len(seeds)} seeds)")
  datasets = (f"- Datasets: {', '.join(r['dataset'] for r in results)}. Seeds: {', '.join(map(str, seeds))}. "
              "Epochs and held-out fractions: per dataset below (configs/ablations/<dataset>.py; restored/run "
              "epochs from each run's summary.json).")
  return ["# Ablations", "", f"- Command: `{command}`; {grids}.", datasets, SCORING, AGGREGATION, VERDICT_RULE, ""]


def report(results: list, command: str) -> str:
  """The whole markdown report."""
  lines = setup_lines(results, command)
  for result in results:
    lines += dataset_section(result)
  source = ("The paper's numbers: docs/method.md §6, a third-party summary of the paper (unverified); "
            "\"cross loss\" is compared with both of our cross terms.")
  lines += ["## Paper vs ours", "", source, ""]
  lines += claims_table(results)
  empty = [r["dataset"] for r in results if not any(row["scores"] for row in r["rows"])]
  if empty:
    lines += ["", f"Not in this table (no finished point): {', '.join(empty)}."]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- the plot
PLOT_METRICS = (("match_probability", "held-out match probability (SNN k=1)"),
                ("foscttm", "held-out FOSCTTM (lower is better; chance 0.5)"))


def draw_panel(axis, result: dict, metric: str, title: str):
  """Bars of one metric per setting (mean ± sd), each seed as a dot, chance as a dashed line."""
  rows = result["rows"]
  settings = settings_in_order(rows)
  if not any(r["scores"] for r in rows):
    state = "no grid yet" if not result["workdir"].is_dir() else "no finished point yet"
    axis.text(0.5, 0.5, f"{result['dataset']}: {state}", ha="center", va="center", transform=axis.transAxes)
    axis.set_axis_off()
    return
  for x, setting in enumerate(settings):
    seeds = values(rows, setting, metric)
    mean, sd, n = mean_sd(seeds)
    if n == 0:
      axis.text(x, 0, "missing", rotation=90, ha="center", va="bottom", fontsize=8, color="gray")
      continue
    axis.bar(x, mean, color="tab:blue" if setting == FULL_MODEL else "tab:gray", alpha=0.7,
             yerr=sd if sd is not None else None, capsize=4)
    axis.scatter(x + np.linspace(-0.15, 0.15, n) if n > 1 else [x], seeds, color="black", s=12, zorder=3)
  if metric == "match_probability":
    chance = statistics.mean(r["scores"]["chance"] for r in rows if r["scores"])
    axis.axhline(chance, color="red", linestyle="--", linewidth=1, label=f"chance {chance:.3f}")
    axis.legend(loc="best", fontsize=8)
  axis.set_xlim(-0.6, len(settings) - 0.4)
  axis.set_xticks(range(len(settings)), [s.replace(" (", "\n(") for s in settings], rotation=45, ha="right",
                  fontsize=8)
  axis.set_title(f"{result['dataset']}: {title}", fontsize=10)


def write_plot(results: list, path: pathlib.Path):
  figure = Figure(figsize=(5.0 * len(results), 8.5), layout="constrained")
  axes = figure.subplots(len(PLOT_METRICS), len(results), squeeze=False)
  for column, result in enumerate(results):
    for row, (metric, title) in enumerate(PLOT_METRICS):
      draw_panel(axes[row, column], result, metric, title)
  figure.savefig(path, dpi=110)


def main(argv):
  del argv
  options = flags.FLAGS
  runs, out = pathlib.Path(options.runs), pathlib.Path(options.out)
  unknown = [d for d in options.datasets if not pathlib.Path(grid_spec(d)).is_file()]
  if unknown:
    raise app.UsageError(f"--datasets: no configs/ablations/<name>.py for {', '.join(unknown)}")
  results = []
  for dataset in options.datasets:
    workdir = runs / f"ablations_{dataset}"
    if options.train and train_grid(dataset, workdir, options.parallel) != 0:
      print(f"warning: the {dataset} grid has failed points; reporting what finished", file=sys.stderr)
    results.append(collect(dataset, workdir))
  command = " ".join(["python experiments/ablations.py", *sys.argv[1:]])
  text = report(results, command)
  out.mkdir(parents=True, exist_ok=True)
  (out / "ablations.md").write_text(text)
  write_plot(results, out / "ablations.png")
  print(text)


if __name__ == "__main__":
  define_flags()
  app.run(main)
