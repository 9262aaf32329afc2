"""Time, peak memory and agreement of the PCA solvers (`rep_solver`: randomized, gram) on real and atlas-scale RNA.

  python experiments/bench_rep_fit.py --cite BMMC_CITE_5K.h5mu --atlas ATLAS/rna.h5ad [--rep-dim 100] [--subset 100000]
      [--baseline-rev REV] [--cache /tmp/bench_rep_fit] [--cases NAME,...]

Every case runs in its own process (peak RSS = VmHWM, reset by /proc/self/clear_refs once the data are loaded and
log1p-CP10k normalised, as `rep_normalize="log1p_cp10k"` does) and prints one JSON line, which the parent echoes.
All cells are fitted (no train split), `rep_dim` components, clip 10.

- small-randomized, small-gram: both fits on the RNA of the 5k BMMC CITE set (`--cite`, mod/rna/X raw counts).
- small-agreement: the two fits against an exact dense SVD (numpy) of the same standardised, clipped matrix:
  principal-angle cosines, captured variance, and the overlap of the cells' 15 nearest neighbours in PCA space.
- atlas-gram: the gram fit on the 1M-cell atlas (`--atlas`, X raw counts); saves the Gram matrix in `--cache`.
- atlas-randomized-pass: the randomized fit on the atlas is too slow to run (~34 passes): times mean/std and ONE
  power iteration (one product with Z and one with Z.T at width rep_dim + 10, and the QR of the tall factor), and
  extrapolates to randomized_svd's 16 + 16 products and 16 tall QRs. With --baseline-rev, the same with the
  preprocess.py of that git revision (case atlas-randomized-pass@REV).
- atlas-subset-gram: the gram fit on a seeded subset of `--subset` atlas cells (as `rep_fit_cells`), scored against
  the full fit with the saved Gram (needs atlas-gram first).
"""

import argparse
import functools
import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from clue_jax.data import preprocess

CASES = ("small-randomized", "small-gram", "small-agreement", "atlas-gram", "atlas-randomized-pass",
         "atlas-subset-gram")
NORMALISE_ROWS = 100_000


def vm(field: str) -> float:
  """A Vm* line of /proc/self/status, in GB."""
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith(field + ":"):
      return int(line.split()[1]) / 1e6
  raise KeyError(field)


def reset_peak():
  pathlib.Path("/proc/self/clear_refs").write_text("5")


def load(path: pathlib.Path) -> sp.csr_matrix:
  """log1p-CP10k of the raw counts in X (of mod/rna for an .h5mu), float32 CSR, normalised in place by row blocks."""
  with h5py.File(path, "r") as f:
    counts = sp.csr_matrix(ad.io.read_elem(f["mod"]["rna"]["X"] if "mod" in f else f["X"]), dtype=np.float32)
  counts.sum_duplicates()
  for start in range(0, counts.shape[0], NORMALISE_ROWS):
    stop = min(start + NORMALISE_ROWS, counts.shape[0])
    lo, hi = counts.indptr[start], counts.indptr[stop]
    block = preprocess.log1p_cp10k(counts[start:stop])
    assert np.array_equal(block.indices, counts.indices[lo:hi])
    counts.data[lo:hi] = block.data
  return counts


def timed(module, names: tuple, times: dict):
  """Wraps module.<name> for each name so that its wall time adds up in times[name]."""
  def wrap(name, fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
      start = time.perf_counter()
      out = fn(*args, **kwargs)
      times[name] = times.get(name, 0.0) + time.perf_counter() - start
      return out
    return run

  for name in names:
    setattr(module, name, wrap(name, getattr(module, name)))


def saving(fn, path: pathlib.Path):
  """fn, also saving its result (the Gram matrix, before eigh overwrites it) at path."""
  def run(*args):
    gram = fn(*args)
    np.save(path, gram)
    return gram

  return run


def fit(x, solver: str, rep_dim: int, cache: pathlib.Path, tag: str, keep_gram: bool = False) -> dict:
  """fit_pca with a time split; saves the state (and the Gram matrix when asked) under cache."""
  times = {}
  timed(preprocess, ("_mean_std", "_standardised_gram", "_top_eigenvectors", "randomized_svd"), times)
  if keep_gram:
    preprocess._standardised_gram = saving(preprocess._standardised_gram, cache / f"{tag}_gram.npy")
  reset_peak()
  rss = vm("VmRSS")
  start = time.perf_counter()
  state = preprocess.fit_pca(x, rep_dim, solver=solver)
  total = time.perf_counter() - start
  np.savez(cache / f"{tag}.npz", **preprocess.state_to_arrays(state))
  return {"cells": x.shape[0], "features": x.shape[1], "seconds": total, "split_s": times, "rss_before_gb": rss,
          "peak_rss_gb": vm("VmHWM")}


def randomized_pass(x, rep_dim: int, module) -> dict:
  """One power iteration of randomized_svd on the chunked operator, extrapolated to the whole fit."""
  reset_peak()
  rss = vm("VmRSS")
  start = time.perf_counter()
  mean, std = module._mean_std(x)
  t_stats = time.perf_counter() - start
  z = module._standardised_operator(x, mean, std, 10.0)
  q = np.random.default_rng(0).standard_normal((x.shape[1], rep_dim + 10))
  start = time.perf_counter()
  tall = z @ q
  t_matmat = time.perf_counter() - start
  start = time.perf_counter()
  tall, _ = np.linalg.qr(tall)
  t_qr = time.perf_counter() - start
  start = time.perf_counter()
  z.T @ tall
  t_rmatmat = time.perf_counter() - start
  total = t_stats + 16 * (t_matmat + t_rmatmat + t_qr)
  return {"cells": x.shape[0], "features": x.shape[1], "seconds_extrapolated": total,
          "split_s": {"_mean_std": t_stats, "matmat": t_matmat, "rmatmat": t_rmatmat, "qr": t_qr},
          "rss_before_gb": rss, "peak_rss_gb": vm("VmHWM")}


def agreement(x, cache: pathlib.Path, rep_dim: int) -> dict:
  """Both small fits against an exact dense SVD of the same standardised, clipped matrix."""
  states = {s: preprocess.state_from_arrays(dict(np.load(cache / f"small-{s}.npz"))) for s in preprocess.PCA_SOLVERS}
  ref = states["gram"]
  assert all(np.array_equal(s.mean, ref.mean) and np.array_equal(s.std, ref.std) for s in states.values())
  z = np.clip((x.toarray().astype(np.float64) - ref.mean) / ref.std, -10.0, 10.0)
  start = time.perf_counter()
  _, sv, vt = np.linalg.svd(z, full_matrices=False)
  out = {"dense_svd_s": time.perf_counter() - start}
  best = np.square(sv[:rep_dim]).sum()
  coords = {}
  for name, state in states.items():
    cosines = np.linalg.svd(state.components @ vt[:rep_dim].T, compute_uv=False)
    captured = np.square(z @ state.components.T).sum(0)
    out[name] = {
      "min_cos_top10": float(np.linalg.svd(state.components[:10] @ vt[:10].T, compute_uv=False).min()),
      "min_cos_top50": float(np.linalg.svd(state.components[:50] @ vt[:50].T, compute_uv=False).min()),
      "min_cos_all": float(cosines.min()),
      "n_angles_over_1deg": int((cosines < np.cos(np.radians(1.0))).sum()),
      "captured_vs_best_minus_1": float(captured.sum() / best - 1.0),
      "max_rel_err_explained_variance": float(np.abs(captured / np.square(sv[:rep_dim]) - 1.0).max()),
    }
    coords[name] = preprocess.transform_pca(state, x).astype(np.float64)
  out["knn15_overlap_randomized_vs_gram"] = knn_overlap(coords["randomized"], coords["gram"], 15)
  return out


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
  """Mean fraction of each cell's k nearest neighbours (Euclidean, itself excluded) shared between a and b."""
  def neighbours(y):
    d = np.square(y).sum(1)[:, None] - 2.0 * y @ y.T + np.square(y).sum(1)[None]
    np.fill_diagonal(d, np.inf)
    return np.argpartition(d, k, axis=1)[:, :k]

  na, nb = neighbours(a), neighbours(b)
  return float(np.mean([len(np.intersect1d(p, q)) / k for p, q in zip(na, nb)]))


def subset_gram(x, args) -> dict:
  """Gram fit on a seeded subset (as rep_fit_cells draws it), scored on the full data's Gram matrix."""
  rows = np.sort(np.random.default_rng(0).choice(x.shape[0], args.subset, replace=False))
  subset = x[rows]
  result = fit(subset, "gram", args.rep_dim, args.cache, "atlas-subset-gram")
  del subset
  full = preprocess.state_from_arrays(dict(np.load(args.cache / "atlas-gram.npz")))
  part = preprocess.state_from_arrays(dict(np.load(args.cache / "atlas-subset-gram.npz")))
  gram = np.load(args.cache / "atlas-gram_gram.npy")
  gram = np.triu(gram) + np.triu(gram, 1).T
  cosines = np.linalg.svd(part.components @ full.components.T, compute_uv=False)
  # Captured variance of the full data (standardised with the full statistics) by each set of components.
  def captured(c):
    return float(np.einsum("kf,fg,kg->", c, gram, c))

  result.update(subset_min_cos_top10=float(np.linalg.svd(part.components[:10] @ full.components[:10].T,
                                                         compute_uv=False).min()),
                subset_min_cos_all=float(cosines.min()),
                subset_n_angles_over_1deg=int((cosines < np.cos(np.radians(1.0))).sum()),
                subset_captured_vs_full_minus_1=captured(part.components) / captured(full.components) - 1.0)
  return result


def run_case(args):
  args.cache.mkdir(parents=True, exist_ok=True)
  case, _, rev = args.case.partition("@")
  start = time.perf_counter()
  x = load(args.cite if case.startswith("small") else args.atlas)
  loaded = {"load_s": time.perf_counter() - start}
  if case in ("small-randomized", "small-gram", "atlas-gram"):
    out = fit(x, case.split("-")[1], args.rep_dim, args.cache, case, keep_gram=case == "atlas-gram")
  elif case == "small-agreement":
    out = agreement(x, args.cache, args.rep_dim)
  elif case == "atlas-randomized-pass":
    module = preprocess
    if rev:
      source = subprocess.run(["git", "show", f"{rev}:clue_jax/data/preprocess.py"], check=True, capture_output=True,
                              text=True, cwd=pathlib.Path(__file__).resolve().parents[1]).stdout
      path = args.cache / f"preprocess_{rev}.py"
      path.write_text(source)
      spec = importlib.util.spec_from_file_location(f"preprocess_{rev}", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
    out = randomized_pass(x, args.rep_dim, module)
  elif case == "atlas-subset-gram":
    out = subset_gram(x, args)
  else:
    raise SystemExit(f"unknown case {args.case!r}; use one of {CASES}")
  print(json.dumps({"case": args.case, **loaded, **out}), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cite", type=pathlib.Path, required=True, help="the BMMC CITE 5k .h5mu (mod/rna/X counts)")
  parser.add_argument("--atlas", type=pathlib.Path, required=True,
                      help="an atlas RNA .h5ad (experiments/make_atlas.py)")
  parser.add_argument("--rep-dim", type=int, default=100)
  parser.add_argument("--subset", type=int, default=100_000)
  parser.add_argument("--baseline-rev", default="")
  parser.add_argument("--cache", type=pathlib.Path, default=pathlib.Path("/tmp/bench_rep_fit"))
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # One case, in this process.
  args = parser.parse_args()
  if args.case:
    return run_case(args)
  cases = args.cases.split(",")
  if args.baseline_rev and "atlas-randomized-pass" in cases:
    cases.insert(cases.index("atlas-randomized-pass") + 1, f"atlas-randomized-pass@{args.baseline_rev}")
  for case in cases:
    command = [sys.executable, __file__, "--case", case, "--cite", str(args.cite), "--atlas", str(args.atlas),
               "--rep-dim", str(args.rep_dim), "--subset", str(args.subset), "--cache", str(args.cache)]
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
  main()
