"""CLUE's objectives (docs/method.md §2), written against a bound `CLUE` module; pure math, no devices or files.

The minibatch is a `clue_jax.batch.Batch` of B rows (its docstring says what each array holds). Every mean below
runs over valid rows only.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import gammaln

from clue_jax.batch import Batch
from clue_jax.model import likelihoods, rng
from clue_jax.model.network import CLUE


class Weights(NamedTuple):
  """The lambdas of the generator objective and the per-modality weights (already rescaled to mean 1)."""

  data: float = 1.0
  kl: float = 1.0
  joint_cross: float = 0.02
  real_cross: float = 0.02
  cos: float = 0.02
  align: float = 0.02
  sup: float = 0.02
  modality: tuple[float, ...] = ()
  contrastive: float = 0.0  # Beyond the reference: 0 leaves the term out of the graph.
  temperature: float = 0.1  # Of the contrastive term's softmax.


def log_prob(likelihood: str, x, params):
  """Element-wise log-likelihood of `x` under the decoder's distribution parameters."""
  if likelihood == "NB":
    return likelihoods.negative_binomial(x, params["mean"], params["inverse_dispersion"])
  if likelihood == "Normal":
    return likelihoods.normal(x, params["loc"], params["scale"])
  if likelihood == "ZIN":
    return likelihoods.zero_inflated_normal(x, params["loc"], params["scale"], params["zi_logits"])
  if likelihood == "ZILN":
    return likelihoods.zero_inflated_log_normal(x, params["loc"], params["scale"], params["zi_logits"])
  if likelihood == "Bernoulli":
    return likelihoods.bernoulli(x, params["logits"])
  if likelihood in ("MSE", "RMSE"):
    return -jnp.square(x - params["loc"])  # Reduced to -MSE / -RMSE by `reconstruction_nll`.
  raise ValueError(f"unknown likelihood {likelihood!r}")


def masked_mean(values, rows):
  """Mean over the last axis of `values` over entries with weight 1; 0 when none is selected."""
  return jnp.where(rows > 0, values, 0.0).sum(-1) / jnp.maximum(rows.sum(-1), 1.0)


def nb_row_log_probs(x, params, log_factorial=None):
  """Per-row mean over features of log NB(x), for decoder outputs of shape (..., B, F) and counts (B, F).

  Decoder outputs (`ModalityDecoder`: the decoder's loc, (B, F) heads and the library) are scored by the fused
  `likelihoods.nb_softmax_row_log_probs`. Otherwise (a mean and theta, each (..., B, F)), the mean-free normaliser
  lgamma(x + theta) - lgamma(theta) is evaluated once, on the first pass: it depends only on the counts and theta,
  which is the same for every pass (per batch and feature). `log_factorial` (per row, sum_f lgamma(x_f + 1),
  computed at load time) replaces the element-wise evaluation of that data constant.
  """
  constant = (gammaln(x + 1.0).mean(-1) if log_factorial is None else log_factorial / x.shape[-1])
  if "decoder_loc" in params:
    return likelihoods.nb_softmax_row_log_probs(
        params["decoder_loc"], params["logit_scale"], params["logit_bias"], params["library"],
        params["inverse_dispersion"], params["lgamma_inverse_dispersion"], x) - constant
  theta = params["inverse_dispersion"]
  first = (0,) * (theta.ndim - 2)
  lgamma_theta = params.get("lgamma_inverse_dispersion")
  normaliser = likelihoods.nb_normaliser(x, theta[first], None if lgamma_theta is None else lgamma_theta[first])
  normaliser = normaliser.mean(-1) - constant
  return likelihoods.nb_mean_part(x, params["mean"], theta).mean(-1) + normaliser


def reconstruction_nll(likelihood: str, x, params, rows, log_factorial=None):
  """Mean over selected rows x features of -log p(x), as `.log_prob(x[rows]).mean()` in the reference.

  `params` may carry leading axes before (B, F) (several decoder passes scoring the same counts `x` (B, F)), with
  `rows` of shape (..., B): one value per pass.
  """
  if likelihood == "NB":
    per_row = nb_row_log_probs(x, params, log_factorial)
  else:
    per_row = log_prob(likelihood, x, params).mean(-1)
  mean_log_prob = masked_mean(per_row, rows)
  if likelihood == "RMSE":
    return jnp.sqrt(jnp.maximum(-mean_log_prob, 0.0))
  return -mean_log_prob


def gaussian_kl(loc, std):
  """KL(N(loc, std) || N(0, 1)) summed over the embedding, per row."""
  return (0.5 * (jnp.square(loc) + jnp.square(std) - 1.0) - jnp.log(std)).sum(-1)


def l2_normalize(u):
  """u / max(|u|, 1e-12), with a finite gradient at u = 0 (padding rows)."""
  return u * jax.lax.rsqrt(jnp.maximum((u * u).sum(-1, keepdims=True), 1e-24))


def cosine_similarity(a, b, eps=1e-8):
  norms = jnp.sqrt(jnp.maximum((a * a).sum(-1) * (b * b).sum(-1), eps * eps))
  return (a * b).sum(-1) / norms


def contrastive_loss(a, b, rows, temperature):
  """Symmetric InfoNCE (CLIP) between the L2-normalised rows of `a` and `b` over the batch's `rows` (cells observed
  in both): each row's own partner is the positive, the other such rows the negatives; 0 without rows."""
  logits = l2_normalize(a) @ l2_normalize(b).T / temperature
  logits = jnp.where((rows[None, :] > 0) & (rows[:, None] > 0), logits, -1e9)  # Only observed pairs compete.
  diagonal = jnp.arange(a.shape[0])
  a_to_b = -jax.nn.log_softmax(logits, axis=1)[diagonal, diagonal]
  b_to_a = -jax.nn.log_softmax(logits, axis=0)[diagonal, diagonal]
  return jnp.where(rows.sum() > 0, masked_mean((a_to_b + b_to_a) / 2, rows), 0.0)


def discriminator_inputs(locs, key, noise_scale):
  """The posterior means plus the burn-in annealing noise a(e) * N(0, I) (docs/method.md §2, term 6)."""
  keys = jax.random.split(key, len(locs))
  return [loc + noise_scale * rng.normal(k, loc.shape, loc.dtype) for loc, k in zip(locs, keys)]


def discriminator_cross_entropy(clue: CLUE, batch: Batch, vs, train: bool):
  """L_dsc: mean over the K * B (valid) rows of CE(Dsc(v_k), k)."""
  valid = batch.valid
  total = 0.0
  for k, (name, v) in enumerate(zip(clue.names, vs)):
    logits = clue.discriminate(v, batch[name].batch, train)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.full(v.shape[:1], k))
    total = total + jnp.where(valid > 0, ce, 0.0).sum()
  return total / jnp.maximum(len(vs) * valid.sum(), 1.0)


def discriminator_objective(clue: CLUE, batch: Batch, key, noise_scale, weights: Weights, train: bool = True):
  """The discriminator step's loss, lambda_align * L_dsc (encoders run without library heads)."""
  locs = [clue.encode(name, batch[name].rep, batch[name].counts, train, with_library=False)[0]
          for name in clue.names]
  dsc = discriminator_cross_entropy(clue, batch, discriminator_inputs(locs, key, noise_scale), train)
  return weights.align * dsc


def generator_objective(clue: CLUE, batch: Batch, key, noise_scale, weights: Weights, train: bool = True):
  """L_gen and its terms (docs/method.md §2): self + KL, joint-cross, real-cross, cosine, adversarial, supervised; and,
  when `weights.contrastive` > 0, the contrastive term. Sampled embeddings are L2-normalised when
  `clue.normalize_u`."""
  names, specs, normalize_u = clue.names, {s.name: s for s in clue.specs}, clue.normalize_u
  valid = batch.valid
  sample_key, noise_key = jax.random.split(key)
  sample_keys = jax.random.split(sample_key, len(names))
  locs, stds, libraries, u = {}, {}, {}, {}
  for name, k in zip(names, sample_keys):
    x = batch[name]
    locs[name], stds[name], libraries[name] = clue.encode(name, x.rep, x.counts, train)
    sample = locs[name] + stds[name] * rng.normal(k, locs[name].shape, locs[name].dtype)
    u[name] = l2_normalize(sample) if normalize_u else sample

  masks = {name: batch[name].mask * valid for name in names}
  mask_total = sum(masks.values())
  joint = sum(masks[n][:, None] * u[n] for n in names) / jnp.maximum(mask_total, 1.0)[:, None]
  if normalize_u:
    joint = l2_normalize(joint)

  def library(source, target):
    """Library size for decoding `target` from `source`'s encoder (the target's own if the source has none)."""
    lib = libraries[source] if libraries[source] is not None else libraries[target]
    return None if lib is None else lib[:, names.index(target)]

  def decoder_nlls(target, passes):
    """-log p of `target`'s counts under each (embedding, library source, rows) pass, decoded in one call.

    The passes run through the decoder stacked on a leading axis; BatchNorm normalises each pass over its own
    rows and moves the running statistics once per pass, in order, as separate calls would.
    """
    x = batch[target]
    z = jnp.stack([clue.subspace(u_, target) for u_, _, _ in passes])
    libs = [library(source, target) for _, source, _ in passes]
    lib = None if libs[0] is None else jnp.stack(libs)
    rows = jnp.stack([r for _, _, r in passes])
    params = clue.decode(target, z, x.batch, lib, train, rows)
    return reconstruction_nll(specs[target].likelihood, x.counts, params, rows, x.log_factorial)

  terms = {}
  for name in names:
    # 1. Self reconstruction over all rows (random fills included); 3. joint-cross: the joint embedding decodes
    # every observed modality (library from the target's encoder); 4. real-cross (v0.3.2+ semantics): rows observed
    # in both, the source encoder's library estimate for the target. 2. The per-feature KL.
    passes = ([(u[name], name, valid), (joint, name, masks[name])]
              + [(u[s], s, masks[s] * masks[name]) for s in names if s != name])
    nlls = decoder_nlls(name, passes)
    terms[f"self_{name}"] = nlls[0]
    terms[f"kl_{name}"] = masked_mean(gaussian_kl(locs[name], stds[name]), valid) / specs[name].n_features
    terms[f"joint_cross_{name}"] = nlls[1]
    terms[f"real_cross_{name}"] = nlls[2:].sum()
  # 5. Cosine alignment of each observed modality's embedding with the joint one; skipped without rows.
  cos_total = 0.0
  for name in names:
    rows = masks[name]
    cos = 1.0 - masked_mean(cosine_similarity(u[name], joint), rows)
    cos_total = cos_total + jnp.where(rows.sum() > 0, cos, 0.0)
  terms["cos"] = cos_total
  # Beyond the reference: contrastive alignment of the posterior means of every pair of modalities.
  if weights.contrastive:
    terms["contrastive"] = sum(contrastive_loss(locs[a], locs[b], masks[a] * masks[b], weights.temperature)
                               for i, a in enumerate(names) for b in names[i + 1:])
  # 6. Adversarial: the discriminator's cross-entropy on the (noisy) posterior means.
  vs = discriminator_inputs([locs[n] for n in names], noise_key, noise_scale)
  terms["dsc"] = discriminator_cross_entropy(clue, batch, vs, train)
  # 7. Supervised cell-type classifier on the same inputs.
  if clue.n_labels:
    labelled, ce_sum = 0.0, 0.0
    for name, v in zip(names, vs):
      labels = batch[name].label
      has_label = (labels >= 0) & (valid > 0)
      ce = optax.softmax_cross_entropy_with_integer_labels(clue.classify(v), jnp.maximum(labels, 0))
      ce_sum = ce_sum + jnp.where(has_label, ce, 0.0).sum()
      labelled = labelled + has_label.sum()
    terms["sup"] = ce_sum / jnp.maximum(labelled, 1.0)

  w = dict(zip(names, weights.modality or (1.0,) * len(names)))
  data = sum(w[n] * (terms[f"self_{n}"] + weights.kl * terms[f"kl_{n}"]) for n in names)
  joint_cross = sum(w[n] * terms[f"joint_cross_{n}"] for n in names)
  real_cross = sum(w[n] * terms[f"real_cross_{n}"] for n in names)
  total = (weights.data * data + weights.joint_cross * joint_cross + weights.real_cross * real_cross
           + weights.cos * terms["cos"] - weights.align * terms["dsc"])
  if clue.n_labels:
    total = total + weights.sup * terms["sup"]
  if weights.contrastive:
    total = total + weights.contrastive * terms["contrastive"]
  terms["gen"] = total
  return total, terms
