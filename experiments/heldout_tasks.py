"""The competition's task files of a held-out-site split of a paired .h5mu (experiments/heldout_site.py writes them).

`write_task_files`: match_modality (train and test mod2 rows shuffled and renamed "0", "1", ..., with the train_sol /
test_sol pairing matrices), predict_modality (paired; the test cells in match_modality test_mod1's order) and
joint_embedding (every cell; cell types in the solution), in the format of the starters' files (layers["counts"], a
normalised `.X`, obs "batch", var "feature_types", uns "dataset_id"). GEX `.X` is log1p(counts / size factor), the size
factor the cell's total count over the mean total (the competition's were scran's); ADT `.X` is Seurat's CLR; ATAC
`.X` the binary peaks. Every file, mod2 included, carries obs "batch" (site + donor), so that the test cells can be
matched within each test batch.
"""

import pathlib

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

from clue_jax.competition import task_data, task_files
from clue_jax.data import preprocess

FEATURE_TYPES = {"rna": "GEX", "adt": "ADT", "atac": "ATAC"}


def normalized(kind: str, counts: sp.csr_matrix) -> sp.csr_matrix:
  """The competition's `.X` of one feature type from raw counts (see the module docstring)."""
  if kind == "GEX":
    totals = np.asarray(counts.sum(axis=1)).ravel()
    factors = totals / totals.mean()
    return sp.csr_matrix(sp.diags(1.0 / factors) @ counts).log1p().astype(np.float32)
  if kind == "ADT":
    return sp.csr_matrix(preprocess.clr(counts))
  return counts.copy()


def full_modality(adata: ad.AnnData, kind: str) -> ad.AnnData:
  """Every cell of one modality in the competition's layout: counts layer, normalised X, obs batch, var types."""
  counts = sp.csr_matrix(adata.X, dtype=np.float32)
  var = pd.DataFrame({"feature_types": kind}, index=adata.var_names.astype(str))
  if "gene_id" in adata.var:
    var.insert(0, "gene_ids", adata.var["gene_id"].astype(str).to_numpy())
  obs = pd.DataFrame({"batch": adata.obs["batch"].astype(str).to_numpy()}, index=adata.obs_names.astype(str))
  if kind == "GEX":
    totals = np.asarray(counts.sum(axis=1)).ravel()
    obs["size_factors"] = totals / totals.mean()
  out = ad.AnnData(X=normalized(kind, counts), obs=obs, var=var)
  out.layers["counts"] = counts
  return out


def subset(adata: ad.AnnData, rows, obs_names=None, dataset_id: str = "") -> ad.AnnData:
  out = adata[np.asarray(rows)].copy()
  if obs_names is not None:
    out.obs_names = pd.Index(obs_names, dtype=str)
  out.uns["dataset_id"] = dataset_id
  out.uns["organism"] = "human"
  return out


def solution(mod1: ad.AnnData, order: np.ndarray, dataset_id: str) -> ad.AnnData:
  """The pairing matrix: X[i, j] = 1 when shuffled mod2 row j is mod1 row i (= order[j]); uns pairing_ix = order."""
  n = len(order)
  x = sp.csr_matrix((np.ones(n, np.float32), (order, np.arange(n))), shape=(n, n))
  out = ad.AnnData(X=x, obs=mod1.obs[["batch"]].copy(), var=pd.DataFrame(index=pd.Index([str(j) for j in range(n)])))
  out.uns["dataset_id"] = dataset_id
  out.uns["pairing_ix"] = order.astype(np.float64)
  return out


def write_task_files(mdata: md.MuData, out_dir: pathlib.Path, dataset_id: str, test_site: str = "site4",
                     seed: int = 0) -> dict:
  """Writes the three tasks' files of the held-out-site split; returns {task: prefix} (`PREFIX.<kind>.h5ad`)."""
  names = ["rna", next(n for n in mdata.mod if n != "rna")]
  kinds = [FEATURE_TYPES[n] for n in names]
  mods = [full_modality(mdata.mod[n], k) for n, k in zip(names, kinds)]
  if not (mods[0].obs_names == mods[1].obs_names).all():
    raise ValueError("the two modalities' cells differ: the split needs paired cells in the same order")
  sites = mdata.mod["rna"].obs["Site"].astype(str).to_numpy()
  if test_site not in sites:
    raise ValueError(f"no cell of site {test_site!r}; sites: {sorted(set(sites))}")
  train, test = np.flatnonzero(sites != test_site), np.flatnonzero(sites == test_site)
  rng = np.random.default_rng(seed)
  prefixes = {task: out_dir / task / dataset_id for task in task_files.TASKS}
  for prefix in prefixes.values():
    prefix.parent.mkdir(parents=True, exist_ok=True)
  files = {}
  mm = f"{dataset_id}_MM_{kinds[0].lower()}2{kinds[1].lower()}"
  for split, rows in (("train", train), ("test", test)):
    order = rng.permutation(len(rows))
    files[f"match_modality.{split}_mod1"] = subset(mods[0], rows, dataset_id=mm)
    files[f"match_modality.{split}_mod2"] = subset(mods[1], rows[order], [str(j) for j in range(len(rows))], mm)
    files[f"match_modality.{split}_sol"] = solution(files[f"match_modality.{split}_mod1"], order, mm)
  pm = f"{dataset_id}_PM_{kinds[0].lower()}2{kinds[1].lower()}"
  for split, rows in (("train", train), ("test", test)):
    for i, mod in enumerate(mods):
      files[f"predict_modality.{split}_mod{i + 1}"] = subset(mod, rows, dataset_id=pm)
  je = f"{dataset_id}_JE"
  everyone = np.arange(mods[0].n_obs)
  for i, mod in enumerate(mods):
    files[f"joint_embedding.mod{i + 1}"] = subset(mod, everyone, dataset_id=je)
  truth = subset(mods[0], everyone, dataset_id=je)
  truth.obs["cell_type"] = mdata.mod["rna"].obs["cell_type"].astype(str).to_numpy()
  del truth.layers["counts"]
  files["joint_embedding.solution"] = truth
  for key, adata in files.items():
    task, kind = key.split(".")
    adata.write_h5ad(task_data.task_path(str(prefixes[task]), kind))
  return {task: str(prefix) for task, prefix in prefixes.items()}
