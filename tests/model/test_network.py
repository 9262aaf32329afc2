"""Parameter counts against the reference, the vmapped encoder matrix, and PyTorch initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clue_jax import batch as batch_lib
from clue_jax.model.network import CLUE, ModalitySpec, SubspaceEncoder, bf16_matmul
from clue_jax.train import steps

SPECS = (ModalitySpec("rna", 100, 2000, 2, "NB", False), ModalitySpec("adt", 100, 100, 2, "NB", False))
COMPETITION_CITE = dict(latent_dim=20, encoder_width=512, decoder_depth=1, decoder_width=128,
                        discriminator_width=128)


def example_batch(specs, rows=4):
  return batch_lib.zeros({s.name: (s.n_features, s.input_dim) for s in specs}, rows)


def init(model, specs=SPECS):
  return model.init(jax.random.key(0), example_batch(specs))


@pytest.mark.parametrize("sizes, expected", [({}, 1_288_658), (COMPETITION_CITE, 1_668_322)],
                         ids=["library_defaults", "competition_cite"])
def test_parameter_count_matches_reference(sizes, expected):
  model = CLUE(SPECS, shared_batches=True, **sizes)
  variables = jax.eval_shape(model.init, jax.random.key(0), example_batch(SPECS))
  assert steps.count_params(variables["params"]) == expected
  # Running statistics are state, not parameters: 2 modalities x 2 subspaces x depth x (mean, var).
  width = sizes.get("encoder_width", 256)
  decoder = sizes.get("decoder_depth", 2) * sizes.get("decoder_width", 256)
  assert steps.count_params(variables["batch_stats"]) == 2 * (2 * 2 * 2 * width + 2 * decoder)


def test_encoder_matrix_equals_separate_mlps():
  """The vmapped K subspace MLPs compute what K independent MLPs with the sliced parameters compute."""
  model = CLUE(SPECS, latent_dim=3, encoder_width=8, dropout=0.0)
  variables = init(model)
  rep = jax.random.normal(jax.random.key(1), (5, 100))
  counts = jnp.ones((5, 2000))
  loc, std, _ = model.apply(variables, "rna", rep, counts, True, method=CLUE.encode, mutable=["batch_stats"])[0]
  encoder_params = variables["params"]["encoders_rna"]["subspaces"]
  encoder_stats = variables["batch_stats"]["encoders_rna"]["subspaces"]
  for j in range(2):
    single = {"params": jax.tree.map(lambda x: x[j], encoder_params),
              "batch_stats": jax.tree.map(lambda x: x[j], encoder_stats)}
    (loc_j, std_j), _ = SubspaceEncoder(3, 2, 8, 0.0, True).apply(single, rep, mutable=["batch_stats"])
    np.testing.assert_allclose(loc[:, 3 * j:3 * j + 3], loc_j, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std[:, 3 * j:3 * j + 3], std_j, rtol=1e-6, atol=1e-6)
  # The two subspace MLPs are initialised independently.
  kernel = encoder_params["HiddenBlock_0"]["Linear_0"]["kernel"]
  assert not np.allclose(kernel[0], kernel[1])


def test_pytorch_initialisation_and_zero_heads():
  variables = init(CLUE(SPECS, shared_batches=True))
  params = variables["params"]
  kernel = params["decoders_rna"]["loc"]["kernel"]  # fan_in = 256 + 2 batches
  bound = 1 / np.sqrt(258)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  bias = params["decoders_rna"]["loc"]["bias"]
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound
  for head in ("scale_lin", "bias", "log_theta"):
    assert params["decoders_rna"][head].shape == (2, 2000)
    assert not np.any(params["decoders_rna"][head])
  bn = params["encoders_rna"]["subspaces"]["HiddenBlock_0"]["MaskedBatchNorm_0"]
  assert np.all(bn["scale"] == 1) and np.all(bn["bias"] == 0)


def test_discriminator_sees_batch_only_when_shared():
  def first_kernel(shared_batches):
    model = CLUE(SPECS, shared_batches=shared_batches)
    variables = jax.eval_shape(model.init, jax.random.key(0), example_batch(SPECS))
    return variables["params"]["discriminator"]["Linear_0"]["kernel"]

  shared, plain = first_kernel(True), first_kernel(False)
  assert shared.shape[0] == 100 + 2 and plain.shape[0] == 100


def test_any_number_of_modalities_under_any_names():
  specs = (ModalitySpec("gex", 10, 30, 1, "NB", False), ModalitySpec("prot", 10, 5, 1, "Normal", False),
           ModalitySpec("peaks", 10, 40, 1, "Bernoulli", False))
  model = CLUE(specs, latent_dim=4, encoder_width=8, decoder_width=8, discriminator_width=8)
  variables = init(model, specs)
  loc, _, library = model.apply(variables, "peaks", jnp.ones((3, 10)), jnp.ones((3, 40)), False,
                                method=CLUE.encode)
  assert loc.shape == (3, 12) and library is None
  assert variables["params"]["discriminator"]["Linear_2"]["kernel"].shape[-1] == 3


def test_shared_latent_ablation_has_one_subspace_read_whole_by_every_decoder():
  specs = (ModalitySpec("rna", 10, 30, 2, "NB", False), ModalitySpec("adt", 10, 5, 2, "NB", False))
  model = CLUE(specs, latent_dim=4, encoder_width=8, decoder_width=8, discriminator_width=8, shared_latent=True)
  variables = init(model, specs)
  encoder = variables["params"]["encoders_rna"]
  assert encoder["subspaces"]["loc"]["kernel"].shape == (1, 8, 8)  # One subspace of K * latent_dim.
  assert encoder["library"]["kernel"].shape == (30, 2)  # Still one library size per modality.
  assert variables["params"]["decoders_adt"]["HiddenBlock_0"]["Linear_0"]["kernel"].shape[0] == 8 + 2
  u = jnp.arange(6.0 * 8).reshape(6, 8)
  assert model.bind(variables).subspace(u, "adt") is u


def test_bfloat16_matmuls_keep_float32_parameters_and_outputs():
  """Mixed precision: same parameters, float32 outputs and gradients, encodings within bf16 rounding of float32,
  and the matmuls really run on bf16 operands."""
  sizes = dict(latent_dim=4, encoder_width=16, decoder_width=16, discriminator_width=16, dropout=0.0)
  full, mixed = CLUE(SPECS, **sizes), CLUE(SPECS, matmul_dtype="bfloat16", **sizes)
  variables = init(full)
  assert jax.tree.map(jnp.shape, init(mixed)) == jax.tree.map(jnp.shape, variables)
  rep = jax.random.normal(jax.random.key(1), (8, 100))
  counts = jnp.ones((8, 2000))

  def encode(model, params):
    loc, _, _ = model.apply({**variables, "params": params}, "rna", rep, counts, False, method=CLUE.encode)
    return loc

  loc_full, loc_mixed = encode(full, variables["params"]), encode(mixed, variables["params"])
  assert loc_mixed.dtype == jnp.float32
  assert 0 < float(jnp.abs(loc_mixed - loc_full).max()) < 0.05 * float(jnp.abs(loc_full).max())
  grads = jax.grad(lambda p: encode(mixed, p).sum())(variables["params"])
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
  assert "bf16" in jax.jit(lambda p: encode(mixed, p)).lower(variables["params"]).as_text()


def test_bf16_matmul_gradient_multiplies_bf16_operands_into_float32():
  """Forward and both gradient products take bf16 operands and accumulate in float32; values and gradients stay
  within bf16 rounding of float32, also under vmap with a shared input (as the subspace encoders call it)."""
  x = jax.random.normal(jax.random.key(0), (48, 40))
  w = jax.random.normal(jax.random.key(1), (3, 40, 24))
  cotangent = jax.random.normal(jax.random.key(2), (3, 48, 24))

  def loss(matmul, x, w):
    return (jax.vmap(matmul, in_axes=(None, 0))(x, w) * cotangent).sum()

  products = [e for e in jax.make_jaxpr(jax.grad(lambda x, w: loss(bf16_matmul, x, w), (0, 1)))(x, w).eqns
              if e.primitive.name == "dot_general"]
  assert len(products) == 3
  assert all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars)
  assert all(v.aval.dtype == jnp.float32 for e in products for v in e.outvars)
  exact = jax.grad(lambda x, w: loss(jnp.dot, x, w), (0, 1))(x, w)
  mixed = jax.jit(jax.grad(lambda x, w: loss(bf16_matmul, x, w), (0, 1)))(x, w)
  for got, want in zip(mixed, exact):
    assert got.dtype == jnp.float32
    assert 0 < float(jnp.abs(got - want).max()) < 0.02 * float(jnp.abs(want).max())
  exact_product = x @ w
  mixed_product = jax.vmap(bf16_matmul, in_axes=(None, 0))(x, w)
  np.testing.assert_allclose(mixed_product, exact_product, atol=0.02 * float(jnp.abs(exact_product).max()))


@pytest.mark.parametrize("activation, positive", [("relu", False), ("softplus", True)])
def test_library_head_activation(activation, positive):
  """A library head pushed below zero: ReLU outputs 0 for every cell (dead, no gradient), softplus stays positive
  with a gradient; both have the same parameters."""
  model = CLUE(SPECS, latent_dim=4, encoder_width=16, decoder_width=16, library_activation=activation)
  variables = init(model)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, init(CLUE(SPECS, latent_dim=4, encoder_width=16,
                                                                                 decoder_width=16)))
  params = variables["params"]
  params["encoders_rna"]["library"]["bias"] = jnp.full((2,), -20.0)

  def library(p):
    _, _, sizes = model.apply({**variables, "params": p}, "rna", jnp.ones((5, 100)), jnp.ones((5, 2000)), False,
                              method=CLUE.encode)
    return sizes

  sizes = library(params)
  assert sizes.shape == (5, 2)
  assert bool((sizes > 0).all()) == positive and bool((sizes == 0).all()) != positive
  grad = jax.grad(lambda p: library(p).sum())(params)["encoders_rna"]["library"]["bias"]
  assert bool((grad > 0).all()) == positive
