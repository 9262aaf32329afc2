"""The two stages' training files of the competition recipe (docs/method.md §3.5), made from match-modality task files.

Pretraining gets the paired training cells: mod2's anonymised rows are put in mod1's order through `train_sol`, and
cell i is named `train-i` in both modalities. Fine-tuning gets those plus the test cells, which stay unpaired
(`test-mod1-i`, `test-mod2-i`). Every cell keeps its counts layer, its normalised `X` and a `batch` column; a mod2
file without one (the Multiome ATAC files) takes the batch of each training cell's partner, and for test cells the
test batch of mod1 when there is exactly one.
"""

import pathlib
import warnings

import anndata as ad
import numpy as np
import pandas as pd

from clue_jax.competition import task_files

KINDS = ("train_mod1", "train_mod2", "train_sol", "test_mod1", "test_mod2")
UNKNOWN_BATCH = "unknown"


class TaskFileError(ValueError):
  """A task file that is missing or not in the competition's format."""


def task_path(prefix: str, kind: str) -> pathlib.Path:
  return pathlib.Path(f"{prefix}.{kind}.h5ad")


def read_task(prefix: str, kinds=KINDS) -> dict:
  """{kind: AnnData} of the task files `<prefix>.<kind>.h5ad`."""
  out = {}
  for kind in kinds:
    path = task_path(prefix, kind)
    if not path.is_file():
      raise TaskFileError(f"{path}: no such task file; the task needs {', '.join(f'<prefix>.{k}.h5ad' for k in kinds)}")
    out[kind] = task_files.read_anndata(path)
    if kind.endswith(("mod1", "mod2")) and "counts" not in out[kind].layers:
      raise TaskFileError(f"{path}: no layers['counts']; competition files carry the raw counts there")
  return out


def feature_type(adata: ad.AnnData, path) -> str:
  """GEX, ADT or ATAC, from var["feature_types"]."""
  if "feature_types" not in adata.var:
    raise TaskFileError(f"{path}: var has no 'feature_types' column (GEX / ADT / ATAC)")
  return str(adata.var["feature_types"].iloc[0])


def partners(solution: ad.AnnData, path) -> np.ndarray:
  """Row of mod2 paired with each row of mod1, from a solution (pairing) matrix with one 1 per row."""
  partner = np.asarray(solution.X.argmax(axis=1)).ravel()
  if len(np.unique(partner)) != len(partner):
    raise TaskFileError(f"{path}: the solution matrix is not a one-to-one pairing")
  return partner


def batches(adata: ad.AnnData, fallback) -> np.ndarray:
  """The obs "batch" column as strings, or `fallback` (an array, or one value for every cell) when it is absent."""
  if "batch" in adata.obs:
    return adata.obs["batch"].astype(str).to_numpy()
  return np.broadcast_to(np.asarray(fallback, dtype=object), (adata.n_obs,)).astype(str)


def test_batch_fallback(test_mod1: ad.AnnData) -> str:
  test_batches = np.unique(batches(test_mod1, UNKNOWN_BATCH))
  if len(test_batches) == 1:
    return str(test_batches[0])
  warnings.warn(f"test mod2 cells have no batch and test mod1 has {len(test_batches)}; they get the batch "
                f"{UNKNOWN_BATCH!r} and are matched across all test batches", stacklevel=2)
  return UNKNOWN_BATCH


def test_cell_batches(files: dict, names: tuple[str, str]) -> dict:
  """{modality: batch of each test cell} (see the module docstring) of the task files `files` (read_task)."""
  test1, test2 = files["test_mod1"], files["test_mod2"]
  return {names[0]: batches(test1, UNKNOWN_BATCH),
          names[1]: batches(test2, test_batch_fallback(test1) if "batch" not in test2.obs else None)}


def test_cells(prefix: str, names: tuple[str, str]) -> tuple[dict, dict]:
  """({modality: test cells with their obs "batch"}, the task files) of the match-modality task `prefix`, in the
  test files' order, as matching takes them."""
  files = read_task(prefix, ("test_mod1", "test_mod2", "test_sol"))
  test_batches = test_cell_batches(files, names)
  out = {}
  for name, kind in zip(names, ("test_mod1", "test_mod2")):
    out[name] = files[kind].copy()
    out[name].obs["batch"] = test_batches[name]
  return out, files


def cells(adata: ad.AnnData, names, batch: np.ndarray) -> ad.AnnData:
  """`adata`'s counts layer, normalised X and features, with new obs_names and only a batch column."""
  obs = pd.DataFrame({"batch": batch, "task_obs_name": adata.obs_names.to_numpy(str)},
                     index=pd.Index(names, dtype=str))
  out = ad.AnnData(X=adata.X, obs=obs, var=adata.var[[]].copy())
  out.layers["counts"] = adata.layers["counts"]
  return out


def stage_files(prefix: str, names: tuple[str, str], out_dir: pathlib.Path) -> dict:
  """Writes the pretraining and fine-tuning files of both modalities; returns {stage: {modality: path}}."""
  files = read_task(prefix)
  mod1, mod2 = files["train_mod1"], files["train_mod2"]
  partner = partners(files["train_sol"], task_path(prefix, "train_sol"))
  if len(partner) != mod1.n_obs or mod2.n_obs != mod1.n_obs:
    raise TaskFileError(f"{task_path(prefix, 'train_sol')}: a {len(partner)}-row pairing for {mod1.n_obs} mod1 and "
                        f"{mod2.n_obs} mod2 training cells")
  train_batch = batches(mod1, UNKNOWN_BATCH)
  mod2 = mod2[partner]
  train_ids = [f"train-{i}" for i in range(mod1.n_obs)]
  test1, test2 = files["test_mod1"], files["test_mod2"]
  test_batches = test_cell_batches(files, names)
  staged = {
      "pretrain": {names[0]: cells(mod1, train_ids, train_batch), names[1]: cells(mod2, train_ids, train_batch)},
  }
  staged["finetune"] = {
      names[0]: ad.concat([staged["pretrain"][names[0]],
                           cells(test1, [f"test-mod1-{i}" for i in range(test1.n_obs)], test_batches[names[0]])],
                          merge="same"),
      names[1]: ad.concat([staged["pretrain"][names[1]],
                           cells(test2, [f"test-mod2-{i}" for i in range(test2.n_obs)], test_batches[names[1]])],
                          merge="same"),
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {}
  for stage, adatas in staged.items():
    paths[stage] = {}
    for name, adata in adatas.items():
      paths[stage][name] = out_dir / f"{stage}_{name}.h5ad"
      adata.write_h5ad(paths[stage][name])
  return paths
