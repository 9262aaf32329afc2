"""Writes an atlas-scale paired dataset (CITE-like RNA + ADT or Multiome-like RNA + ATAC) resampled from real cells.

  python experiments/make_atlas.py --kind cite|multiome --source PATH --cells N --out DIR [--seed 0] [--batches 8]
      [--batch-effect 0.2] [--chunk 10000]

Each new cell copies a real cell of the paired source .h5mu `--source` (measured with the 5,000-cell NeurIPS 2021
BMMC sets: `neurips2021_bmmc_{cite,multiome}_5k/*.h5mu` of the project's shared data, modalities rna + adt / atac),
drawn uniformly with replacement: its non-zero pattern in every modality, so the spread of non-zeros per cell is the
real one, and its `cell_type`. Counts x are redrawn as 1 + Poisson(max(x * s - 1, 0)): kept >= 1 (the pattern stays)
with mean max(x * s, 1); ATAC peaks stay binary (copied as they are). Cells are spread uniformly over `--batches`
synthetic batches (`atlas_b0`, ...); batch b scales the RNA and ADT means by s = exp(d_b + e_bj), d_b and e_bj drawn
from N(0, batch_effect^2) (a depth effect and a per-feature effect).

Output: `DIR/rna.h5ad` and `DIR/adt.h5ad` (cite) or `DIR/atac.h5ad` (multiome), the raw integer counts as float32 CSR
in `X` and no "counts" layer (anndata reads layers whole, even with backed="r", so a second copy there would double
the memory); train with `--config.data.modalities.<m>.layer=X`. Every file has the same obs_names (`cell_000123`),
obs `batch`, `cell_type`, `source_batch` and `source_cell` (categorical) and the source's var. The rows are written
`--chunk` cells at a time with h5py in the AnnData on-disk layout, so memory stays small at millions of cells. The
output depends only on the arguments other than `--chunk` and `--out`. Prints the sizes, the wall time and peak RSS.
"""

import argparse
import contextlib
import pathlib
import resource
import time

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm import tqdm

KINDS = {"cite": ("rna", "adt"), "multiome": ("rna", "atac")}  # The source's modalities of each kind.
BINARY = {"atac"}  # Modalities copied as they are (0/1 peaks).
H5_CHUNK = 1 << 20  # Elements per HDF5 chunk of X/data and X/indices (4 MiB).


def read_source(path: pathlib.Path, names: tuple) -> dict:
  """The modalities `names` of the .h5mu at `path` as AnnData, X float32 CSR, checked paired and holding counts."""
  with h5py.File(path, "r") as f:
    mods = {name: ad.io.read_elem(f["mod"][name]) for name in names}
  first = mods[names[0]]
  for name, adata in mods.items():
    if not adata.obs_names.equals(first.obs_names):
      raise ValueError(f"{path}: modalities {names[0]} and {name} list different cells")
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.eliminate_zeros()
    values = adata.X.data
    if (values < 0).any() or (values != np.rint(values)).any() or (name in BINARY and (values != 1).any()):
      raise ValueError(f"{path}: mod/{name} X holds no raw {'0/1' if name in BINARY else 'integer'} counts")
  return mods


def batch_scale(rng: np.random.Generator, batches: int, n_features: int, sigma: float) -> np.ndarray:
  """Per-batch, per-feature mean factors exp(d_b + e_bj), d and e ~ N(0, sigma^2)."""
  return np.exp(rng.normal(0, sigma, (batches, 1)) + rng.normal(0, sigma, (batches, n_features)))


def resample(x: sp.csr_matrix, rows: np.ndarray, batch: np.ndarray, scale, rng) -> sp.csr_matrix:
  """Rows `rows` of the source counts `x`, their counts redrawn with the factors `scale` of each row's `batch` (kept
  as they are when `scale` is None)."""
  out = x[rows]
  if scale is not None:
    mean = out.data * scale[np.repeat(batch, np.diff(out.indptr)), out.indices]
    out.data = (1 + rng.poisson(np.maximum(mean - 1, 0))).astype(np.float32)
  return out


def create_h5ad(path: pathlib.Path, indptr: np.ndarray, var: pd.DataFrame, obs: pd.DataFrame) -> h5py.File:
  """An open .h5ad with obs, var and a CSR `X` whose indptr is `indptr` and whose data/indices are still to fill.
  indptr and indices are int32, or both int64 past 2^31 - 1 non-zeros (scipy rejects mixed index types)."""
  index_dtype = np.int32 if indptr[-1] < 2 ** 31 else np.int64
  f = h5py.File(path, "w")
  f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
  x = f.create_group("X")
  x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                  "shape": np.array([len(obs), len(var)], dtype=np.int64)})
  for name, dtype in (("data", np.float32), ("indices", index_dtype)):
    x.create_dataset(name, shape=(indptr[-1],), dtype=dtype, maxshape=(None,),
                     chunks=(max(1, min(H5_CHUNK, indptr[-1])),))
  x.create_dataset("indptr", data=indptr.astype(index_dtype), maxshape=(None,), chunks=(min(H5_CHUNK, len(indptr)),))
  ad.io.write_elem(f, "obs", obs)
  ad.io.write_elem(f, "var", var)
  for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
    ad.io.write_elem(f, key, {})
  return f


def atlas_obs(source_obs: pd.DataFrame, source: np.ndarray, batch: np.ndarray, batches: int) -> pd.DataFrame:
  """obs of the new cells: their synthetic batch and the source cell's type, batch and name."""
  width = max(6, len(str(len(source) - 1)))
  obs = pd.DataFrame(index=pd.Index([f"cell_{i:0{width}d}" for i in range(len(source))]))
  obs["batch"] = pd.Categorical.from_codes(batch, [f"atlas_b{b}" for b in range(batches)])
  for column, key in (("cell_type", "cell_type"), ("source_batch", "batch")):
    values = source_obs[key].astype("category")
    obs[column] = pd.Categorical.from_codes(values.cat.codes.to_numpy()[source], values.cat.categories)
  obs["source_cell"] = pd.Categorical.from_codes(source, source_obs.index)
  return obs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kind", choices=sorted(KINDS), required=True)
  parser.add_argument("--cells", type=int, required=True)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--batch-effect", type=float, default=0.2, help="sd of the log batch factors; 0 = none")
  parser.add_argument("--chunk", type=int, default=10_000, help="cells generated and written at a time")
  parser.add_argument("--source", type=pathlib.Path, required=True, help="paired .h5mu to resample")
  args = parser.parse_args()
  if min(args.cells, args.batches, args.chunk) < 1:
    parser.error("--cells, --batches and --chunk must be positive")
  started = time.time()
  names = KINDS[args.kind]
  mods = read_source(args.source, names)
  first = mods[names[0]]
  plan = np.random.default_rng([args.seed, 0])
  source = plan.integers(0, first.n_obs, args.cells)
  batch = plan.integers(0, args.batches, args.cells)
  obs = atlas_obs(first.obs, source, batch, args.batches)
  rngs = {name: np.random.default_rng([args.seed, 1 + i]) for i, name in enumerate(names)}
  scales = {name: None if name in BINARY else batch_scale(rngs[name], args.batches, mods[name].n_vars,
                                                          args.batch_effect) for name in names}
  lengths = {name: np.diff(mods[name].X.indptr)[source] for name in names}
  indptrs = {name: np.concatenate([[0], np.cumsum(lengths[name], dtype=np.int64)]) for name in names}
  args.out.mkdir(parents=True, exist_ok=True)
  paths = {name: args.out / f"{name}.h5ad" for name in names}
  with contextlib.ExitStack() as stack:
    files = {name: stack.enter_context(create_h5ad(paths[name], indptrs[name], mods[name].var, obs))
             for name in names}
    with tqdm(total=args.cells, unit="cells", unit_scale=True, desc=f"{args.kind} -> {args.out}") as bar:
      for start in range(0, args.cells, args.chunk):
        stop = min(start + args.chunk, args.cells)
        for name in names:
          block = resample(mods[name].X, source[start:stop], batch[start:stop], scales[name], rngs[name])
          lo, hi = indptrs[name][start], indptrs[name][stop]
          files[name]["X/data"][lo:hi] = block.data
          files[name]["X/indices"][lo:hi] = block.indices  # h5py casts to the dataset's type.
        bar.update(stop - start)
  print(f"{args.cells:,} cells in {args.batches} batches, resampled from {first.n_obs:,} cells of {args.source}")
  for name in names:
    real = np.diff(mods[name].X.indptr)
    print(f"  {paths[name]}: {args.cells:,} x {mods[name].n_vars:,}, nnz {indptrs[name][-1]:,}, non-zeros per cell "
          f"mean {lengths[name].mean():.1f} max {lengths[name].max():,} (source mean {real.mean():.1f} max "
          f"{real.max():,}), {paths[name].stat().st_size / 2 ** 20:,.0f} MiB")
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux.
  print(f"wall {time.time() - started:.1f} s, peak RSS {peak_gib:.2f} GiB")


if __name__ == "__main__":
  main()
