"""Match-modality scores of ensembles of finished competition runs against the reference's recipe (one fine-tuned
run, SNN), on the same test cells: what `ensemble.seeds` and `ensemble.pretrained` of the competition settings buy.

  python experiments/competition.py --technologies=cite,multiome --seeds=0,1,2,3,4,5,6,7,8 --out=runs/comp
  python experiments/competition_ensembles.py --roots=runs/comp --technologies=cite,multiome [--group=3]

For every technology, the seed_<s> directories under each root (as `competition.py` writes them) are taken in seed
order. Each setting matches through `clue_jax.api.Ensemble`, as the recipe does, with SNN (k = 1) and with Sinkhorn
(`--epsilon`):
  one run          each seed's fine-tuned run alone (with SNN: the reference's recipe);
  run + pretrain   each seed's fine-tuned run and the pretrained run it started from (no extra training);
  G seeds          the fine-tuned runs of G consecutive seeds (disjoint groups: G times the training);
  G seeds + pretrain  the same with each seed's pretrained run.
Prints a markdown table (mean, sd and values over seeds or groups, against the mean of "one run" with SNN over the
same seeds) and writes --json.
"""

import json
import pathlib
import re

import numpy as np
from absl import app, flags, logging

from clue_jax import api, config as config_lib
from clue_jax.competition import task_data
from clue_jax.data import dataset as data_lib
from clue_jax.evaluate import metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
_ROOTS = flags.DEFINE_list("roots", ["runs/comp"], "Output directories of experiments/competition.py.")
_TECHNOLOGIES = flags.DEFINE_list("technologies", ["cite", "multiome"], "configs/competition/<name>.py of the runs.")
_GROUP = flags.DEFINE_integer("group", 3, "Seeds per multi-seed ensemble (consecutive, disjoint groups).")
_EPSILON = flags.DEFINE_float("epsilon", 0.01, "Sinkhorn's entropic regularisation.")
_JSON = flags.DEFINE_string("json", "runs/competition_ensembles.json", "Where the scores go.")


def seed_dirs(technology: str) -> list:
  dirs = [d for root in _ROOTS.value for d in (pathlib.Path(root) / technology).glob("seed_*")
          if (d / "finetune" / "summary.json").is_file()]
  return sorted(dirs, key=lambda d: int(re.sub(r"\D", "", d.name)))


def scores_of(members: list, cells: dict, names, truth, loaded: dict) -> dict:
  """{"SNN": p, "Sinkhorn": p} of the forward direction (mod1 to mod2) for the ensemble of `members` (run dirs)."""
  runs = [loaded.setdefault(d, api.load(d)) for d in members]
  ensemble = api.Ensemble(runs)
  out = {}
  for label, options in (("SNN", {"method": "snn", "k": 1}),
                         ("Sinkhorn", {"method": "sinkhorn", "epsilon": _EPSILON.value})):
    matched = ensemble.match(cells[names[0]], names[0], cells[names[1]], names[1], batch_key="batch", **options)
    out[label] = metrics.match_probability(matched.matrix, truth)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  results = {}
  for technology in _TECHNOLOGIES.value:
    module = config_lib.load_module(ROOT / "configs" / "competition" / f"{technology}.py")
    comp = module.get_competition()
    dirs = seed_dirs(technology)
    if not dirs:
      raise SystemExit(f"no finished seed_* runs of {technology} under {_ROOTS.value}; run experiments/competition.py")
    names = data_lib.modality_order(module.get_config().data)
    cells, files = task_data.test_cells(comp.match_modality, names)
    truth = files["test_sol"].X
    loaded, rows = {}, {}
    seeds = [d.name for d in dirs]
    groups = [dirs[i:i + _GROUP.value] for i in range(0, len(dirs) - _GROUP.value + 1, _GROUP.value)]
    settings = {
        "one run": [[d / "finetune"] for d in dirs],
        "run + pretrain": [[d / "finetune", d / "pretrain"] for d in dirs],
        f"{_GROUP.value} seeds": [[d / "finetune" for d in g] for g in groups],
        f"{_GROUP.value} seeds + pretrain": [[d / s for s in ("finetune", "pretrain") for d in g] for g in groups],
    }
    for setting, ensembles in settings.items():
      rows[setting] = [{"members": [str(m) for m in members], **scores_of(members, cells, names, truth, loaded)}
                       for members in ensembles]
      print(json.dumps({technology: {setting: rows[setting]}}), flush=True)
    results[technology] = {"seeds": seeds, "settings": rows}
  path = pathlib.Path(_JSON.value)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2))
  print(table(results))


def table(results: dict) -> str:
  lines = ["| starter | setting | matching | match probability: mean ± sd (values) | vs one run with SNN |",
           "|---|---|---|---|---|"]
  for technology, result in results.items():
    faithful = np.mean([r["SNN"] for r in result["settings"]["one run"]])
    for setting, rows in result["settings"].items():
      for method in ("SNN", "Sinkhorn"):
        values = np.array([r[method] for r in rows])
        sd = values.std(ddof=1) if len(values) > 1 else 0.0
        lines.append(f"| {technology} | {setting} | {method} | {values.mean():.4f} ± {sd:.4f} "
                     f"({', '.join(f'{v:.4f}' for v in values)}) | {100 * (values.mean() / faithful - 1):+.0f} % |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
