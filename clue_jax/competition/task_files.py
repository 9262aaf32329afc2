"""Readers for the NeurIPS 2021 competition's task files (h5ad) into the arrays `clue_jax.evaluate.metrics` and
`clue_jax.evaluate.embedding_metrics` take.

The starters' official files ship in `clue_jax/datasets/neurips2021/<cite|multiome>/<task>/` (see PROVENANCE.md);
`starter_file` finds them, the readers work on any file of the same format (e.g. the full phase-2 data).
"""

import pathlib
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp

NEURIPS2021 = pathlib.Path(__file__).resolve().parents[1] / "datasets" / "neurips2021"
TECHNOLOGIES = ("cite", "multiome")
TASKS = ("match_modality", "predict_modality", "joint_embedding")


def starter_file(technology: str, task: str, kind: str) -> pathlib.Path:
  """Path of an embedded starter file, e.g. starter_file("cite", "match_modality", "test_sol")."""
  if technology not in TECHNOLOGIES or task not in TASKS:
    raise ValueError(f"unknown starter {technology!r}/{task!r}: technology is one of {TECHNOLOGIES}, task one of "
                     f"{TASKS}")
  return NEURIPS2021 / technology / task / f"openproblems_bmmc_{technology}_starter.{kind}.h5ad"


def read_anndata(path) -> ad.AnnData:
  with warnings.catch_warnings():  # The 2021 files were written by an old anndata; reading them warns per field.
    warnings.simplefilter("ignore")
    return ad.read_h5ad(path)


def read_matrix(path):
  """`X` of a prediction or solution file: CSR if stored sparse, else a dense array."""
  x = read_anndata(path).X
  return sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x)


def read_scores(path) -> dict:
  """An official scores file as {metric_id: value}."""
  uns = read_anndata(path).uns
  return {str(k): float(v) for k, v in zip(uns["metric_ids"], uns["metric_values"])}


def read_per_cell_scores(path, metric: str) -> np.ndarray:
  return np.asarray(read_anndata(path).uns["per_cell"][metric], np.float64)


def read_joint_embedding(prediction_path, solution_path) -> dict:
  """The arguments of `embedding_metrics.joint_embedding_metrics` from a prediction and its solution file.

  The solution's cells are put in the prediction's order (the official scripts index by obs_names).
  """
  prediction, solution = read_anndata(prediction_path), read_anndata(solution_path)
  missing = prediction.obs_names.difference(solution.obs_names)
  if len(missing):
    raise ValueError(f"{prediction_path}: {len(missing)} cells (e.g. {missing[0]!r}) are not in the solution "
                     f"{solution_path}: embed exactly the cells of the task's input files")
  solution = solution[prediction.obs_names]
  obs = solution.obs
  trajectories = [key for key in ("pseudotime_order_GEX", "pseudotime_order_ADT", "pseudotime_order_ATAC")
                  if key in obs]
  cell_cycle = {key: obs[key].to_numpy(np.float64) for key in ("S_score", "G2M_score") if key in obs}
  return {
      "embedding": np.asarray(prediction.X, np.float64),
      "labels": obs["cell_type"].to_numpy(str),
      "batches": obs["batch"].to_numpy(str),
      "expression": sp.csr_matrix(solution.X),
      "gene_names": solution.var_names.to_numpy(str),
      "pseudotimes": {key: obs[key].to_numpy(np.float64) for key in trajectories},
      "cell_cycle_scores": cell_cycle if len(cell_cycle) == 2 else None,
  }
