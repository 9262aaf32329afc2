"""The competition recipe on both starters, clue_jax beside the official baselines and the PyTorch reference.

  python experiments/competition.py --out=runs/competition [--technologies=cite,multiome] [--seeds=5,6,7]
      [--ref-python=/tmp/ref/bin/python]

For each technology and seed, runs `configs/competition/<technology>.py` through `clue_jax.competition` (pretraining,
transductive fine-tuning, all scores) in OUT/<technology>/seed_<seed>/. With --ref-python, the reference (scglue
0.4.1, in its own virtualenv) runs the same recipe on the same files: the same cells and IDs, decoder features,
encoder inputs (clue_jax's fitted preprocessing), model sizes, loss weights, seed, learning rates and epoch settings
(`reference_competition.py`); its fine-tuned embeddings of the test cells are matched by the same SNN code and scored
by the same metric, with SNN (the recipe's) and with Sinkhorn (`--epsilon`). The pretrained models (before
fine-tuning) are scored the same way, where the reference run saved their embeddings. Prints one table of
match_probability per subtask and matching (mean and values over seeds) and writes OUT/results.json.
"""

import json
import pathlib
import subprocess

import anndata as ad
import numpy as np
from absl import app, flags, logging

from clue_jax import api, config as config_lib
from clue_jax.competition import recipe, task_data
from clue_jax.data import dataset as data_lib
from clue_jax.evaluate import matching, metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
_OUT = flags.DEFINE_string("out", None, "Directory of the runs and results.json.")
_TECHNOLOGIES = flags.DEFINE_list("technologies", ["cite", "multiome"], "Starters: configs/competition/<name>.py.")
_SEEDS = flags.DEFINE_list("seeds", [], "Seeds (default: the config's seed only).")
_REF_PYTHON = flags.DEFINE_string("ref_python", None, "Python of a venv with scglue 0.4.1 (runs the reference).")
_EPSILON = flags.DEFINE_float("epsilon", 0.01, "Entropic regularisation of the Sinkhorn matching scored beside SNN.")
_SINKHORN_ITERATIONS = flags.DEFINE_integer("sinkhorn_iterations", 500, "The most iterations the Sinkhorn matching "
                                            "runs (smaller epsilons need more: 3000 at 0.001).")
flags.mark_flags_as_required(["out"])


def reference_hyper(config, finetune_config, summaries: dict) -> dict:
  """reference_competition.py's hyper.json: the clue_jax config's sizes, weights, seed, and each stage's plan."""
  mc, lc = config.model, config.loss
  names = list(config.data.modalities)

  def fit(plan: dict) -> dict:
    return {k: int(plan[k]) for k in ("max_epochs", "align_burnin", "patience", "reduce_lr_patience")}

  return {
      "seed": int(config.seed),
      "likelihoods": {n: config.data.modalities[n].likelihood for n in names},
      "model": {"latent_dim": mc.latent_dim, "x2u_h_depth": mc.encoder_depth, "x2u_h_dim": mc.encoder_width,
                "u2x_h_depth": mc.decoder_depth, "u2x_h_dim": mc.decoder_width,
                "du_h_depth": mc.discriminator_depth, "du_h_dim": mc.discriminator_width, "dropout": mc.dropout,
                "shared_batches": mc.shared_batches},
      "compile": {"lam_data": lc.lam_data, "lam_kl": lc.lam_kl, "lam_align": lc.lam_align,
                  "lam_joint_cross": lc.lam_joint_cross, "lam_real_cross": lc.lam_real_cross, "lam_cos": lc.lam_cos,
                  "normalize_u": config.model.normalize_u},
      "pretrain_lr": config.train.lr,
      "finetune_lr": finetune_config.train.lr,
      "pretrain_fit": fit(summaries["pretrain"]["plan"]),
      "finetune_fit": fit(summaries["finetune"]["plan"]),
  }


def export_for_reference(workdir: pathlib.Path, names) -> dict:
  """The stage files with only the decoder features and obsm["X_rep"] from the pretrained run's preprocessing."""
  pretrained = api.load(workdir / "pretrain")
  out = {}
  for stage in ("pretrain", "finetune"):
    out[stage] = {}
    for name in names:
      cells = ad.read_h5ad(workdir / "data" / f"{stage}_{name}.h5ad")
      rep = pretrained.representation(cells, name)
      exported = ad.AnnData(X=cells[:, pretrained.features(name)].layers["counts"], obs=cells.obs[["batch"]].copy())
      exported.obs["batch"] = exported.obs["batch"].astype("category")
      exported.layers["counts"] = exported.X
      exported.obsm["X_rep"] = np.asarray(rep, np.float32)
      out[stage][name] = workdir / "reference" / stage / f"{name}.h5ad"
      out[stage][name].parent.mkdir(parents=True, exist_ok=True)
      exported.write_h5ad(out[stage][name])
  # One batch category list per stage, shared by its modalities (as the clue_jax run's).
  for stage, paths in out.items():
    adatas = {n: ad.read_h5ad(p) for n, p in paths.items()}
    categories = sorted(set().union(*(set(a.obs["batch"].cat.categories) for a in adatas.values())))
    if stage == "finetune":
      known = list(ad.read_h5ad(out["pretrain"][names[0]]).obs["batch"].cat.categories)
      categories = known + [c for c in categories if c not in known]
    for name, adata in adatas.items():
      adata.obs["batch"] = adata.obs["batch"].cat.set_categories(categories)
      adata.write_h5ad(paths[name])
  return out


def run_reference(workdir: pathlib.Path, config, comp, names, extra_args=()) -> dict:
  """Runs the reference's recipe on the exported files (once; `extra_args` go to reference_competition.py); returns
  the epochs each stage ran."""
  configs = recipe.stage_configs(config, comp, {s: {n: "" for n in names} for s in ("pretrain", "finetune")})
  summaries = {s: json.loads((workdir / s / "summary.json").read_text()) for s in ("pretrain", "finetune")}
  reference = workdir / "reference"
  if not (reference / "embeddings.npz").is_file():
    paths = export_for_reference(workdir, names)
    (reference / "hyper.json").write_text(json.dumps(reference_hyper(configs["pretrain"], configs["finetune"],
                                                                     summaries), indent=2))
    command = [_REF_PYTHON.value, str(ROOT / "experiments" / "reference_competition.py"), "--hyper",
               str(reference / "hyper.json"), "--out", str(reference / "result.json"), "--embeddings",
               str(reference / "embeddings.npz")]
    for stage in ("pretrain", "finetune"):
      for name in names:
        command += [f"--{stage}-mod", f"{name}={paths[stage][name]}"]
    command += list(extra_args)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
  result = json.loads((reference / "result.json").read_text())
  return {s: result[s]["epochs_run"] for s in ("pretrain", "finetune") if s in result}


def test_cells(workdir: pathlib.Path, names) -> dict:
  """{modality: (fine-tuning file rows of the test cells in task-file order, their batches)}."""
  out = {}
  for name, tag in zip(names, ("test-mod1-", "test-mod2-")):
    obs = ad.read_h5ad(workdir / "data" / f"finetune_{name}.h5ad", backed="r").obs
    ids = obs.index.to_numpy(str)
    rows = np.flatnonzero(np.char.startswith(ids, tag))
    rows = rows[np.argsort([int(i[len(tag):]) for i in ids[rows]])]
    out[name] = (rows, obs["batch"].astype(str).to_numpy()[rows])
  return out


def test_embeddings(workdir: pathlib.Path, names, method: str, stage: str = "finetune") -> dict | None:
  """{modality: (embeddings of the test cells, their batches)} of a clue_jax stage ("pretrain" or "finetune") or of
  the reference's; None where the reference run did not save that stage."""
  cells = test_cells(workdir, names)
  if method == "reference":
    saved = np.load(workdir / "reference" / "embeddings.npz", allow_pickle=False)
    prefix = "pretrain_" if stage == "pretrain" else ""
    if f"{prefix}{names[0]}" not in saved:
      return None
    return {n: (saved[f"{prefix}{n}"][rows], batch) for n, (rows, batch) in cells.items()}
  fitted = api.load(workdir / stage)
  out = {}
  for name, (rows, batch) in cells.items():
    adata = ad.read_h5ad(workdir / "data" / f"finetune_{name}.h5ad")[rows]
    out[name] = (fitted.encode(adata, name).obsm["X_clue"], batch)
  return out


def match_scores(embeddings: dict, names, comp) -> dict:
  """match_probability of both directions, with SNN (the recipe's, k from the config) and with Sinkhorn."""
  files = task_data.read_task(comp.match_modality, ("test_mod1", "test_mod2", "test_sol"))
  solution = files["test_sol"].X
  types = tuple(task_data.feature_type(files[f], f) for f in ("test_mod1", "test_mod2"))
  out = {}
  for (a, b), truth, kind in (((names[0], names[1]), solution, types), ((names[1], names[0]), solution.T,
                                                                       types[::-1])):
    (x, bx), (y, by) = embeddings[a], embeddings[b]
    out[f"{recipe.subtask(kind)} SNN"] = metrics.match_probability(
        matching.snn_matching(x, y, comp.match.get("k", 1), bx, by), truth)
    out[f"{recipe.subtask(kind)} Sinkhorn"] = metrics.match_probability(
        matching.sinkhorn_matching(x, y, _EPSILON.value, _SINKHORN_ITERATIONS.value, bx, by), truth)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  out = pathlib.Path(_OUT.value)
  results = {}
  for technology in _TECHNOLOGIES.value:
    module = config_lib.load_module(ROOT / "configs" / "competition" / f"{technology}.py")
    comp = module.get_competition()
    seeds = [int(s) for s in _SEEDS.value] or [module.get_config().seed]
    results[technology] = {}
    for seed in seeds:
      config = config_lib.apply_overrides(module.get_config(), {"seed": seed, "train.progress": False})
      workdir = out / technology / f"seed_{seed}"
      names = data_lib.modality_order(config.data)
      scores = recipe.run(config, comp, workdir)
      row = {"baseline": {f"{k} SNN": v.get("baseline") for k, v in scores["match_modality"].items()},
             "clue_jax": match_scores(test_embeddings(workdir, names, "clue_jax"), names, comp),
             "clue_jax pretrained": match_scores(test_embeddings(workdir, names, "clue_jax", "pretrain"), names, comp),
             "epochs": {"clue_jax": scores["epochs"]}}
      if _REF_PYTHON.value:
        row["epochs"]["reference"] = run_reference(workdir, config, comp, names)
        row["reference"] = match_scores(test_embeddings(workdir, names, "reference"), names, comp)
        pretrained = test_embeddings(workdir, names, "reference", "pretrain")
        if pretrained is not None:
          row["reference pretrained"] = match_scores(pretrained, names, comp)
      results[technology][seed] = row
      print(json.dumps({technology: {seed: row}}), flush=True)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print(table(results))


def table(results: dict) -> str:
  who_all = ("clue_jax", "reference", "clue_jax pretrained", "reference pretrained")
  lines = ["| starter | subtask | matching | official baseline | " + " | ".join(f"{w}: mean (seeds)" for w in who_all)
           + " |", "|---|---|---|---" + "|---" * len(who_all) + "|"]
  for technology, by_seed in results.items():
    rows = list(by_seed.values())
    for key in rows[0]["clue_jax"]:
      subtask, method = key.split(" ")
      baseline = rows[0]["baseline"].get(key)
      cells = []
      for who in who_all:
        values = [r[who][key] for r in rows if who in r]
        cells.append(f"{np.mean(values):.4f} ({', '.join(f'{v:.4f}' for v in values)})" if values else "-")
      lines.append(f"| {technology} | {subtask} | {method} | {'-' if baseline is None else f'{baseline:.4f}'} | "
                   + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)
