"""Cross-modal prediction (docs/method.md §4.4), for every likelihood, NB and batch-conditioned targets included.

The source cells' posterior means (L2-normalised when the model was trained with `model.normalize_u`) are cut to the
target's subspace and decoded by the target's decoder (evaluation mode) with the given target batch; the prediction
is the mean of the decoder's distribution. Unlike the reference, the means of ZIN and ZILN include the zero
inflation, and NB targets take a library size: the source encoder's estimate for the target (an NB source), or one
given per cell. Several sources decode their joint embedding, formed as training forms it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from clue_jax.data import preprocess
from clue_jax.model import losses
from clue_jax.model.network import CLUE

SCALES = ("counts", "log1p", "clr")


def distribution_mean(likelihood: str, params):
  """E[x] under the decoder's distribution parameters."""
  if likelihood == "NB":
    return params["mean"]
  if likelihood in ("Normal", "MSE", "RMSE"):
    return params["loc"]
  if likelihood == "ZIN":
    return jax.nn.sigmoid(-params["zi_logits"]) * params["loc"]
  if likelihood == "ZILN":
    return jax.nn.sigmoid(-params["zi_logits"]) * jnp.exp(params["loc"] + 0.5 * jnp.square(params["scale"]))
  if likelihood == "Bernoulli":
    return jax.nn.sigmoid(params["logits"])
  raise ValueError(f"unknown likelihood {likelihood!r}")


def make_predict(model: CLUE, sources: tuple, target: str, library_source: str | None):
  """`predict(state, reps, counts, batch_index, library) -> (B, target features)` means.

  `reps` / `counts`: the encoder inputs of each of `sources`, in order; `batch_index` the target batch of each cell;
  `library` the NB target's library size per cell (ignored for other targets, and when `library_source` names the
  NB source whose library head gives it). Several sources decode the cells' joint embedding: the mean of their
  posterior means, each L2-normalised and the mean re-normalised when `model.normalize_u` (as the joint-cross loss
  forms it from samples, docs/method.md §2).
  """
  likelihood = next(s.likelihood for s in model.specs if s.name == target)
  target_index = model.names.index(target)

  def predict(state, reps, counts, batch_index, library):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    total = 0.0
    for name, rep, x in zip(sources, reps, counts):
      loc, _, source_library = model.apply(variables, name, rep, x, False, name == library_source,
                                           method=CLUE.encode)
      total = total + (losses.l2_normalize(loc) if model.normalize_u else loc)
      if name == library_source:
        library = source_library[:, target_index]
    u = total
    if len(sources) > 1:
      u = total / len(sources)
      u = losses.l2_normalize(u) if model.normalize_u else u
    params = model.apply(variables, target, model.subspace(u, target), batch_index,
                         library if likelihood == "NB" else None, False, method=CLUE.decode)
    return distribution_mean(likelihood, params)

  return predict


def on_scale(counts: np.ndarray, scale: str, total: float | None = None) -> np.ndarray:
  """Predicted counts on the scale `scale`: "counts" (as they are), "log1p" (log1p of each row rescaled to sum to
  `total`, the log-normalised scale) or "clr" (Seurat's centred log-ratio, the competition's ADT scale)."""
  if scale == "counts":
    return counts
  if scale == "log1p":
    sums = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts * (total / np.where(sums > 0, sums, 1.0))).astype(np.float32)
  if scale == "clr":
    return preprocess.clr(counts)
  raise ValueError(f"scale {scale!r}: use one of {SCALES}")
