"""Fine-tuning onto new batches: adopted parameters compute what the finished model computed for its batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax import batch as batch_lib
from clue_jax.model.network import CLUE, ModalitySpec
from clue_jax.train import adopt

OLD = ("s1d1", "s2d1")
NEW = ("s1d1", "s2d1", "s1d2")  # The fine-tuning data adds an unseen batch at the end.


def specs(n_batches):
  return (ModalitySpec("rna", 6, 9, n_batches, "NB", False), ModalitySpec("adt", 6, 5, n_batches, "NB", False))


def model(n_batches, decoder_width=8):
  return CLUE(specs(n_batches), latent_dim=3, encoder_width=8, decoder_width=decoder_width, discriminator_width=8,
              shared_batches=True)


def variables(clue, seed):
  example = batch_lib.zeros({s.name: (s.n_features, s.input_dim) for s in clue.specs}, rows=4)
  out = clue.init(jax.random.key(seed), example)
  # Random values everywhere (heads start at zero, running statistics at 0 / 1), so that every copy is visible.
  leaves, tree = jax.tree.flatten(out)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5)
                                   for k, x in zip(keys, leaves)])


def batches(clue):
  return {s.name: OLD if s.n_batches == 2 else NEW for s in clue.specs}


def test_known_batches_decode_and_discriminate_as_before_and_new_rows_stay_fresh():
  old, new = model(2), model(3)
  source, fresh = variables(old, 0), variables(new, 1)
  adopted = adopt.adopt(source, fresh, batches(old), batches(new), shared_batches=True)
  z = jax.random.normal(jax.random.key(2), (5, 3))
  library = jnp.full((5,), 100.0)
  for old_index, category in enumerate(OLD):
    new_index = jnp.full((5,), NEW.index(category))
    same = jnp.full((5,), old_index)
    for name in ("rna", "adt"):
      before = old.apply(source, name, z, same, library, False, method=CLUE.decode)
      after = new.apply(adopted, name, z, new_index, library, False, method=CLUE.decode)
      for key in before:
        # Float round-off only: relative to each array's scale (softmax means of ~1e-20 differ by ~1e-5 relatively
        # between the two compiled shapes on AVX-512 CPUs).
        scale = float(np.abs(np.asarray(before[key])).max())
        np.testing.assert_allclose(after[key], before[key], rtol=1e-6, atol=1e-6 * scale,
                                   err_msg=f"{name} {key} {category}")
    v = jax.random.normal(jax.random.key(3), (5, 6))
    np.testing.assert_allclose(new.apply(adopted, v, new_index, False, method=CLUE.discriminate),
                               old.apply(source, v, same, False, method=CLUE.discriminate), rtol=1e-6)
  # The new batch's head rows and one-hot rows keep the fresh initialisation; shared rows come from the source.
  for head in ("log_theta", "scale_lin", "bias"):
    np.testing.assert_array_equal(adopted["params"]["decoders_rna"][head][2], fresh["params"]["decoders_rna"][head][2])
  kernel = adopted["params"]["decoders_adt"]["loc"]["kernel"]
  np.testing.assert_array_equal(kernel[-1], fresh["params"]["decoders_adt"]["loc"]["kernel"][-1])
  np.testing.assert_array_equal(kernel[:-1], source["params"]["decoders_adt"]["loc"]["kernel"])
  np.testing.assert_array_equal(adopted["params"]["encoders_rna"]["subspaces"]["loc"]["kernel"],
                                source["params"]["encoders_rna"]["subspaces"]["loc"]["kernel"])
  np.testing.assert_array_equal(adopted["batch_stats"]["decoders_rna"]["HiddenBlock_0"]["MaskedBatchNorm_0"]["mean"],
                                source["batch_stats"]["decoders_rna"]["HiddenBlock_0"]["MaskedBatchNorm_0"]["mean"])


def test_batches_are_matched_by_name_not_position():
  old, new = model(2), model(2)
  source, fresh = variables(old, 0), variables(new, 1)
  swapped = {"rna": OLD[::-1], "adt": OLD[::-1]}
  adopted = adopt.adopt(source, fresh, batches(old), swapped, shared_batches=True)
  np.testing.assert_array_equal(adopted["params"]["decoders_rna"]["bias"],
                                source["params"]["decoders_rna"]["bias"][::-1])


def test_other_model_sizes_are_refused_with_the_array_named():
  old, new = model(2), model(3, decoder_width=16)
  with pytest.raises(adopt.AdoptError, match=r"params/decoders_\w+/\S+: shape .* does not become|only the batch"):
    adopt.adopt(variables(old, 0), variables(new, 1), batches(old), batches(new), shared_batches=True)
