"""Peak host memory and cells/s of training on a large sparse dataset (nothing densified whole).

  python experiments/bench_memory.py [--cells 200000] [--features 4000] [--epochs 1] [--host-data]
      [--devices 0] [--dir /tmp/bench_memory]

Generates (once, in `--dir`) NB-like counts: RNA cells x `--features` as a CSR .h5ad (~7 % non-zero, written in
row blocks) and 100 dense-ish ADT-like features, paired, 2 batches; then trains the library-default model for
`--epochs` with `trainer.train_and_evaluate` (data on the devices as CSR, unless --host-data) and prints
JSON: peak resident memory of this process (VmHWM), cells/s of the last epoch and the time split.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

BLOCK = 10_000


def nb_block(rng, profiles, n_cells: int) -> sp.csr_matrix:
  """NB counts (gamma-Poisson, dispersion 2) of `n_cells` cells drawn from the cluster `profiles`."""
  cluster = rng.integers(0, len(profiles), n_cells)
  mean = profiles[cluster] * rng.gamma(2.0, 0.5, (n_cells, 1))
  return sp.csr_matrix(rng.poisson(rng.gamma(2.0, mean / 2.0)).astype(np.float32))


def write_dataset(directory: pathlib.Path, n_cells: int, n_features: int, seed: int = 0) -> dict:
  paths = {"rna": directory / "rna.h5ad", "adt": directory / "adt.h5ad"}
  if all(p.exists() for p in paths.values()):
    return paths
  directory.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  # ~7 % of RNA entries non-zero: most genes nearly silent, a few highly expressed.
  rna_profiles = rng.gamma(0.12, 1.0, (20, n_features))
  adt_profiles = rng.gamma(2.0, 5.0, (20, 100))
  obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
  obs["batch"] = pd.Categorical(np.where(np.arange(n_cells) % 2, "b1", "b0"), categories=["b0", "b1"])
  for name, profiles in (("rna", rna_profiles), ("adt", adt_profiles)):
    block_rng = np.random.default_rng([seed, len(profiles[0])])
    counts = sp.vstack([nb_block(block_rng, profiles, min(BLOCK, n_cells - s)) for s in range(0, n_cells, BLOCK)],
                       format="csr")
    ad.AnnData(X=counts, obs=obs).write_h5ad(paths[name])
    print(f"{name}: {counts.shape}, {counts.nnz / np.prod(counts.shape):.1%} non-zero", flush=True)
  return paths


def peak_rss_gb() -> float:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) / 2 ** 20
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cells", type=int, default=200_000)
  parser.add_argument("--features", type=int, default=4000)
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--host-data", action="store_true")
  parser.add_argument("--devices", type=int, default=0)
  parser.add_argument("--dir", default="/tmp/bench_memory")
  parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  directory = pathlib.Path(args.dir) / f"{args.cells}x{args.features}"
  if args.generate_only:
    write_dataset(directory, args.cells, args.features)
    return print(f"generation peak RSS {peak_rss_gb():.2f} GB", flush=True)
  # Generated in a child process, so that the peak below is the training's.
  subprocess.run([sys.executable, __file__, "--generate-only", f"--cells={args.cells}",
                  f"--features={args.features}", f"--dir={args.dir}"], check=True)
  paths = {"rna": directory / "rna.h5ad", "adt": directory / "adt.h5ad"}

  from clue_jax import config as config_lib
  from clue_jax.train import trainer
  config = config_lib.get_config()
  config.data.modalities.rna = config_lib.modality(str(paths["rna"]), layer="X", batch_key="batch")
  config.data.modalities.adt = config_lib.modality(str(paths["adt"]), layer="X", batch_key="batch",
                                                   feature_selection="all")
  config.data.modality_order = "rna,adt"
  config.train.update(max_epochs=args.epochs, data_on_device=not args.host_data, num_devices=args.devices,
                      progress=False)
  config.evals.plots = False
  run = directory / ("run_host" if args.host_data else "run_device")
  started = time.time()
  trainer.train_and_evaluate(config, run)
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  print(json.dumps({"cells": args.cells, "features": args.features, "data_on_device": not args.host_data,
                    "peak_rss_gb": peak_rss_gb(),
                    "total_s": time.time() - started, "epoch_s": [r["time/epoch_s"] for r in records],
                    "cells_per_s_last_epoch": records[-1]["time/cells_per_s"]}, indent=2), flush=True)


if __name__ == "__main__":
  sys.exit(main())
