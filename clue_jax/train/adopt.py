"""A finished run's parameters adopted by a model with more batch categories (fine-tuning, docs/method.md §3.4).

Every array is copied, except the rows that follow the batch categories: those of a batch the finished run knew are
copied by batch name, and a new batch's rows keep their fresh initialisation, as the reference's transfer of
batch-specific weights does. Batch rows are, by the layout of `clue_jax.model.network`: the last rows of every
decoder kernel (decoders read [input, batch one-hot] at every layer), all rows of the decoders' head tables
(batches x features), and the last rows of the first discriminator kernel when the discriminator is
batch-conditioned.
"""

import numpy as np
from flax import traverse_util


class AdoptError(ValueError):
  """The two models differ in more than their batch categories."""


def batch_owner(path: tuple, first_modality: str, shared_batches: bool):
  """The modality whose batch categories the rows of the parameter at `path` follow; None for no batch rows.

  `path` is the parameter's path inside the `params` collection, e.g. ("decoders_rna", "loc", "kernel").
  """
  top = path[0]
  if top.startswith("decoders_"):
    if len(path) == 2 or path[-1] == "kernel":  # A head table, or a kernel reading the one-hot.
      return top[len("decoders_"):]
    return None
  if top == "discriminator" and shared_batches and path[1:] == ("Linear_0", "kernel"):
    return first_modality
  return None


def batch_rows(source: np.ndarray, target: np.ndarray, source_batches: tuple, target_batches: tuple,
               name: str) -> np.ndarray:
  """`target` with the shared leading rows of `source` and the rows of the batches both know, by name."""
  shared = source.shape[0] - len(source_batches)
  if shared < 0 or target.shape[0] - len(target_batches) != shared or source.shape[1:] != target.shape[1:]:
    raise AdoptError(f"{name}: shape {source.shape} with {len(source_batches)} batches does not become "
                     f"{target.shape} with {len(target_batches)} batches")
  out = np.array(target, copy=True)
  out[:shared] = source[:shared]
  index = {c: i for i, c in enumerate(source_batches)}
  for j, category in enumerate(target_batches):
    if category in index:
      out[shared + j] = source[shared + index[category]]
  return out


def adopt(source: dict, target: dict, source_batches: dict, target_batches: dict, shared_batches: bool) -> dict:
  """{"params", "batch_stats"} of the target model holding `source`'s values (see the module docstring).

  `source_batches` / `target_batches`: {modality: batch categories}, modalities in the model's order.
  """
  flat_source, flat_target = traverse_util.flatten_dict(source), traverse_util.flatten_dict(target)
  differ = sorted("/".join(k) for k in flat_source.keys() ^ flat_target.keys())
  if differ:
    raise AdoptError(f"the models have different parameters, e.g. {differ[:3]}: only the batch categories may "
                     f"differ (same modalities, model sizes and encoder inputs)")
  first = next(iter(target_batches))
  out = {}
  for path, value in flat_target.items():
    name, saved = "/".join(path), np.asarray(flat_source[path])
    owner = batch_owner(path[1:], first, shared_batches) if path[0] == "params" else None
    if owner is not None and tuple(source_batches[owner]) != tuple(target_batches[owner]):
      out[path] = batch_rows(saved, np.asarray(value), tuple(source_batches[owner]), tuple(target_batches[owner]),
                             name)
    elif saved.shape != value.shape:
      raise AdoptError(f"{name}: shape {saved.shape} saved, {value.shape} in this model: only the batch categories "
                       f"may differ (same modalities, model sizes and encoder inputs)")
    else:
      out[path] = saved
  return traverse_util.unflatten_dict(out)
