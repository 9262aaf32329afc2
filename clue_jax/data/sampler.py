"""Cell IDs across modalities, the train/validation split, held-out pairs and per-epoch minibatch rows.

Pure numpy (docs/method.md §3.3): the dataset is the union of cell IDs; each ID has a row in every modality it was
measured in; at every epoch the missing slots are filled with random cells of that modality (mask 0).
"""

from typing import NamedTuple

import numpy as np


class Pairing(NamedTuple):
  ids: np.ndarray  # (n_ids,) cell IDs.
  rows: dict  # modality -> (n_ids,) row in that modality, -1 where the ID was not measured there.


def pair_cells(obs_names: dict, pair_by: str = "obs_names") -> Pairing:
  """Union of cell IDs over modalities (in order of first appearance); `pair_by="none"` pairs nothing."""
  index = {}
  keys = {}
  for name, names in obs_names.items():
    keys[name] = [str(n) if pair_by == "obs_names" else f"{name}:{n}" for n in names]
    for key in keys[name]:
      index.setdefault(key, len(index))
  rows = {}
  for name, k in keys.items():
    r = np.full(len(index), -1, np.int64)
    r[[index[key] for key in k]] = np.arange(len(k))
    rows[name] = r
  return Pairing(np.array(list(index), dtype=object), rows)


def row_ids(pairing: Pairing, name: str) -> np.ndarray:
  """The ID (index into `pairing.ids`) of each row of modality `name`."""
  rows = pairing.rows[name]
  measured = np.flatnonzero(rows >= 0)
  ids = np.empty(len(measured), np.int64)
  ids[rows[measured]] = measured
  return ids


def paired_ids(pairing: Pairing) -> np.ndarray:
  """Indices of IDs measured in at least two modalities."""
  present = np.stack([r >= 0 for r in pairing.rows.values()])
  return np.flatnonzero(present.sum(0) >= 2)


def hide_pairs(pairing: Pairing, fraction: float, rng: np.random.Generator):
  """Unpairs a random `fraction` of the paired IDs: each of their cells becomes an ID of its own.

  Returns the new pairing and the hidden pairs as {modality: rows} (aligned, one entry per hidden ID; a modality
  where a hidden ID was not measured has -1).
  """
  candidates = paired_ids(pairing)
  n_hidden = int(round(fraction * len(candidates)))
  if n_hidden == 0:
    return pairing, None
  hidden = np.sort(rng.choice(candidates, n_hidden, replace=False))
  names = list(pairing.rows)
  heldout = {name: pairing.rows[name][hidden].copy() for name in names}
  rows = {name: r.copy() for name, r in pairing.rows.items()}
  new_ids = []
  for name in names[1:]:
    measured = hidden[rows[name][hidden] >= 0]
    new_ids.extend(f"{pairing.ids[i]}#{name}" for i in measured)
    for other in names:
      extra = rows[name][measured] if other == name else np.full(len(measured), -1)
      rows[other] = np.concatenate([rows[other], extra])
    rows[name][measured] = -1
  ids = np.concatenate([pairing.ids, np.array(new_ids, dtype=object)])
  return Pairing(ids, rows), heldout


# The run's random streams: each purpose draws from its own seed sequence, so that a change to one draw never
# moves another.
def split_stream(seed: int) -> np.random.Generator:
  """The held-out pairs (`hide_pairs`), then the train / validation split (`split_ids`)."""
  return np.random.default_rng([seed, 1])


def train_epoch_stream(seed: int, epoch: int) -> np.random.Generator:
  """The order and random fills of training epoch `epoch` (`epoch_rows`)."""
  return np.random.default_rng([seed, epoch, 0])


def val_epoch_stream(seed: int, epoch: int) -> np.random.Generator:
  """The random fills of the validation batches after epoch `epoch`."""
  return np.random.default_rng([seed, epoch, 1])


def rep_fit_stream(seed: int) -> np.random.Generator:
  """The training cells a PCA / LSI is fitted on when `rep_fit_cells` caps them."""
  return np.random.default_rng([seed, 3])


def scored_pairs_stream(seed: int) -> np.random.Generator:
  """The pairs a monitored FOSCTTM is computed over when there are more than it scores (`trainer.SCORED_PAIRS`)."""
  return np.random.default_rng([seed, 4])


def eval_cells_stream(seed: int) -> np.random.Generator:
  """The subset of cell IDs scored during training (`evals.max_cells`)."""
  return np.random.default_rng([seed, 2])


def split_ids(n_ids: int, val_fraction: float, rng: np.random.Generator):
  """Random train / validation split over IDs (both halves of a pair stay together)."""
  order = rng.permutation(n_ids)
  n_val = int(round(val_fraction * n_ids))
  return np.sort(order[n_val:]), np.sort(order[:n_val])


class EpochRows(NamedTuple):
  rows: dict  # modality -> (n,) row indices
  masks: dict  # modality -> (n,) 1.0 where the ID really has that modality, 0.0 for a random fill
  valid: np.ndarray  # (n,) 1.0 for real rows, 0.0 for padding


def epoch_rows(pairing: Pairing, ids: np.ndarray, rng: np.random.Generator, batch_size: int,
               drop_last: bool) -> EpochRows:
  """Shuffled rows of one epoch over `ids`, with random fills for missing modalities.

  `drop_last` keeps whole batches only (training); otherwise the last batch is padded with invalid rows.
  """
  order = rng.permutation(ids)
  rows, masks = {}, {}
  for name, all_rows in pairing.rows.items():
    r = all_rows[order].copy()
    missing = r < 0
    pool = all_rows[ids][all_rows[ids] >= 0]
    if pool.size == 0:  # Nothing of this modality in the split: fill from all its cells.
      pool = all_rows[all_rows >= 0]
    r[missing] = rng.choice(pool, missing.sum())
    rows[name], masks[name] = r, (~missing).astype(np.float32)
  valid = np.ones(len(order), np.float32)
  if drop_last:
    n = (len(order) // batch_size) * batch_size
    rows = {k: v[:n] for k, v in rows.items()}
    masks = {k: v[:n] for k, v in masks.items()}
    valid = valid[:n]
  else:
    pad = -len(order) % batch_size
    rows = {k: np.concatenate([v, np.full(pad, v[0] if len(v) else 0)]) for k, v in rows.items()}
    masks = {k: np.concatenate([v, np.zeros(pad, np.float32)]) for k, v in masks.items()}
    valid = np.concatenate([valid, np.zeros(pad, np.float32)])
  return EpochRows(rows, masks, valid)
