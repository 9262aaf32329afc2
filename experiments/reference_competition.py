"""Runs the NeurIPS 2021 competition's two-stage CLUE recipe with the PyTorch reference (scglue 0.4.1's SCCLUEModel).

This script is NOT part of clue_jax and scglue is NOT a project dependency. It runs in the reference virtualenv (see
experiments/reference_scglue.py for how to build it) and only calls scglue's public API (configure_dataset,
SCCLUEModel, adopt_pretrained_model, compile, fit, encode_data); no scglue source is copied here. It imports only
scglue, torch, anndata, numpy, scipy, pandas, the standard library and the helpers of reference_scglue.py.

The recipe (docs/method.md sections 3.4 and 3.5):
  1. pretraining on the paired training cells only: SCCLUEModel(pretrain files, random_seed=seed, **model),
     compile(**compile, lr=pretrain_lr), fit(**pretrain_fit);
  2. transductive fine-tuning: a fresh SCCLUEModel(fine-tune files, random_seed=seed, **model) on train + test cells
     (test cells unpaired, the unseen test batches added to the batch categories), adopt_pretrained_model(pretrained),
     compile(**compile, lr=finetune_lr), fit(**finetune_fit) (the competition: align_burnin=0, max_epochs=50,
     patience=8, reduce_lr_patience=3);
  3. encode_data(name, fine-tune file) for every modality, by the fine-tuned and by the pretrained model; the
     embeddings go to --embeddings for clue_jax to score.
random.seed / np.random.seed / torch.manual_seed(seed) are called before each stage.

Usage:

  /tmp/ref/bin/python experiments/reference_competition.py \
      --pretrain-mod rna=DIR/pretrain/rna.h5ad --pretrain-mod adt=DIR/pretrain/adt.h5ad \
      --finetune-mod rna=DIR/finetune/rna.h5ad --finetune-mod adt=DIR/finetune/adt.h5ad \
      --hyper DIR/hyper.json [--threads 2] [--predict rna=adt] --out DIR/reference_result.json \
      --embeddings DIR/reference_embeddings.npz

Inputs (as clue_jax exports them; --pretrain-mod / --finetune-mod NAME=PATH, the same names in the same order in both
stages, since the order fixes the discriminator's modality index): X and layers["counts"] = raw counts of the decoder
features, obsm["X_rep"] = the encoder input, a categorical obs["batch"] with one category list per stage (shared by
its modalities; the fine-tune list may add batches), obs_names = cell IDs (equal IDs across modalities are paired:
train-0, train-1, ... in both; test-mod1-i / test-mod2-i are unpaired). Every modality is configured with
configure_dataset(likelihood, use_highly_variable=False, use_layer="counts", use_rep="X_rep", use_batch="batch",
use_obs_names=True), the likelihood ("NB", ...) from hyper.json.

hyper.json (unknown keys are rejected, so that a typo cannot silently fall back to a default):
  seed           int: SCCLUEModel(random_seed=...) in both stages (init, fit's train/validation split, shuffling)
  likelihoods    {name: prob_model} for every modality
  model          SCCLUEModel kwargs (latent_dim, x2u_h_depth, x2u_h_dim, u2x_h_depth, u2x_h_dim, du_h_depth,
                 du_h_dim, dropout, shared_batches), used in both stages; no random_seed here
  compile        compile kwargs (lam_data, lam_kl, lam_align, lam_sup, lam_joint_cross, lam_real_cross, lam_cos,
                 normalize_u, modality_weight), used in both stages; no lr here
  pretrain_lr    default 2e-3 (compile's own default, as the competition's pretraining used)
  finetune_lr    default 1e-3 (the competition's fine-tuning)
  pretrain_fit, finetune_fit
                 fit kwargs (val_split, batch_size, align_burnin, max_epochs, patience, reduce_lr_patience); a kwarg
                 left out is the library default (AUTO for the last four, derived from the data size and lr)

Outputs:
  --embeddings   .npz: per modality NAME, NAME = encode_data's posterior means of every cell of that modality's
                 fine-tune file, in file order (float32, n x (number of modalities x latent_dim): all subspaces, not
                 L2-normalized), pretrain_NAME = the same by the pretrained model (before fine-tuning), and
                 NAME_obs_names = its obs_names (str). With --predict SOURCE=TARGET (an NB target) also
                 predict_SOURCE_TARGET: the fine-tuned model's expected TARGET counts for every cell of SOURCE's
                 fine-tune file, decoded with the cell's own batch, and pretrain_predict_SOURCE_TARGET: the
                 pretrained model's, averaged over its batches (it knows none of the test batches). scglue's
                 cross_predict refuses NB and batched targets, so this is the decoding its training applies:
                 the source's posterior mean (L2-normalised with normalize_u), cut to TARGET's subspace, through
                 TARGET's decoder with the library size the source encoder estimates for TARGET.
  --out          JSON: seed; per stage ("pretrain", "finetune"): epochs_run (max ignite epoch seen by a wrapped
                 trainer.train_step, as in reference_scglue.py), iterations, fit_settings (the kwargs that reached
                 SCCLUETrainer.fit, i.e. with AUTO resolved), history (per epoch: the averaged train and validation
                 losses the trainer reports, and the learning rate), lr, fit_seconds, fit_cpu_seconds, modalities'
                 shapes, batches, n_ids (unique cell IDs) and n_paired_ids (IDs present in every modality); for the
                 fine-tune stage also "adopt": which tensors adopt_pretrained_model copied unchanged, which it expanded
                 to new batches (and whether their old-batch columns equal the pretrained ones), and the new batches;
                 peak_rss_gb, threads, scglue and torch versions, and the hyper dict as read.
  A one-line summary goes to stdout.

Caveats:
  * adopt_pretrained_model logs one "Copied: <tensor>" INFO line per parameter and buffer (BatchNorm running stats
    included); tensors with batch columns (decoder and, with shared_batches, discriminator) keep the pretrained columns
    of the batches both stages know and a fresh initialization for new ones. It raises if one stage has batches and
    the other has none.
  * fit() ends by restoring the most recent kept checkpoint, which is only written after align_burnin epochs: a run
    shorter than align_burnin keeps its last weights ("No usable checkpoint found").
  * AUTO fit settings scale with 1 / (lr x minibatches per epoch), so on small files they are huge (311 paired
    starter cells: align_burnin 2744, patience 2058, reduce_lr_patience 686, max_epochs ~16,500); give max_epochs
    there. The competition's pretraining was all AUTO on ~60,000 cells.
  * scglue's INFO log goes to stdout (warnings to stderr), with per-epoch losses only every 10th epoch; the summary
    line is the last line of stdout. Unpaired test cells need nothing special: fit() takes the union of cell IDs and
    fills each missing modality slot with a random cell of that modality every epoch.
  * Timing: torch's OpenMP threads spin while waiting; on a shared machine use OMP_WAIT_POLICY=PASSIVE (passed through,
    not set here) and fewer --threads; fit_cpu_seconds / fit_seconds shows whether the run had its cores.
"""

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_scglue import load_modalities, process_cpu_seconds

HYPER_KEYS = {"seed", "likelihoods", "model", "compile", "pretrain_lr", "finetune_lr", "pretrain_fit", "finetune_fit"}
FIT_KEYS = {"val_split", "batch_size", "align_burnin", "max_epochs", "patience", "reduce_lr_patience"}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--pretrain-mod", action="append", default=[], metavar="NAME=PATH",
                      help="a modality of the pretraining stage (paired training cells); repeat, in order")
  parser.add_argument("--finetune-mod", action="append", default=[], metavar="NAME=PATH",
                      help="a modality of the fine-tuning stage (train + test cells); same names and order")
  parser.add_argument("--hyper", required=True, metavar="HYPER.json", help="seed, likelihoods, model, compile, fit")
  parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (default 2)")
  parser.add_argument("--predict", metavar="SOURCE=TARGET", help="also save TARGET's predicted counts (see Outputs)")
  parser.add_argument("--out", required=True, metavar="RESULT.json")
  parser.add_argument("--embeddings", required=True, metavar="EMBEDDINGS.npz")
  args = parser.parse_args(argv)
  if len(args.pretrain_mod) < 2 or len(args.finetune_mod) < 2:
    parser.error("give at least two --pretrain-mod and two --finetune-mod")
  pre_names = [spec.partition("=")[0] for spec in args.pretrain_mod]
  fine_names = [spec.partition("=")[0] for spec in args.finetune_mod]
  if pre_names != fine_names:
    parser.error(f"--pretrain-mod names {pre_names} and --finetune-mod names {fine_names} differ (order counts)")
  return args


def read_hyper(path, names):
  """Reads and checks hyper.json; returns it with the lr defaults filled in."""
  with open(path) as f:
    hyper = json.load(f)
  if not isinstance(hyper, dict):
    raise SystemExit(f"{path}: expected a JSON object")
  unknown = set(hyper) - HYPER_KEYS
  if unknown:
    raise SystemExit(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(HYPER_KEYS)}")
  for key in ("seed", "likelihoods", "model", "compile"):
    if key not in hyper:
      raise SystemExit(f"{path}: missing {key!r}")
  if not isinstance(hyper["seed"], int):
    raise SystemExit(f"{path}: seed must be an int")
  missing = [name for name in names if name not in hyper["likelihoods"]]
  if missing:
    raise SystemExit(f"{path}: likelihoods lack {missing}")
  if "random_seed" in hyper["model"]:
    raise SystemExit(f"{path}: give the seed as 'seed', not model.random_seed")
  if "lr" in hyper["compile"]:
    raise SystemExit(f"{path}: give the learning rates as pretrain_lr / finetune_lr, not compile.lr")
  hyper.setdefault("pretrain_lr", 2e-3)
  hyper.setdefault("finetune_lr", 1e-3)
  for stage in ("pretrain_fit", "finetune_fit"):
    hyper.setdefault(stage, {})
    unknown = set(hyper[stage]) - FIT_KEYS
    if unknown:
      raise SystemExit(f"{path}: {stage} has unknown keys {sorted(unknown)}; allowed: {sorted(FIT_KEYS)}")
  return hyper


def seed_everything(seed):
  import numpy as np
  import torch

  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def configure(adatas, likelihoods):
  import scglue

  for name, adata in adatas.items():
    scglue.models.configure_dataset(
        adata, likelihoods[name], use_highly_variable=False, use_layer="counts", use_rep="X_rep",
        use_batch="batch", use_obs_names=True,
    )


def describe(adatas):
  ids = [set(a.obs_names) for a in adatas.values()]
  return {
      "modalities": {k: list(a.shape) for k, a in adatas.items()},
      "batches": [str(c) for c in next(iter(adatas.values())).obs["batch"].cat.categories],
      "n_ids": len(set().union(*ids)),
      "n_paired_ids": len(set.intersection(*ids)),
  }


def fit_counted(model, adatas, fit_kwargs):
  """model.fit(adatas, **fit_kwargs) in a temporary directory, with epochs, iterations, settings and times recorded."""
  seen = {"epoch": 0, "iterations": 0, "fit_settings": None, "history": []}
  trainer = model.trainer
  train_step = trainer.train_step
  trainer_fit = trainer.fit
  report_metrics = trainer.report_metrics

  # Both wrappers sit on the trainer instance: ignite's Engine is built from trainer.train_step when fit starts,
  # and SCCLUEModel.fit reaches SCCLUETrainer.fit through self.trainer.fit with AUTO already resolved.
  def counting_train_step(engine, data):
    seen["epoch"] = max(seen["epoch"], engine.state.epoch)
    seen["iterations"] += 1
    return train_step(engine, data)

  def recording_fit(data, **kwargs):
    seen["fit_settings"] = {k: kwargs.get(k) for k in sorted(FIT_KEYS | {"random_seed"})}
    return trainer_fit(data, **kwargs)

  def recording_report(train_state, val_state):
    row = {"epoch": train_state.epoch, "lr": trainer.vae_optim.param_groups[0]["lr"]}
    for prefix, state in (("train", train_state), ("val", val_state)):
      if state is not None:
        row.update({f"{prefix}/{k}": float(v) for k, v in state.metrics.items()})
    seen["history"].append(row)
    return report_metrics(train_state, val_state)

  trainer.train_step = counting_train_step
  trainer.fit = recording_fit
  trainer.report_metrics = recording_report
  with tempfile.TemporaryDirectory(prefix="reference_competition_") as directory:
    cpu_start = process_cpu_seconds()
    start = time.perf_counter()
    model.fit(adatas, directory=directory, **fit_kwargs)
    fit_seconds = time.perf_counter() - start
    fit_cpu_seconds = process_cpu_seconds() - cpu_start
  return {
      "epochs_run": seen["epoch"],
      "iterations": seen["iterations"],
      "fit_settings": seen["fit_settings"],
      "history": seen["history"],
      "fit_seconds": fit_seconds,
      "fit_cpu_seconds": fit_cpu_seconds,
  }


def adopt_report(finetuned, pretrained, old_batches, new_batches):
  """What adopt_pretrained_model did: tensors copied as they were, and tensors widened to the new batch list.

  A widened tensor has its batch columns last in dim 1; it counts as transferred when its leading (non-batch) columns
  and the columns of every batch both stages know equal the pretrained ones. The new batches' columns are left as
  the fresh model initialized them.
  """
  import torch

  source = dict(pretrained.net.state_dict())
  same, differ, expanded = 0, [], {}
  for key, target in finetuned.net.state_dict().items():
    old = source[key]
    if target.shape == old.shape:
      same += 1
      if not torch.equal(target, old):
        differ.append(key)
      continue
    lead = old.shape[1] - len(old_batches)
    kept = torch.equal(target[:, :lead], old[:, :lead]) and all(
        torch.equal(target[:, lead + new_batches.index(b)], old[:, lead + i])
        for i, b in enumerate(old_batches) if b in new_batches
    )
    expanded[key] = {"pretrained": list(old.shape), "finetune": list(target.shape), "known_columns_equal": kept}
  return {"same_shape_tensors": same, "same_shape_not_equal": differ, "expanded": expanded,
          "new_batches": [b for b in new_batches if b not in old_batches]}


def predict_counts(model, source, target, adata, batches, chunk=128):
  """Expected counts of `target` for the cells of `adata` (a `source` file with layers["counts"] and obsm["X_rep"]),
  each decoded with the target decoder's batch index in `batches`."""
  import numpy as np
  import scipy.sparse as sp
  import torch
  import torch.nn.functional as F

  net = model.net
  net.eval()
  index = net.keys.index(target)
  counts, rep = adata.layers["counts"], np.asarray(adata.obsm["X_rep"], np.float32)
  out = []
  with torch.no_grad():
    for start in range(0, adata.n_obs, chunk):
      rows = slice(start, start + chunk)
      x = counts[rows].toarray() if sp.issparse(counts) else np.asarray(counts[rows])
      u, library = net.x2u[source](torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(rep[rows]),
                                   lazy_normalizer=False)
      mean = F.normalize(u.mean, dim=1) if model.normalize_u else u.mean
      z = torch.tensor_split(mean, len(net.keys), dim=1)[index]
      b = torch.as_tensor(batches[rows], dtype=torch.int64)
      out.append(net.u2x[target](z, b, library[:, index]).mean.numpy())
  return np.concatenate(out).astype(np.float32)


def main(argv=None):
  args = parse_args(argv)
  # Thread caps must be in the environment before numpy / torch load their thread pools.
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(args.threads)

  import numpy as np
  import scglue
  import torch

  torch.set_num_threads(args.threads)
  names = [spec.partition("=")[0] for spec in args.pretrain_mod]
  hyper = read_hyper(args.hyper, names)
  seed = hyper["seed"]
  result = {"seed": seed}

  # Stage 1: pretraining on the paired training cells.
  seed_everything(seed)
  pre_adatas = load_modalities(args.pretrain_mod)
  configure(pre_adatas, hyper["likelihoods"])
  pretrained = scglue.models.SCCLUEModel(pre_adatas, random_seed=seed, **hyper["model"])
  pretrained.compile(**hyper["compile"], lr=hyper["pretrain_lr"])
  result["pretrain"] = {**describe(pre_adatas), "lr": hyper["pretrain_lr"],
                        **fit_counted(pretrained, pre_adatas, hyper["pretrain_fit"])}

  # Stage 2: transductive fine-tuning on train + test cells, from the pretrained weights.
  seed_everything(seed)
  fine_adatas = load_modalities(args.finetune_mod)
  configure(fine_adatas, hyper["likelihoods"])
  model = scglue.models.SCCLUEModel(fine_adatas, random_seed=seed, **hyper["model"])
  model.adopt_pretrained_model(pretrained)
  adopt = adopt_report(model, pretrained, result["pretrain"]["batches"], describe(fine_adatas)["batches"])
  model.compile(**hyper["compile"], lr=hyper["finetune_lr"])
  result["finetune"] = {**describe(fine_adatas), "lr": hyper["finetune_lr"], "adopt": adopt,
                        **fit_counted(model, fine_adatas, hyper["finetune_fit"])}

  # Stage 3: embeddings of every fine-tune cell, per modality, in file order.
  arrays = {}
  for name, adata in fine_adatas.items():
    arrays[name] = np.asarray(model.encode_data(name, adata), dtype=np.float32)
    arrays[f"pretrain_{name}"] = np.asarray(pretrained.encode_data(name, adata), dtype=np.float32)
    arrays[f"{name}_obs_names"] = np.asarray(adata.obs_names, dtype=str)
  if args.predict:
    source, _, target = args.predict.partition("=")
    cells = fine_adatas[source]
    own = [model.net.u2x[target].batches.index(b) for b in cells.obs["batch"].astype(str)]
    arrays[f"predict_{source}_{target}"] = predict_counts(model, source, target, cells, np.asarray(own))
    known = pretrained.net.u2x[target].batches
    arrays[f"pretrain_predict_{source}_{target}"] = sum(
        predict_counts(pretrained, source, target, cells, np.full(cells.n_obs, i)) for i in range(len(known))
    ) / len(known)
  np.savez(args.embeddings, **arrays)

  result.update({
      "embeddings": {name: list(arrays[name].shape) for name in names},
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
      "threads": args.threads,
      "scglue_version": scglue.__version__,
      "torch_version": torch.__version__,
      "hyper": hyper,
  })
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  pre, fine = result["pretrain"], result["finetune"]
  print(
      f"reference_competition: seed {seed}; pretrain {pre['epochs_run']} epochs in {pre['fit_seconds']:.1f} s "
      f"({pre['n_ids']} ids); finetune {fine['epochs_run']} epochs in {fine['fit_seconds']:.1f} s "
      f"({fine['n_ids']} ids, new batches {adopt['new_batches']}); embeddings "
      + ", ".join(f"{name} {arrays[name].shape[0]}x{arrays[name].shape[1]}" for name in names)
      + f" -> {args.embeddings}"
  )


if __name__ == "__main__":
  main()
