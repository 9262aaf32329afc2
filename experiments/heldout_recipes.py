"""Recipes side by side on the held-out site: experiments/heldout_site.py's results.json of several runs (the same
task files and seeds, each with its own --override), against the reference scores of one of them.

  python experiments/heldout_recipes.py --reference=runs/heldout_cite \
      --runs=faithful=runs/heldout_cite,weak_kl=runs/hc_weak_kl [--seeds=0,1,2]

Prints, per setting (competition = fine-tuned, inductive = pretrained, and both checkpoints of a run where scored),
one row per recipe with mean +- sd over the seeds every run holds: match probability (SNN and Sinkhorn, the mean of
both directions), FOSCTTM, top-1, label transfer (the mean of both modalities), cell-type ASW and training seconds,
each also as the change against the reference's mean on the same seeds.
"""

import json
import pathlib

import numpy as np
from absl import app, flags

_RUNS = flags.DEFINE_list("runs", None, "NAME=PATH: heldout_site.py's results.json, or the --out directory holding it.")
_REFERENCE = flags.DEFINE_string("reference", None, "The results.json (or its directory) of the reference's scores.")
_SEEDS = flags.DEFINE_list("seeds", [], "Seeds to use (default: those every run and the reference hold).")

HIGHER_IS_BETTER = {"foscttm": False, "train s": False}
DIGITS = {"train s": 0}


def summary(scores: dict) -> dict:
  """The compared values of one implementation, stage and seed."""
  def mean_of(prefix, suffix=""):
    values = [v for k, v in scores.items() if k.startswith(prefix) and k.endswith(suffix)]
    return float(np.mean(values))

  return {"match SNN": mean_of("match ", " SNN"), "match Sinkhorn": mean_of("match ", " Sinkhorn"),
          "foscttm": scores["foscttm"], "top1": scores["top1"], "label transfer": mean_of("label_transfer "),
          "cell-type ASW": scores["joint asw_label"]}


def values(results: dict, who: str, stage: str, seeds) -> dict:
  """{quantity: [value per seed]} of one implementation and stage (training seconds: of the stages that model went
  through, i.e. both for the fine-tuned one)."""
  rows = [results["seeds"][s] for s in seeds]
  out = {}
  for row in rows:
    for key, value in summary(row["scores"][f"{who} {stage}"]).items():
      out.setdefault(key, []).append(value)
    stages = ("pretrain",) if stage == "pretrain" else ("pretrain", "finetune")
    out.setdefault("train s", []).append(sum(row["seconds"][who][s] for s in stages))
  return out


def cell(values, reference=None, digits=4) -> str:
  text = f"{np.mean(values):.{digits}f}"
  if len(values) > 1:
    text += f" +- {np.std(values, ddof=1):.{digits}f}"
  if reference is not None:
    change = np.mean(values) / np.mean(reference) - 1
    text += f" ({change:+.1%})"
  return text


def read(path: str) -> dict:
  path = pathlib.Path(path)
  return json.loads((path / "results.json" if path.is_dir() else path).read_text())


def main(argv):
  del argv
  results = {name: read(path) for name, path in (item.split("=", 1) for item in _RUNS.value)}
  reference = read(_REFERENCE.value)
  held = [set(r["seeds"]) for r in results.values()] + [set(reference["seeds"])]
  seeds = _SEEDS.value or sorted(set.intersection(*held), key=int)
  for stage, title in (("finetune", "competition setting (fine-tuned)"), ("pretrain", "inductive (pretrained)"),
                       ("checkpoints", "both checkpoints of each run (fine-tuned + pretrained)")):
    if any(f"reference {stage}" not in reference["seeds"][s]["scores"] for s in seeds):
      continue
    ref = values(reference, "reference", stage, seeds)
    keys = list(ref)
    print(f"\n### {title}, seeds {', '.join(seeds)}; in brackets: the change against the reference's mean\n")
    print("| recipe | " + " | ".join(f"{k} {'↑' if HIGHER_IS_BETTER.get(k, True) else '↓'}" for k in keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    print("| reference | " + " | ".join(cell(ref[k], digits=DIGITS.get(k, 4)) for k in keys) + " |")
    for name, result in results.items():
      if any(f"clue_jax {stage}" not in result["seeds"][s]["scores"] for s in seeds):
        continue
      mine = values(result, "clue_jax", stage, seeds)
      print(f"| {name} | " + " | ".join(cell(mine[k], ref[k], DIGITS.get(k, 4)) for k in keys) + " |")


if __name__ == "__main__":
  flags.mark_flags_as_required(["runs", "reference"])
  app.run(main)
