"""Runs the PyTorch reference, scglue 0.4.1's SCCLUEModel, for throughput and held-out matching measurements.

This script is NOT part of clue_jax and scglue is NOT a project dependency. It runs in a separate virtualenv and only
calls scglue's public API (configure_dataset, SCCLUEModel, compile, fit, encode_data); no scglue source is copied here.
It imports only scglue, torch, anndata, numpy, scipy, pandas and the standard library.

Reference environment (CPU; torch first, so that pip takes the local CPU wheel rather than a multi-GB CUDA build;
"Location file:///opt... is ignored" warnings can be ignored):

  python3 -m venv /tmp/ref
  /tmp/ref/bin/pip install torch==2.13.0
  /tmp/ref/bin/pip install scglue==0.4.1

That resolved (Nov 2026) to torch 2.13.0+cpu, anndata 0.12.19, numpy 2.4.6, scipy 1.17.1, pandas 2.3.3,
pytorch-ignite 0.5.5; no extra pins were needed.

Usage:

  # prepared data (see below), with held-out pairs for FOSCTTM / top-1
  /tmp/ref/bin/python experiments/reference_scglue.py --mod rna=RNA.h5ad --mod adt=ADT.h5ad \
      --heldout PAIRS.tsv --preset competition_cite [--max-epochs N] [--seed S] [--threads 2] --out RESULT.json

  # any number of modalities (cells missing from a modality's file are unpaired there), cells encoded afterwards
  /tmp/ref/bin/python experiments/reference_scglue.py --mod rna=R.h5ad --mod adt=A.h5ad --mod atac=T.h5ad \
      --encode rna=HELDOUT_R.h5ad ... --embeddings EMB.npz --preset competition_cite --out RESULT.json

  # throughput only, on an in-script, fully paired synthetic data set
  /tmp/ref/bin/python experiments/reference_scglue.py --synthetic 3000 --preset defaults --max-epochs 10 \
      --out /tmp/ref_synth.json

Inputs (--mod NAME=PATH, one per modality, in order): each .h5ad holds exactly the decoder features, with raw
counts in layers["counts"] (sparse or dense), the encoder input in obsm["X_rep"] (e.g. a 100-d PCA) and a categorical
obs["batch"] with the same category list in every modality. Cells with the same obs_name in two modalities are
paired (use_obs_names=True). PAIRS.tsv: two tab-separated columns, no header: an obs_name of the first --mod and the
obs_name of its true partner in the second --mod (cells that were trained unpaired, under different names).

Presets (docs/method.md sections 1.5 and 2):
  defaults          library defaults: latent_dim 50, 2x256 encoders, decoders and discriminator, dropout 0.2,
                    random_seed 0, default compile() (all lambdas 0.02 except lam_data = lam_kl = 1, lr 2e-3);
                    shared_batches=True, since our modalities share their batches.
  competition_cite  the CITE sizes and weights of the 2021 winning submission: latent_dim 20, encoders 2x512,
                    decoders 1x128, discriminator 2x128, dropout 0.2, shared_batches=True, random_seed 5;
                    compile(lam_data=1, lam_kl=1, lam_joint_cross=2, lam_cos=1, lam_align=2), with lam_real_cross,
                    lam_sup and lr at the library defaults (real-cross did not exist in the competition's 0.1.1).
--seed overrides the preset's random_seed (model init, train/validation split, shuffling) and also seeds
python/numpy/torch. fit() runs with library defaults (val_split 0.1, batch 128, AUTO burn-in, patience and LR
schedule), with max_epochs=--max-epochs if given, else AUTO.

Measurements written to --out (JSON):
  epochs_run        exact: SCCLUETrainer.train_step is wrapped (on the trainer instance) to record the ignite
                    engine's epoch and the rows of every training minibatch; scglue keeps no trainer state after fit.
  n_ids_train       training cell IDs per epoch = round(0.9 x number of unique cell IDs), as fit()'s 90/10 split
                    over IDs makes it; rows_per_epoch is what the minibatches really held (the loader drops the last
                    incomplete group of 4 fetches, so it is a little smaller).
  fit_seconds       wall time of model.fit(), including dataset setup, validation, tensorboard and checkpoints
                    (and the tracing below, when on).
  trace             with --trace: per finished epoch (but the last, after which no train step runs), the held-out
                    FOSCTTM of the model as it stands and the Unix time it was taken, less the time all earlier
                    tracing took (fit_started / fit_ended are on the same clock, fit_ended less all tracing);
                    traced_seconds is that total. encode_data runs in eval mode (posterior means, no dropout) with
                    an unshuffled loader, and train_step switches back to train mode.
  fit_cpu_seconds   CPU time (user + system) of the process during fit; fit_cpu_seconds / fit_seconds well below
                    --threads while other processes run means the wall time is inflated by contention.
  cells_per_second  epochs_run x n_ids_train / fit_seconds (the figure benchmark.md section B quotes).
  --embeddings      .npz (with --encode NAME=PATH, files prepared as --mod's): NAME = encode_data's posterior means
                    (all subspaces, not L2-normalised) of every cell of the --encode file of NAME, in file order,
                    NAME_obs_names its obs_names; train_NAME / train_NAME_obs_names the same for the --mod file.
  peak_rss_gb       resource.getrusage(RUSAGE_SELF).ru_maxrss of the whole process (data loading included).
  foscttm, top1     on the held-out pairs, from posterior means (encode_data): with d the euclidean distance matrix
                    between x (first-column cells) and y (their partners), FOSCTTM = mean of
                    mean_i #{j: d[i,j] < d[i,i]}/n and mean_j #{i: d[i,j] < d[j,j]}/n; top1 = share of i whose
                    nearest y is its partner. null without --heldout.

Timing caveat: torch's OpenMP threads spin while waiting. When other processes share the 2 cores, --threads 2 then
burns 3-5x the CPU per epoch and the wall time balloons (seen: 25-30 s/epoch instead of ~2.6 s on the 3,000-cell
synthetic set). Take throughput figures on an otherwise idle machine; fit_cpu_seconds shows whether it was.
OMP_WAIT_POLICY=PASSIVE in the environment softens this (it is passed through, not set here).
"""

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

PRESETS = {
    "defaults": {
        "model": {"shared_batches": True},  # everything else: SCCLUEModel's own defaults
        "compile": {},
        "random_seed": 0,
    },
    "competition_cite": {
        "model": {
            "latent_dim": 20,
            "x2u_h_depth": 2,
            "x2u_h_dim": 512,
            "u2x_h_depth": 1,
            "u2x_h_dim": 128,
            "du_h_depth": 2,
            "du_h_dim": 128,
            "dropout": 0.2,
            "shared_batches": True,
        },
        "compile": {
            "lam_data": 1.0,
            "lam_kl": 1.0,
            "lam_joint_cross": 2.0,
            "lam_cos": 1.0,
            "lam_align": 2.0,
        },
        "random_seed": 5,
    },
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
      "--mod", action="append", default=[], metavar="NAME=PATH",
      help="a modality: name and prepared .h5ad; repeat, in order (the first two define --heldout's columns)",
  )
  parser.add_argument("--synthetic", type=int, metavar="N_CELLS",
                      help="instead of --mod: a fully paired synthetic rna (2000) + adt (100) data set")
  parser.add_argument("--heldout", metavar="PAIRS.tsv", help="held-out pairs: first-mod obs_name <TAB> partner")
  parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
  parser.add_argument("--max-epochs", type=int, help="fit(max_epochs=...); AUTO when left out")
  for flag in ("align-burnin", "patience", "reduce-lr-patience"):
    parser.add_argument(f"--{flag}", type=int, help=f"fit({flag.replace('-', '_')}=...); AUTO when left out")
  parser.add_argument("--shared-batches", choices=["true", "false"],
                      help="override the preset's shared_batches (the discriminator's batch condition)")
  parser.add_argument("--seed", type=int, help="random seed (default: the preset's random_seed)")
  parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (default 2)")
  parser.add_argument("--trace", action="store_true",
                      help="with --heldout: the held-out FOSCTTM after every epoch, with its wall-clock time")
  parser.add_argument("--encode", action="append", default=[], metavar="NAME=PATH",
                      help="cells of modality NAME to encode after training (prepared as --mod); with --embeddings")
  parser.add_argument("--embeddings", metavar="EMB.npz", help="posterior means of the --encode and --mod cells")
  parser.add_argument("--out", required=True, metavar="RESULT.json")
  args = parser.parse_args(argv)
  if bool(args.encode) != bool(args.embeddings) or (args.encode and not args.mod):
    parser.error("--encode and --embeddings go together, with --mod")
  if bool(args.mod) == (args.synthetic is not None):
    parser.error("give either --mod (at least two) or --synthetic")
  if args.mod and len(args.mod) < 2:
    parser.error("give at least two --mod")
  if args.heldout and not args.mod:
    parser.error("--heldout needs --mod")
  if args.trace and not args.heldout:
    parser.error("--trace needs --heldout")
  return args


def load_modalities(specs):
  """Reads NAME=PATH specs into {name: AnnData} with float32 counts and encoder inputs."""
  import anndata as ad
  import numpy as np
  import scipy.sparse as sp

  adatas = {}
  for spec in specs:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
      raise SystemExit(f"--mod expects NAME=PATH, got {spec!r}")
    if name in adatas:
      raise SystemExit(f"modality {name!r} given twice")
    adata = ad.read_h5ad(path)
    for key, where in (("counts", adata.layers), ("X_rep", adata.obsm), ("batch", adata.obs)):
      if key not in where:
        raise SystemExit(f"{path}: missing {key!r}")
    counts = adata.layers["counts"]
    adata.layers["counts"] = counts.astype(np.float32) if sp.issparse(counts) else np.asarray(counts, np.float32)
    adata.obsm["X_rep"] = np.asarray(adata.obsm["X_rep"], dtype=np.float32)
    if adata.obs["batch"].dtype.name != "category":
      adata.obs["batch"] = adata.obs["batch"].astype("category")
    if not adata.obs_names.is_unique:
      raise SystemExit(f"{path}: obs_names are not unique")
    adatas[name] = adata
  categories = [list(a.obs["batch"].cat.categories) for a in adatas.values()]
  if any(c != categories[0] for c in categories):
    raise SystemExit(f"batch categories differ between modalities: {categories}")
  return adatas


def synthetic_modalities(n_cells, seed):
  """A fully paired rna (2000 features, sparse) + adt (100 features, dense) data set with NB counts.

  Counts are gamma-Poisson (NB, inverse dispersion 5) around 10 cluster profiles with a small batch shift and a
  log-normal library size; 2 batches (alternating cells); obsm["X_rep"] = 100-d standard normal noise (throughput
  only, so the encoder input needs no structure).
  """
  import anndata as ad
  import numpy as np
  import pandas as pd
  import scipy.sparse as sp

  rng = np.random.default_rng(seed)
  cluster = rng.integers(0, 10, size=n_cells)
  batch = np.arange(n_cells) % 2
  obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
  obs["batch"] = pd.Categorical(np.array(["b0", "b1"])[batch], categories=["b0", "b1"])
  adatas = {}
  for name, n_features, depth, sparse in (("rna", 2000, 2000.0, True), ("adt", 100, 1000.0, False)):
    profile = rng.normal(0.0, 1.0, size=(10, n_features)) + rng.normal(0.0, 1.5, size=n_features)
    shift = rng.normal(0.0, 0.2, size=(2, n_features))
    logits = profile[cluster] + shift[batch]
    rate = np.exp(logits - logits.max(axis=1, keepdims=True))
    rate /= rate.sum(axis=1, keepdims=True)
    rate *= depth * rng.lognormal(0.0, 0.3, size=(n_cells, 1))
    counts = rng.poisson(rng.gamma(5.0, rate / 5.0)).astype(np.float32)
    adata = ad.AnnData(
        X=sp.csr_matrix(counts) if sparse else counts,
        obs=obs.copy(),
        var=pd.DataFrame(index=[f"{name}{j}" for j in range(n_features)]),
    )
    adata.layers["counts"] = adata.X
    adata.obsm["X_rep"] = rng.normal(size=(n_cells, 100)).astype(np.float32)
    adatas[name] = adata
  return adatas


def read_pairs(path, first, second):
  """Indices (into first, into second) of the held-out pairs, in file order."""
  import pandas as pd

  pairs = pd.read_csv(path, sep="\t", header=None, dtype=str)
  if pairs.shape[1] != 2 or len(pairs) == 0:
    raise SystemExit(f"{path}: expected two tab-separated columns and at least one row")
  idx_x = first.obs_names.get_indexer(pairs[0])
  idx_y = second.obs_names.get_indexer(pairs[1])
  if (idx_x < 0).any() or (idx_y < 0).any():
    raise SystemExit(f"{path}: {(idx_x < 0).sum()} + {(idx_y < 0).sum()} names not found in the two modalities")
  return idx_x, idx_y


def matching_metrics(x, y):
  """(FOSCTTM, top-1) of paired rows x[i] <-> y[i] under euclidean distance."""
  import numpy as np
  from scipy.spatial.distance import cdist

  d = cdist(x.astype(np.float64), y.astype(np.float64))
  true = np.diag(d)
  n = d.shape[0]
  foscttm_x = ((d < true[:, None]).sum(axis=1) / n).mean()
  foscttm_y = ((d < true[None, :]).sum(axis=0) / n).mean()
  top1 = (d.argmin(axis=1) == np.arange(n)).mean()
  return float((foscttm_x + foscttm_y) / 2), float(top1)


def process_cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def main(argv=None):
  args = parse_args(argv)
  # Thread caps must be in the environment before numpy / torch load their thread pools.
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(args.threads)

  import numpy as np
  import scglue
  import torch

  preset = PRESETS[args.preset]
  seed = preset["random_seed"] if args.seed is None else args.seed
  torch.set_num_threads(args.threads)
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)

  if args.synthetic is not None:
    adatas = synthetic_modalities(args.synthetic, seed)
  else:
    adatas = load_modalities(args.mod)
  names = list(adatas)
  for adata in adatas.values():
    scglue.models.configure_dataset(
        adata, "NB", use_highly_variable=False, use_layer="counts", use_rep="X_rep", use_batch="batch",
        use_obs_names=True,
    )
  n_ids = len(set().union(*(set(a.obs_names) for a in adatas.values())))
  n_ids_train = int(round(0.9 * n_ids))  # fit()'s default val_split = 0.1, split over cell IDs

  model_kwargs = dict(preset["model"])
  if args.shared_batches:
    model_kwargs["shared_batches"] = args.shared_batches == "true"
  model = scglue.models.SCCLUEModel(adatas, random_seed=seed, **model_kwargs)
  model.compile(**preset["compile"])

  # Count epochs and minibatch rows: wrap the trainer's train_step on the instance (ignite's Engine is built from
  # trainer.train_step when fit() starts, so it picks up the wrapper).
  seen = {"epoch": 0, "iterations": 0, "rows": 0}
  train_step = model.trainer.train_step
  trace, traced_seconds = [], [0.0]
  heldout = read_pairs(args.heldout, adatas[names[0]], adatas[names[1]]) if args.heldout else None

  def held_out_scores():
    return matching_metrics(model.encode_data(names[0], adatas[names[0]])[heldout[0]],
                            model.encode_data(names[1], adatas[names[1]])[heldout[1]])

  def record_epoch(epoch):
    """Epoch `epoch` has finished: its held-out FOSCTTM, timed at the wall clock less the time spent tracing."""
    started = time.time()
    foscttm_now, _ = held_out_scores()  # encode_data switches to eval mode; train_step switches back.
    trace.append({"epoch": epoch, "time": started - traced_seconds[0], "foscttm": foscttm_now})
    traced_seconds[0] += time.time() - started

  def counting_train_step(engine, data):
    if args.trace and engine.state.epoch > seen["epoch"] > 0:
      record_epoch(seen["epoch"])
    seen["epoch"] = max(seen["epoch"], engine.state.epoch)
    seen["iterations"] += 1
    seen["rows"] += int(data[0].shape[0])
    return train_step(engine, data)

  model.trainer.train_step = counting_train_step

  fit_kwargs = {key: getattr(args, key) for key in ("max_epochs", "align_burnin", "patience", "reduce_lr_patience")
                if getattr(args, key) is not None}
  with tempfile.TemporaryDirectory(prefix="reference_scglue_") as directory:
    cpu_start = process_cpu_seconds()
    start = time.perf_counter()
    fit_started = time.time()
    model.fit(adatas, directory=directory, **fit_kwargs)
    fit_seconds = time.perf_counter() - start
    fit_ended = time.time() - traced_seconds[0]
    fit_cpu_seconds = process_cpu_seconds() - cpu_start
  epochs_run = seen["epoch"]

  foscttm = top1 = None
  n_heldout = None
  if args.heldout:
    foscttm, top1 = held_out_scores()  # The final model: fit() restores its best checkpoint.
    n_heldout = int(len(heldout[0]))

  if args.embeddings:
    encoded = {}
    for name, adata in load_modalities(args.encode).items():
      if name not in adatas:
        raise SystemExit(f"--encode {name}: not a --mod modality ({names})")
      for prefix, cells in (("", adata), ("train_", adatas[name])):
        encoded[f"{prefix}{name}"] = model.encode_data(name, cells).astype(np.float32)
        encoded[f"{prefix}{name}_obs_names"] = np.asarray(cells.obs_names, str)
    np.savez(args.embeddings, **encoded)

  result = {
      "preset": args.preset,
      "seed": seed,
      "max_epochs": args.max_epochs,
      "epochs_run": epochs_run,
      "n_ids": n_ids,
      "n_ids_train": n_ids_train,
      "rows_per_epoch": seen["rows"] / epochs_run if epochs_run else None,
      "iterations": seen["iterations"],
      "fit_seconds": fit_seconds,
      "fit_started": fit_started,
      "fit_ended": fit_ended,
      "traced_seconds": traced_seconds[0],
      "trace": trace,
      "fit_cpu_seconds": fit_cpu_seconds,
      "seconds_per_epoch": fit_seconds / epochs_run if epochs_run else None,
      "cells_per_second": epochs_run * n_ids_train / fit_seconds,
      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
      "foscttm": foscttm,
      "top1": top1,
      "n_heldout": n_heldout,
      "modalities": {k: list(a.shape) for k, a in adatas.items()},
      "synthetic": args.synthetic,
      "threads": args.threads,
      "scglue_version": scglue.__version__,
      "torch_version": torch.__version__,
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  json.dump(result, sys.stdout, indent=2)
  print()


if __name__ == "__main__":
  main()
