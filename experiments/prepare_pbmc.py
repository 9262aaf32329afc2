"""Builds the embedded PBMC data (`clue_jax/datasets/pbmc_totalvi/`) from the totalVI CSV files.

Usage: python experiments/prepare_pbmc.py --src DIR_WITH_CSV_GZ --out clue_jax/datasets/pbmc_totalvi

The inputs are the three features x cells CSVs of YosefLab/totalVI_reproducibility (`data/raw_data/`):
`pbmc10k_harmo_rna.csv.gz`, `pbmc10k_harmo_pro.csv.gz` (same cells) and `pbmc5k_harmo_rna.csv.gz` (RNA only).
Barcodes get the dataset name as a suffix (11 barcodes occur in both datasets). The outputs are
`rna.h5ad` (10,849 cells x 4,000 genes) and `adt.h5ad` (6,855 cells x 14 proteins), raw integer counts in a
sparse `X`, and `obs["batch"]` with the categories ["pbmc10k", "pbmc5k"] in both files.
"""

import argparse
import pathlib

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

BATCHES = ["pbmc10k", "pbmc5k"]


def read_counts(path: pathlib.Path, dataset: str) -> ad.AnnData:
  table = pd.read_csv(path, index_col=0).T
  counts = sp.csr_matrix(table.to_numpy(dtype=np.float32))
  obs = pd.DataFrame(index=[f"{barcode}-{dataset}" for barcode in table.index])
  obs["batch"] = pd.Categorical([dataset] * len(obs), categories=BATCHES)
  return ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=table.columns.astype(str)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--src", type=pathlib.Path, required=True)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  rna10k = read_counts(args.src / "pbmc10k_harmo_rna.csv.gz", "pbmc10k")
  rna5k = read_counts(args.src / "pbmc5k_harmo_rna.csv.gz", "pbmc5k")
  adt10k = read_counts(args.src / "pbmc10k_harmo_pro.csv.gz", "pbmc10k")
  if not (rna10k.obs_names == adt10k.obs_names).all():
    raise ValueError("RNA and protein files of pbmc10k list different cells")
  if not (rna10k.var_names == rna5k.var_names).all():
    raise ValueError("pbmc10k and pbmc5k RNA files list different genes")
  rna = ad.concat([rna10k, rna5k], merge="same")
  rna.obs["batch"] = pd.Categorical(rna.obs["batch"].astype(str), categories=BATCHES)
  rna.write_h5ad(args.out / "rna.h5ad", compression="gzip")
  adt10k.write_h5ad(args.out / "adt.h5ad", compression="gzip")
  print(f"rna {rna.shape}, adt {adt10k.shape} -> {args.out}")


if __name__ == "__main__":
  main()
