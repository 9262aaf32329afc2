"""Scores of a trained embedding from the embeddings and obs of each modality (no file I/O): matching of paired
cells (FOSCTTM, top-1), cross-modal kNN label transfer, and the competition's joint-embedding metrics.

Cells pair across modalities by obs_names. The joint embedding of a cell is the mean of its modalities' embeddings.
A score whose inputs are missing is left out, and `notes` says why.
"""

import itertools

import numpy as np
import pandas as pd

from clue_jax.data import sampler
from clue_jax.evaluate import embedding_metrics, metrics

METRICS = ("foscttm", "top1", "label_transfer", "joint")
LABEL_TRANSFER_K = 5  # Neighbours voting in kNN label transfer.
PSEUDOTIME_PREFIX = "pseudotime"  # obs columns holding ground-truth trajectories (competition: pseudotime_order_*).
MIN_TRAJECTORY_CELLS = 10
CHUNK = 256


def parse_metrics(text: str) -> tuple:
  """Comma-separated metric names, checked; ValueError names the allowed ones."""
  names = tuple(n.strip() for n in text.split(",") if n.strip())
  unknown = [n for n in names if n not in METRICS]
  if unknown or not names:
    raise ValueError(f"unknown metric(s) {unknown or text!r}: use a comma-separated subset of {','.join(METRICS)}")
  return names


def evaluate(embeddings: dict, obs: dict, *, label_key: str = "", batch_key: str = "", heldout_ids=(),
             metric_names=METRICS, expression=None, max_cells: int = 0, seed: int = 0) -> dict:
  """Every score of `metric_names` as a JSON-ready dict (None for a score that is NaN).

  `embeddings[m]` (cells, d) has one row per row of `obs[m]` (indexed by obs_names). `heldout_ids`: cell names whose
  pairing training never saw (scored again on their own). `expression`: log-normalised gene expression (AnnData-like:
  `X`, `obs_names`, `var_names` as human gene symbols) of the cells, for the cell-cycle score. `max_cells`: score a
  seeded random subset of at most this many cell IDs (0 = all).
  """
  names = list(embeddings)
  pairing = sampler.pair_cells({m: obs[m].index for m in names})
  ids = np.arange(len(pairing.ids))
  if max_cells and len(ids) > max_cells:
    ids = np.sort(np.random.default_rng(seed).choice(ids, max_cells, replace=False))
  rows = {m: pairing.rows[m][ids] for m in names}
  cell_names = pairing.ids[ids].astype(str)
  annotations = joint_obs(obs, rows, cell_names)
  labels = column(annotations, label_key)
  batches = column(annotations, batch_key)
  if labels is not None and not pd.notna(labels).any():
    raise ValueError(f"the obs column {label_key!r} has no value for any of the {len(cell_names)} scored cells")
  heldout = np.isin(cell_names, np.asarray(list(heldout_ids), dtype=str))
  result = {"cells": {m: int((rows[m] >= 0).sum()) for m in names} | {"heldout": int(heldout.sum())},
            "label_key": label_key or None, "batch_key": batch_key or None}
  notes = {}
  if {"foscttm", "top1"} & set(metric_names):
    result.update(matching(embeddings, rows, heldout, metric_names, notes))
  if "label_transfer" in metric_names:
    if labels is None:
      notes["label_transfer"] = "no labels: pass a label column (label_key)"
    else:
      result["label_transfer"] = label_transfer(embeddings, rows, labels)
  if "joint" in metric_names:
    if labels is None:
      notes["joint"] = "no labels: the joint-embedding metrics need cell types (label_key)"
    else:
      result["joint"] = joint_scores(joint_embedding(embeddings, rows), labels, batches, annotations, expression,
                                     seed, notes)
  result["notes"] = notes
  return result


def joint_obs(obs: dict, rows: dict, cell_names: np.ndarray) -> pd.DataFrame:
  """One obs row per cell ID (object columns): each value from the first modality, in order, that has it."""
  columns = {}
  for name, r in rows.items():
    present = r >= 0
    for key in obs[name].columns:
      values = columns.setdefault(key, np.full(len(r), None, object))
      fill = present & pd.isna(values)
      values[fill] = obs[name][key].to_numpy(object)[r[fill]]
  return pd.DataFrame(columns, index=pd.Index(cell_names))


def column(annotations: pd.DataFrame, key: str):
  """The obs column `key` (object array, missing values NaN/None), or None without a key."""
  if not key:
    return None
  if key not in annotations.columns:
    raise ValueError(f"no obs column {key!r}; the obs columns are {sorted(map(str, annotations.columns))}")
  return annotations[key].to_numpy(object)


def matching(embeddings: dict, rows: dict, heldout: np.ndarray, metric_names, notes: dict) -> dict:
  """FOSCTTM and top-1 accuracy for each modality pair, over its paired cells and over the held-out ones."""
  out = {}
  if not heldout.any():
    notes["heldout"] = ("no held-out pairs (data.heldout_pairs): foscttm and top1 are over cells whose pairing "
                        "training saw")
  for a, b in itertools.combinations(rows, 2):
    both = (rows[a] >= 0) & (rows[b] >= 0)
    for scope, cells in (("", both), ("heldout_", both & heldout)):
      if cells.sum() < 2:
        if scope == "":
          notes[f"matching/{a}_{b}"] = f"{int(cells.sum())} cells in both {a} and {b}: nothing to match"
        continue
      scores = matching_scores(embeddings[a][rows[a][cells]], embeddings[b][rows[b][cells]])
      if "foscttm" in metric_names:
        out.setdefault(f"{scope}foscttm", {})[f"{a}_{b}"] = float(scores["foscttm"].mean())
      if "top1" in metric_names:
        out.setdefault(f"{scope}top1", {}).update({f"{a}_to_{b}": float(scores["top1_ab"].mean()),
                                                  f"{b}_to_{a}": float(scores["top1_ba"].mean())})
  return out


def matching_scores(x: np.ndarray, y: np.ndarray) -> dict:
  """Per paired cell (row i of `x` and of `y`): FOSCTTM (both directions averaged) and whether its nearest cell of the
  other modality is its partner, each way; distances in row chunks (memory O(chunk x cells))."""
  closer, top1 = {}, {}
  for key, (queries, references) in {"ab": (x, y), "ba": (y, x)}.items():
    fraction, hit = np.empty(len(queries)), np.empty(len(queries), bool)
    for start in range(0, len(queries), CHUNK):
      chunk = slice(start, start + CHUNK)
      d = metrics.squared_distances(queries[chunk], references)
      local = np.arange(d.shape[0])
      true = d[local, local + start]
      fraction[chunk] = (d < true[:, None]).mean(1)
      hit[chunk] = d.argmin(1) == local + start
    closer[key], top1[key] = fraction, hit
  return {"foscttm": (closer["ab"] + closer["ba"]) / 2, "top1_ab": top1["ab"], "top1_ba": top1["ba"]}


def label_transfer(embeddings: dict, rows: dict, labels: np.ndarray) -> dict:
  """kNN (k = LABEL_TRANSFER_K) label-transfer accuracy from each modality's labelled cells to each other's."""
  out = {}
  for a, b in itertools.permutations(rows, 2):
    source = (rows[a] >= 0) & pd.notna(labels)
    target = (rows[b] >= 0) & pd.notna(labels)
    if source.sum() >= LABEL_TRANSFER_K and target.any():
      out[f"{a}_to_{b}"] = metrics.knn_label_transfer_accuracy(
          embeddings[a][rows[a][source]], labels[source].astype(str), embeddings[b][rows[b][target]],
          labels[target].astype(str), LABEL_TRANSFER_K)
  return out


def joint_embedding(embeddings: dict, rows: dict) -> np.ndarray:
  """(cell IDs, d): the mean of each cell's modality embeddings."""
  total, count = 0.0, 0
  for name, r in rows.items():
    present = r >= 0
    total = total + np.where(present[:, None], embeddings[name][np.maximum(r, 0)], 0.0)
    count = count + present
  return total / count[:, None]


def joint_scores(joint: np.ndarray, labels, batches, annotations: pd.DataFrame, expression, seed: int,
                 notes: dict) -> dict:
  """`embedding_metrics.joint_embedding_metrics` on the labelled cells, with the inputs the data has."""
  cells = pd.notna(labels)
  batch = np.full(len(labels), "none", object) if batches is None else np.where(pd.notna(batches), batches, "none")
  kept = annotations[cells]
  pseudotimes = {k: v for k, v in trajectories(kept).items() if np.isfinite(v).sum() >= MIN_TRAJECTORY_CELLS}
  cycle = cell_cycle_inputs(kept, expression)
  scores = embedding_metrics.joint_embedding_metrics(
      joint[cells], labels[cells].astype(str), batch[cells].astype(str), pseudotimes=pseudotimes, seed=seed, **cycle)
  if batches is None:
    notes["asw_batch"] = "no batch column (batch_key): every cell is in one batch, so batch mixing is not scored"
  if not pseudotimes:
    notes["ti_cons_batch_mean"] = (f"not computed: no obs column starting with {PSEUDOTIME_PREFIX!r} with at least "
                                   f"{MIN_TRAJECTORY_CELLS} finite values")
  if not cycle:
    notes["cc_cons"] = ("not computed: needs the cells' log-normalised gene expression with human gene symbols "
                        "(evaluate's --expression)")
  notes["arithmetic_mean"] = "the competition's mean of the six metrics; a metric not computed counts 0"
  notes["joint"] = f"{int(cells.sum())} labelled cells; a cell's joint embedding is the mean of its modalities'"
  return {k: None if np.isnan(v) else float(v) for k, v in scores.items()}


def trajectories(annotations: pd.DataFrame) -> dict:
  return {c: pd.to_numeric(annotations[c], errors="coerce").to_numpy(np.float64) for c in annotations.columns
          if str(c).startswith(PSEUDOTIME_PREFIX)}


def cell_cycle_inputs(annotations: pd.DataFrame, expression) -> dict:
  """Keyword arguments of `joint_embedding_metrics` for cc_cons: the expression aligned to the scored cells, with
  the obs S_score / G2M_score when present (else they are recomputed from the genes); {} without expression."""
  if expression is None:
    return {}
  position = pd.Index(expression.obs_names).get_indexer(annotations.index)
  if (position < 0).any():
    missing = annotations.index[position < 0]
    raise ValueError(f"the expression data lack {len(missing)} of the scored cells (e.g. {list(missing[:3])}): give "
                     "gene expression for every cell")
  inputs = {"expression": expression.X[position], "gene_names": np.asarray(expression.var_names)}
  if {"S_score", "G2M_score"} <= set(annotations.columns):
    inputs["cell_cycle_scores"] = {k: pd.to_numeric(annotations[k]).to_numpy(np.float64)
                                   for k in ("S_score", "G2M_score")}
  return inputs


def per_cell_foscttm(embeddings: dict, obs: dict, max_cells: int | None = None, seed: int = 0):
  """pandas Series: per paired cell (indexed by name), its FOSCTTM averaged over the modality pairs it is in; over a
  seeded subset of `max_cells` of the cell IDs when there are more (FOSCTTM costs cells^2)."""
  pairing = sampler.pair_cells({m: obs[m].index for m in embeddings})
  scored = np.ones(len(pairing.ids), bool)
  if max_cells is not None and len(pairing.ids) > max_cells:
    scored[:] = False
    scored[np.random.default_rng(seed).choice(len(pairing.ids), max_cells, replace=False)] = True
  total, count = np.zeros(len(pairing.ids)), np.zeros(len(pairing.ids))
  for a, b in itertools.combinations(embeddings, 2):
    both = np.flatnonzero((pairing.rows[a] >= 0) & (pairing.rows[b] >= 0) & scored)
    if len(both) >= 2:
      total[both] += matching_scores(embeddings[a][pairing.rows[a][both]],
                                     embeddings[b][pairing.rows[b][both]])["foscttm"]
      count[both] += 1
  paired = count > 0
  return pd.Series(total[paired] / count[paired], index=pd.Index(pairing.ids[paired].astype(str)))
