"""Times the PyTorch reference, scglue 0.4.1's SCCLUEModel, stage by stage on a paired atlas, for one epoch.

This script is NOT part of clue_jax and scglue is NOT a project dependency. It runs in a separate virtualenv and only
calls the public APIs of anndata, scanpy and scglue (configure_dataset, data.lsi, SCCLUEModel, compile, fit,
encode_data); no scglue source is copied here. It imports nothing from this repository.

It runs the reference the way a user following the scglue 0.4.1 tutorials would, on the two .h5ad files of an atlas
written by experiments/make_atlas.py (raw counts in X as float32 CSR, obs "batch" and "cell_type", the same
obs_names in both files, so every cell is paired), and reports the wall time and memory of every stage, so that a
benchmark can set it beside clue_jax at 100k, 300k and 1M cells. Stages:

  import      import anndata, scanpy, torch and scglue; seed python / numpy / torch.
  read        anndata.read_h5ad of both files, whole.
  preprocess  docs/preprocessing.ipynb ("Stage 1: Data preprocessing", identical at tag v0.4.1 of gao-lab/GLUE):
                RNA:  layers["counts"] = X.copy(); sc.pp.highly_variable_genes(n_top_genes=2000, flavor="seurat_v3");
                      sc.pp.normalize_total; sc.pp.log1p; sc.pp.scale; sc.tl.pca(n_comps=100, svd_solver="auto").
                ADT:  (no ADT recipe in the tutorials) the RNA recipe without feature selection: layers["counts"],
                      all proteins highly_variable, normalize_total, log1p, scale, pca(n_comps=min(100, n_vars - 1)).
                ATAC: layers["counts"] = X.copy(); scglue.data.lsi(n_components=100, n_iter=15) on all peaks (run
                      before highly_variable exists, as in the tutorial); then all peaks highly_variable, or the
                      30,000 with the largest total counts if there are more (the tutorial marks them from a
                      guidance graph, which CLUE does not use; 30,000 is the competition's choice).
  configure   scglue.models.configure_dataset, as in docs/training.ipynb ("Configure data"), plus batch and pairing:
              "NB", use_highly_variable=True, use_layer="counts", use_rep="X_pca" (RNA, ADT) / "X_lsi" (ATAC),
              use_batch="batch", use_obs_names=True.
  build       SCCLUEModel(...) and compile(...) at the 2021 competition's sizes and weights for the kind
              (docs/method.md sections 1.5 and 2; cite as experiments/reference_scglue.py's competition_cite):
                cite:     latent_dim 20, encoders 2x512, decoders 1x128, discriminator 2x128, dropout 0.2,
                          shared_batches; compile(lam_data=1, lam_kl=1, lam_joint_cross=2, lam_cos=1, lam_align=2).
                multiome: latent_dim 50, encoders 2x512, decoders 1x256, discriminator 1x256, dropout 0.2,
                          shared_batches; compile(lam_data=1, lam_kl=0.3, lam_joint_cross=1, lam_cos=0.02,
                          lam_align=0.02).
              random_seed is --seed (not the competition's 5 / 2); other lambdas and lr at the library defaults.
  fit         model.fit(max_epochs=1, batch_size=128), val_split 0.1, checkpoints in a temporary directory. With one
              epoch the AUTO burn-in is never reached, so no early stopping, checkpoint or LR change happens.
  encode      model.encode_data for every cell of both modalities (embeddings kept in memory, not written).

Output (--out, JSON), rewritten after every stage:
  stages        {name: {seconds, peak_rss_gb, rss_gb}} for every stage that ran, the failed one included:
                seconds = wall time of the stage, peak_rss_gb = resource.getrusage(RUSAGE_SELF).ru_maxrss of the
                process so far, rss_gb = VmRSS from /proc/self/status at the stage's end (GB = 2^30 bytes).
  running_stage the stage in progress when the file was written, null once the run is over; a file left with a
                running_stage means the process was killed there (e.g. SIGKILL by the OOM killer).
  failed_stage, error  the stage that raised (MemoryError, SIGTERM, any exception) and "Type: message"; the
                traceback goes to stderr. The script then stops and still exits 0. Python handles SIGTERM only
                between bytecodes: a stage busy inside one long C call (sc.pp.scale, PCA, LSI) records it when that
                call returns, so a caller should follow SIGTERM with SIGKILL after a grace period, then read
                running_stage. Under an address-space cap (ulimit -v) a failed allocation inside scipy's LU (in
                sc.tl.pca's randomized solver) was seen swallowed ("Exception ignored"), the process then spinning
                in preprocess without end: cap memory with a cgroup, or give the run a wall-clock limit.
  cells, features, highly_variable (decoder features per modality), train_cells (round(0.9 x cells), fit()'s
  training split), cells_per_s (train_cells / fit seconds, the whole of fit() for its single epoch: dataset setup
  and validation included; null unless fit finished), epochs_run and train_rows (counted in the trainer's
  train_step: 1, and the rows the minibatches held, a little under train_cells as the loader drops the last
  incomplete group of fetches), embedding_shapes, kind, seed, threads, inputs, versions.
The result is also printed to stdout, after scglue's log lines.

Reference environment (CPU; pip took torch 2.13.0+cpu from the machine's local wheel directory, so no multi-GB CUDA
build; scikit-misc is needed by flavor="seurat_v3" and is not pulled in by scanpy; "Location file:///opt... is
ignored" warnings can be ignored):

  python3 -m venv /tmp/ref
  /tmp/ref/bin/pip install torch==2.13.0 scglue==0.4.1 scanpy
  /tmp/ref/bin/pip install scikit-misc

That resolved (Dec 2026, Python 3.11) to torch 2.13.0+cpu, scanpy 1.11.5, anndata 0.12.19, numpy 2.4.6, scipy 1.17.1,
scikit-learn 1.9.1, numba 0.68.1, pytorch-ignite 0.5.5, scikit-misc 0.5.3.

Usage:

  /tmp/ref/bin/python experiments/reference_atlas.py --kind cite --rna DIR/rna.h5ad --other DIR/adt.h5ad \
      --out RESULT.json [--threads 2] [--seed 0]
  /tmp/ref/bin/python experiments/reference_atlas.py --kind multiome --rna DIR/rna.h5ad --other DIR/atac.h5ad \
      --out RESULT.json

--threads caps OpenMP / BLAS / numba threads (set in the environment before numpy loads) and torch's.
"""

import argparse
import importlib.metadata
import json
import os
import random
import resource
import signal
import sys
import tempfile
import time
import traceback

OTHER = {"cite": "adt", "multiome": "atac"}  # The second modality of each kind.
MAX_PEAKS = 30_000  # ATAC decoder features: the peaks with the largest total counts, if there are more.
MODEL = {
    "cite": {
        "model": {"latent_dim": 20, "x2u_h_depth": 2, "x2u_h_dim": 512, "u2x_h_depth": 1, "u2x_h_dim": 128,
                  "du_h_depth": 2, "du_h_dim": 128, "dropout": 0.2, "shared_batches": True},
        "compile": {"lam_data": 1.0, "lam_kl": 1.0, "lam_joint_cross": 2.0, "lam_cos": 1.0, "lam_align": 2.0},
    },
    "multiome": {
        "model": {"latent_dim": 50, "x2u_h_depth": 2, "x2u_h_dim": 512, "u2x_h_depth": 1, "u2x_h_dim": 256,
                  "du_h_depth": 1, "du_h_dim": 256, "dropout": 0.2, "shared_batches": True},
        "compile": {"lam_data": 1.0, "lam_kl": 0.3, "lam_joint_cross": 1.0, "lam_cos": 0.02, "lam_align": 0.02},
    },
}
VAL_SPLIT = 0.1
BATCH_SIZE = 128


class Terminated(Exception):
  """Raised in the running stage when the process gets SIGTERM."""


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--kind", choices=sorted(OTHER), required=True)
  parser.add_argument("--rna", required=True, metavar="FILE.h5ad", help="the atlas's RNA file")
  parser.add_argument("--other", required=True, metavar="FILE.h5ad", help="the atlas's ADT (cite) or ATAC file")
  parser.add_argument("--out", required=True, metavar="RESULT.json")
  parser.add_argument("--threads", type=int, default=2, help="torch / BLAS / numba threads (default 2)")
  parser.add_argument("--seed", type=int, default=0, help="random seed of the model, split and shuffling")
  return parser.parse_args(argv)


def memory_gb():
  """(peak RSS of the process so far, current RSS), in GB."""
  with open("/proc/self/status") as f:
    current_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, current_kb / 1024**2


def write_json(result, path):
  """Writes `result` to `path` atomically, so a kill never leaves half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)


def import_libraries(args, state, result):
  """Imports the reference's libraries, records their versions, seeds them and caps torch's threads."""
  # Imported here, unused, so that their load time and memory count in this stage rather than in later ones.
  import anndata  # noqa: F401
  import numpy as np
  import scanpy  # noqa: F401
  import scglue  # noqa: F401
  import torch

  torch.set_num_threads(args.threads)
  random.seed(args.seed)
  np.random.seed(args.seed)
  torch.manual_seed(args.seed)
  result["versions"] = {name: importlib.metadata.version(name) for name in ("scglue", "torch", "scanpy", "anndata")}


def read(args, state, result):
  """Reads both files whole and checks that they list the same cells."""
  import anndata as ad

  rna, other = ad.read_h5ad(args.rna), ad.read_h5ad(args.other)
  if not rna.obs_names.equals(other.obs_names):
    raise ValueError(f"{args.rna} and {args.other} list different cells")
  state["adatas"] = {"rna": rna, OTHER[args.kind]: other}
  result["cells"] = rna.n_obs
  result["features"] = {name: adata.n_vars for name, adata in state["adatas"].items()}


def normalize_scale_pca(adata, n_comps):
  """The tutorial's RNA steps after feature selection: normalize_total, log1p, scale, pca."""
  import scanpy as sc

  sc.pp.normalize_total(adata)
  sc.pp.log1p(adata)
  sc.pp.scale(adata)
  sc.tl.pca(adata, n_comps=n_comps, svd_solver="auto")


def preprocess(args, state, result):
  """Stage 1 of the scglue tutorial for RNA and ATAC, and its RNA recipe for ADT (all proteins kept)."""
  import numpy as np
  import scanpy as sc
  import scglue

  rna = state["adatas"]["rna"]
  rna.layers["counts"] = rna.X.copy()
  sc.pp.highly_variable_genes(rna, n_top_genes=2000, flavor="seurat_v3")
  normalize_scale_pca(rna, 100)

  other = state["adatas"][OTHER[args.kind]]
  other.layers["counts"] = other.X.copy()
  if args.kind == "cite":
    other.var["highly_variable"] = True
    normalize_scale_pca(other, min(100, other.n_vars - 1))
  else:
    scglue.data.lsi(other, n_components=100, n_iter=15)
    totals = np.asarray(other.layers["counts"].sum(axis=0)).ravel()
    keep = np.ones(other.n_vars, dtype=bool)
    if other.n_vars > MAX_PEAKS:
      keep[:] = False
      keep[np.argsort(-totals, kind="stable")[:MAX_PEAKS]] = True
    other.var["highly_variable"] = keep
  result["highly_variable"] = {name: int(a.var["highly_variable"].sum()) for name, a in state["adatas"].items()}


def configure(args, state, result):
  """configure_dataset for both modalities: NB counts of the highly variable features, paired by obs_names."""
  import scglue

  for name, adata in state["adatas"].items():
    scglue.models.configure_dataset(
        adata, "NB", use_highly_variable=True, use_layer="counts", use_rep="X_lsi" if name == "atac" else "X_pca",
        use_batch="batch", use_obs_names=True,
    )


def build(args, state, result):
  """SCCLUEModel and compile() at the competition's settings for the kind."""
  import scglue

  settings = MODEL[args.kind]
  state["model"] = scglue.models.SCCLUEModel(state["adatas"], random_seed=args.seed, **settings["model"])
  state["model"].compile(**settings["compile"])


def fit(args, state, result):
  """One epoch of model.fit, batch 128; checkpoints go to a temporary directory. Counts epochs and minibatch rows."""
  model = state["model"]
  seen = {"epochs_run": 0, "train_rows": 0}
  train_step = model.trainer.train_step

  def counting_train_step(engine, data):
    """The trainer's train_step (ignite builds its engine from this attribute when fit() starts), counted."""
    seen["epochs_run"] = max(seen["epochs_run"], engine.state.epoch)
    seen["train_rows"] += int(data[0].shape[0])
    return train_step(engine, data)

  model.trainer.train_step = counting_train_step
  result["train_cells"] = int(round((1 - VAL_SPLIT) * result["cells"]))
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="reference_atlas_") as directory:
    model.fit(state["adatas"], val_split=VAL_SPLIT, batch_size=BATCH_SIZE, max_epochs=1, directory=directory)
  result["cells_per_s"] = result["train_cells"] / (time.perf_counter() - start)
  result.update(seen)


def encode(args, state, result):
  """Posterior means of every cell of both modalities, kept in memory."""
  state["embeddings"] = {name: state["model"].encode_data(name, adata) for name, adata in state["adatas"].items()}
  result["embedding_shapes"] = {name: list(x.shape) for name, x in state["embeddings"].items()}


STAGES = [("import", import_libraries), ("read", read), ("preprocess", preprocess), ("configure", configure),
          ("build", build), ("fit", fit), ("encode", encode)]


def main(argv=None):
  args = parse_args(argv)
  # Thread caps must be in the environment before numpy / numba / torch load their thread pools.
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(args.threads)

  def terminate(signum, frame):
    raise Terminated(f"received signal {signum}")

  signal.signal(signal.SIGTERM, terminate)
  result = {"kind": args.kind, "inputs": {"rna": args.rna, "other": args.other}, "seed": args.seed,
            "threads": args.threads, "cells": None, "stages": {}, "running_stage": None, "failed_stage": None,
            "error": None, "cells_per_s": None, "versions": None}
  state = {}
  for name, step in STAGES:
    result["running_stage"] = name
    write_json(result, args.out)
    start = time.perf_counter()
    try:
      step(args, state, result)
    except BaseException as exc:  # MemoryError, SIGTERM, Ctrl-C and library errors alike: record, then stop.
      result["failed_stage"], result["error"] = name, f"{type(exc).__name__}: {exc}"
      traceback.print_exc()
    seconds = time.perf_counter() - start
    peak_rss_gb, rss_gb = memory_gb()
    result["stages"][name] = {"seconds": seconds, "peak_rss_gb": peak_rss_gb, "rss_gb": rss_gb}
    print(f"{name}: {seconds:.1f} s, peak RSS {peak_rss_gb:.2f} GB, RSS {rss_gb:.2f} GB", file=sys.stderr, flush=True)
    if result["failed_stage"]:
      state.clear()  # Frees the data before writing, in case the failure was a lack of memory.
      break
  result["running_stage"] = None
  write_json(result, args.out)
  json.dump(result, sys.stdout, indent=2)
  print()


if __name__ == "__main__":
  main()
