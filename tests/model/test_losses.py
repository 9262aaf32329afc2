"""Every term of losses.generator_objective / discriminator_objective against a NumPy reading of docs/method.md §2.

A tiny two-modality CLUE without dropout runs in eval mode (BatchNorm on running statistics; float64) or train mode
(BatchNorm on the rows of each call; float32, as trained). The only randomness is the Gaussian draws, which the
reference re-derives from the same keys; everything else in it is NumPy in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import gammaln, log_softmax, softmax

from clue_jax.batch import Batch, ModalityBatch
from clue_jax.model import losses, rng as clue_rng
from clue_jax.model.network import CLUE, MaskedBatchNorm, ModalitySpec

NAMES = ("rna", "adt")
FEATURES = {"rna": 7, "adt": 4}
K, LATENT, REP, B = 2, 3, 5, 6
WEIGHTS = losses.Weights(data=1.0, kl=0.5, joint_cross=2.0, real_cross=0.7, cos=1.3, align=2.0, modality=(1.2, 0.8))
# Rows 0-1 paired, 2 and 4 rna-only, 3 and 5 adt-only.
MASKS = {"rna": [1, 1, 1, 0, 1, 0], "adt": [1, 1, 0, 1, 0, 1]}
BATCHES = {"rna": [0, 1, 1, 0, 1, 0], "adt": [1, 1, 0, 0, 1, 0]}
KEY = jax.random.PRNGKey(42)
NOISE_KEY = jax.random.split(KEY)[1]
TERMS = ("self_rna", "self_adt", "kl_rna", "kl_adt", "joint_cross_rna", "joint_cross_adt", "real_cross_rna",
         "real_cross_adt", "cos", "dsc", "gen")

MODEL = CLUE(tuple(ModalitySpec(n, REP, FEATURES[n], 2, "NB", False) for n in NAMES), latent_dim=LATENT,
             encoder_depth=1, encoder_width=6, decoder_depth=1, decoder_width=6, discriminator_depth=1,
             discriminator_width=6, dropout=0.0, shared_batches=True)
# XLA's backend optimisations only cost compile time on graphs this small.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_batch(masks=MASKS, seed=0):
  rng = np.random.default_rng(seed)
  modalities = {}
  for name in NAMES:
    modalities[name] = ModalityBatch(
        rep=rng.normal(size=(B, REP)), counts=rng.poisson(2.0, (B, FEATURES[name])).astype(float),
        batch=np.asarray(BATCHES[name], np.int32), label=np.full(B, -1, np.int32), mask=np.asarray(masks[name], float))
  return Batch(modalities, np.ones(B))


def to_jax(tree, dtype=jnp.float64):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.int32 if a.dtype == np.int32 else dtype), tree)


@pytest.fixture(scope="module")
def variables():
  """The variables of MODEL.init, all drawn at random: heads, BatchNorm and running statistics included."""
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 1.5, leaf.shape)
    if "library" in name:  # Positive library sizes, so that the NB means are not stuck at eps.
      return rng.uniform(0.1, 0.5, leaf.shape)
    return rng.uniform(-0.5, 0.5, leaf.shape)

  shapes = jax.eval_shape(MODEL.init, jax.random.PRNGKey(0), to_jax(make_batch(), jnp.float32))
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def objectives(clue, batch, noise_scale, weights):
  """Generator terms at KEY and the discriminator loss at the generator's noise key, in eval mode."""
  _, terms = losses.generator_objective(clue, batch, KEY, noise_scale, weights, train=False)
  terms["disc"] = losses.discriminator_objective(clue, batch, NOISE_KEY, noise_scale, weights, train=False)
  return terms


OBJECTIVES = jax.jit(nn.apply(objectives, MODEL), static_argnums=3, compiler_options=FAST_COMPILE)  # Weights: static.


def evaluate(variables, batch, noise_scale=0.7, weights=WEIGHTS):
  return {k: float(v) for k, v in OBJECTIVES(to_jax(variables), to_jax(batch), noise_scale, weights).items()}


def train_objective(params, batch_stats, batch):
  """L_gen and its terms in train mode (masked BatchNorm on batch statistics)."""
  (total, terms), _ = nn.apply(losses.generator_objective, MODEL, mutable=["batch_stats"])(
      {"params": params, "batch_stats": batch_stats}, batch, KEY, 0.7, WEIGHTS, train=True)
  return total, terms


TRAIN_OBJECTIVE = jax.jit(jax.value_and_grad(train_objective, has_aux=True), compiler_options=FAST_COMPILE)


# ---------------------------------------------------------------- NumPy reference (docs/method.md §1-§2)


def linear(p, x):
  return x @ p["kernel"] + p["bias"]


def leaky_relu(x):
  return np.where(x > 0, x, 0.2 * x)


def softplus(x):
  return np.logaddexp(0.0, x)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def batch_norm(p, stats, x, rows, train):
  """Eval: running statistics. Train: mean and biased variance of the selected rows."""
  if train:
    selected = x[rows > 0]
    mean, var = selected.mean(0), selected.var(0)
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def encode(v, name, rep, counts, train=False):
  """loc and std over all K subspaces (in subspace order), and the K library sizes."""
  p = v["params"][f"encoders_{name}"]
  stats = v["batch_stats"][f"encoders_{name}"]["subspaces"]["HiddenBlock_0"]["MaskedBatchNorm_0"]
  locs, stds = [], []
  for j in range(K):
    sub = jax.tree.map(lambda a: a[j], p["subspaces"])
    h = leaky_relu(linear(sub["HiddenBlock_0"]["Linear_0"], rep))
    h = batch_norm(sub["HiddenBlock_0"]["MaskedBatchNorm_0"], {k: s[j] for k, s in stats.items()}, h, np.ones(B),
                   train)
    locs.append(linear(sub["loc"], h))
    stds.append(softplus(linear(sub["std"], h)) + 1e-7)
  library = np.maximum(linear(p["library"], counts), 0.0)
  return np.concatenate(locs, 1), np.concatenate(stds, 1), library


def nb_log_prob(x, mean, theta):
  """torch NegativeBinomial(total_count=theta, logits=log(mean + eps) - log(theta)).log_prob(x)."""
  logits = np.log(mean + 1e-7) - np.log(theta)
  return (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1) + theta * log_sigmoid(-logits)
          + x * log_sigmoid(logits))


def decode_nll(v, name, counts, b, z, library, rows, train):
  """Mean over the selected rows x features of -log p(counts | z, b, l); 0 (skipped) without rows."""
  if not rows.any():
    return 0.0
  p = v["params"][f"decoders_{name}"]
  stats = v["batch_stats"][f"decoders_{name}"]["HiddenBlock_0"]["MaskedBatchNorm_0"]
  onehot = np.eye(2)[b]
  h = leaky_relu(linear(p["HiddenBlock_0"]["Linear_0"], np.concatenate([z, onehot], 1)))
  h = batch_norm(p["HiddenBlock_0"]["MaskedBatchNorm_0"], stats, h, rows, train)
  loc = linear(p["loc"], np.concatenate([h, onehot], 1))
  mean = softmax(softplus(p["scale_lin"][b]) * loc + p["bias"][b], axis=1) * library[:, None]
  log_prob = nb_log_prob(counts, mean, np.exp(p["log_theta"][b]))
  return -log_prob[rows > 0].mean()


def dsc_cross_entropy(v, batch, vs):
  """Mean over K * B of the CE of the discriminator's logits on v_k (+ batch one-hot) against k."""
  p = v["params"]["discriminator"]
  ce = []
  for k, name in enumerate(NAMES):
    x = np.concatenate([vs[k], np.eye(2)[batch[name].batch]], 1)
    ce.append(-log_softmax(linear(p["Linear_1"], leaky_relu(linear(p["Linear_0"], x))), axis=1)[:, k])
  return np.concatenate(ce).mean()


def normal_draws(key, dtype):
  """One N(0, I) draw per modality from split(key, K), as the objectives make them."""
  return [np.asarray(clue_rng.normal(k, (B, K * LATENT), dtype), np.float64) for k in jax.random.split(key, K)]


def posterior_means(v, batch):
  return [encode(v, n, batch[n].rep, batch[n].counts)[0] for n in NAMES]


def unit(u):
  return u / np.linalg.norm(u, axis=1, keepdims=True)


def subspace(u, name):
  j = NAMES.index(name)
  return u[:, j * LATENT:(j + 1) * LATENT]


def reference_terms(v, batch, noise_scale=0.7, weights=WEIGHTS, dtype=jnp.float64, train=False):
  sample_key, noise_key = jax.random.split(KEY)
  loc, std, lib, u = {}, {}, {}, {}
  for name, eps in zip(NAMES, normal_draws(sample_key, dtype)):
    loc[name], std[name], lib[name] = encode(v, name, batch[name].rep, batch[name].counts, train)
    u[name] = unit(loc[name] + std[name] * eps)
  m = {name: batch[name].mask for name in NAMES}
  joint = unit(sum(m[n][:, None] * u[n] for n in NAMES) / sum(m.values())[:, None])

  def nll(target, z, source, rows):
    x = batch[target]
    return decode_nll(v, target, x.counts, x.batch, z, lib[source][:, NAMES.index(target)], rows, train)

  t = {}
  for n in NAMES:
    t[f"self_{n}"] = nll(n, subspace(u[n], n), n, np.ones(B))
    kl = (np.log(1.0 / std[n]) + 0.5 * (std[n] ** 2 + loc[n] ** 2) - 0.5).sum(1)
    t[f"kl_{n}"] = kl.mean() / FEATURES[n]
    t[f"joint_cross_{n}"] = nll(n, subspace(joint, n), n, m[n])
    t[f"real_cross_{n}"] = sum(nll(n, subspace(u[s], n), s, m[s] * m[n]) for s in NAMES if s != n)
  t["cos"] = sum(1.0 - np.mean((u[n] * joint).sum(1)[m[n] > 0]) for n in NAMES if m[n].any())
  xi = normal_draws(noise_key, dtype)
  t["dsc"] = dsc_cross_entropy(v, batch, [loc[n] + noise_scale * e for n, e in zip(NAMES, xi)])
  w = dict(zip(NAMES, weights.modality))
  t["gen"] = (weights.data * sum(w[n] * (t[f"self_{n}"] + weights.kl * t[f"kl_{n}"]) for n in NAMES)
              + weights.joint_cross * sum(w[n] * t[f"joint_cross_{n}"] for n in NAMES)
              + weights.real_cross * sum(w[n] * t[f"real_cross_{n}"] for n in NAMES)
              + weights.cos * t["cos"] - weights.align * t["dsc"])
  return t


def assert_terms_close(got, want, rtol, atol):
  assert set(got) - {"disc"} == set(TERMS)
  for name in TERMS:
    np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


# ---------------------------------------------------------------- tests


def test_generator_terms_match_reference(variables, x64):
  batch = make_batch()
  got, want = evaluate(variables, batch), reference_terms(variables, batch)
  assert_terms_close(got, want, rtol=1e-9, atol=1e-12)
  assert all(abs(want[name]) > 1e-3 for name in TERMS)  # Every term is in play.


def test_discriminator_objective_is_weighted_dsc(variables, x64):
  batch = make_batch()
  got = evaluate(variables, batch)
  vs = [loc + 0.7 * xi for loc, xi in zip(posterior_means(variables, batch), normal_draws(NOISE_KEY, jnp.float64))]
  np.testing.assert_allclose(got["disc"], WEIGHTS.align * dsc_cross_entropy(variables, batch, vs), rtol=1e-9)
  np.testing.assert_allclose(got["disc"], WEIGHTS.align * got["dsc"], rtol=1e-12)


def test_noise_moves_only_the_adversarial_term(variables, x64):
  batch = make_batch()
  quiet, noisy = evaluate(variables, batch, noise_scale=0.0), evaluate(variables, batch, noise_scale=1.0)
  assert abs(quiet["dsc"] - noisy["dsc"]) > 1e-3
  for name in TERMS:
    if name not in ("dsc", "gen"):
      assert quiet[name] == noisy[name], name
  np.testing.assert_allclose(quiet["dsc"], dsc_cross_entropy(variables, batch, posterior_means(variables, batch)),
                             rtol=1e-9)


def test_unobserved_modality_terms_vanish(variables, x64):
  batch = make_batch({"rna": [1] * B, "adt": [0] * B})
  got, want = evaluate(variables, batch), reference_terms(variables, batch)
  assert_terms_close(got, want, rtol=1e-9, atol=1e-12)
  assert got["joint_cross_adt"] == 0.0 and got["real_cross_rna"] == 0.0 and got["real_cross_adt"] == 0.0
  # Only rna is observed, so the joint embedding is u_rna: a non-zero adt cosine part would show here.
  assert abs(got["cos"]) < 1e-12
  assert all(np.isfinite(list(got.values())))


@pytest.mark.parametrize("masks", [MASKS, {"rna": [1] * B, "adt": [0] * B}], ids=["mixed", "adt_unobserved"])
def test_train_mode_terms_and_finite_gradients(variables, masks):
  """float32, as trained: decoder BatchNorm normalises each call over exactly the rows that call scores."""
  batch = make_batch(masks)
  v = to_jax(variables, jnp.float32)
  (_, terms), grads = TRAIN_OBJECTIVE(v["params"], v["batch_stats"], to_jax(batch, jnp.float32))
  v32 = jax.tree.map(lambda a: np.asarray(a, np.float32).astype(np.float64), variables)
  want = reference_terms(v32, batch, dtype=jnp.float32, train=True)
  assert_terms_close({k: float(t) for k, t in terms.items()}, want, rtol=2e-5, atol=2e-5)
  grads = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, g in grads:
    assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
  assert sum(float(np.abs(np.asarray(g)).sum()) for _, g in grads) > 0


# ---------------------------------------------------------------- masked BatchNorm in train mode


@pytest.fixture
def norm_inputs():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 5)) * 2.0 + 1.0
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 0], float)
  v = {"params": {"scale": 1.0 + 0.3 * rng.normal(size=5), "bias": 0.2 * rng.normal(size=5)},
       "batch_stats": {"mean": 0.5 * rng.normal(size=5), "var": rng.uniform(0.5, 2.0, 5)}}
  return v, x, mask


NORM = jax.jit(lambda v, x, mask: MaskedBatchNorm().apply(v, x, True, mask, mutable=["batch_stats"]),
               compiler_options=FAST_COMPILE)


def run_norm(v, x, mask):
  y, updates = NORM(to_jax(v), jnp.asarray(x), jnp.asarray(mask))
  return np.asarray(y), jax.tree.map(np.asarray, updates["batch_stats"])


def test_masked_batch_norm_uses_selected_rows(norm_inputs, x64):
  v, x, mask = norm_inputs
  y, stats = run_norm(v, x, mask)
  selected = x[mask > 0]
  mean, var = selected.mean(0), selected.var(0)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5) * v["params"]["scale"] + v["params"]["bias"],
                             rtol=1e-10, atol=1e-12)
  old = v["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.9 * old["mean"] + 0.1 * mean, rtol=1e-12)
  np.testing.assert_allclose(stats["var"], 0.9 * old["var"] + 0.1 * selected.var(0, ddof=1), rtol=1e-12)


def test_masked_batch_norm_without_rows_keeps_running_stats(norm_inputs, x64):
  v, x, _ = norm_inputs
  y, stats = run_norm(v, x, np.zeros(len(x)))
  assert np.isfinite(y).all()
  for name in ("mean", "var"):
    np.testing.assert_array_equal(stats[name], v["batch_stats"][name])

def test_stacked_batch_norm_calls_equal_separate_calls_in_order(norm_inputs, x64):
  """The decoder's passes run stacked: each normalised over its own rows, running statistics moved in order."""
  v, x, mask = norm_inputs
  masks = np.stack([np.ones(len(x)), mask, np.zeros(len(x)), 1.0 - mask])
  y, stats = run_norm(v, np.stack([x, x + 1.0, x * 2.0, -x]), masks)
  expected_v = jax.tree.map(np.copy, v)
  for p, (xp, mp) in enumerate(zip([x, x + 1.0, x * 2.0, -x], masks)):
    yp, expected_v["batch_stats"] = run_norm(expected_v, xp, mp)
    np.testing.assert_allclose(y[p], yp, rtol=1e-12, atol=1e-12)
  for name in ("mean", "var"):
    np.testing.assert_allclose(stats[name], expected_v["batch_stats"][name], rtol=1e-12)
  assert not np.allclose(stats["mean"], run_norm(v, x, mask)[1]["mean"])



# ---------------------------------------------------------------- hand-computed values


def reference_contrastive(v, batch, temperature):
  loc = dict(zip(NAMES, posterior_means(v, batch)))
  rows = np.flatnonzero(batch["rna"].mask * batch["adt"].mask)
  logits = unit(loc["rna"][rows]) @ unit(loc["adt"][rows]).T / temperature
  return np.mean((-np.diag(log_softmax(logits, axis=1)) - np.diag(log_softmax(logits, axis=0))) / 2)


CONTRASTIVE = WEIGHTS._replace(contrastive=0.5, temperature=0.2)


def test_contrastive_term_is_symmetric_infonce_on_paired_rows_and_adds_only_itself(variables, x64):
  batch = make_batch()
  got, base = evaluate(variables, batch, weights=CONTRASTIVE), evaluate(variables, batch)
  assert "contrastive" not in base  # Off by default: not even computed.
  np.testing.assert_allclose(got["contrastive"], reference_contrastive(variables, batch, 0.2), rtol=1e-9)
  assert got["contrastive"] > 1e-3
  for name in TERMS:
    if name != "gen":
      assert got[name] == base[name], name
  np.testing.assert_allclose(got["gen"], base["gen"] + 0.5 * got["contrastive"], rtol=1e-12)
  unpaired = evaluate(variables, make_batch({"rna": [1] * B, "adt": [0] * B}), weights=CONTRASTIVE)
  assert unpaired["contrastive"] == 0.0


def test_contrastive_term_over_a_sharded_batch_equals_the_whole_batch(variables, x64):
  batch = jax.tree.map(lambda a: np.concatenate([a, a]), make_batch())  # 12 rows, 4 paired, over 4 devices.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("batch",))
  sharded = jax.device_put(to_jax(batch), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
  whole = evaluate(variables, batch, weights=CONTRASTIVE)
  split = {k: float(v) for k, v in OBJECTIVES(to_jax(variables), sharded, 0.7, CONTRASTIVE).items()}
  np.testing.assert_allclose(whole["contrastive"], reference_contrastive(variables, batch, 0.2), rtol=1e-9)
  for name in ("contrastive", "gen"):
    np.testing.assert_allclose(split[name], whole[name], rtol=1e-10, err_msg=name)


def test_gaussian_kl_by_hand():
  assert np.asarray(losses.gaussian_kl(jnp.zeros((3, 4)), jnp.ones((3, 4)))).tolist() == [0.0] * 3
  # 0.5 * (1 + 4 - 1) - log 2 per dimension.
  np.testing.assert_allclose(losses.gaussian_kl(jnp.ones((1, 3)), jnp.full((1, 3), 2.0)), [3 * (2 - np.log(2))],
                             rtol=1e-6)


def test_identical_embeddings_have_zero_cosine_term(variables, x64):
  v = jax.tree.map(np.copy, variables)
  rna, adt = v["params"]["encoders_rna"]["subspaces"], v["params"]["encoders_adt"]["subspaces"]
  adt.update(jax.tree.map(np.copy, rna))
  rna["std"]["bias"] = adt["std"]["bias"] = np.full_like(rna["std"]["bias"], -40.0)  # std = 1e-7.
  v["batch_stats"]["encoders_adt"] = jax.tree.map(np.copy, v["batch_stats"]["encoders_rna"])
  batch = make_batch()
  batch = batch.replace(modalities={**batch.modalities, "adt": batch["adt"].replace(rep=batch["rna"].rep)})
  assert abs(evaluate(v, batch)["cos"]) < 1e-10
  assert abs(evaluate(variables, batch)["cos"]) > 1e-2


def test_uninformative_discriminator_gives_log_2(variables, x64):
  v = jax.tree.map(np.copy, variables)
  final = v["params"]["discriminator"]["Linear_1"]
  final["kernel"], final["bias"] = np.zeros_like(final["kernel"]), np.zeros_like(final["bias"])
  got = evaluate(v, make_batch())
  np.testing.assert_allclose(got["dsc"], np.log(2.0), rtol=1e-12)
  np.testing.assert_allclose(got["disc"], WEIGHTS.align * np.log(2.0), rtol=1e-12)


def test_l2_normalize_ignored_zero_row_gets_zero_gradient():
  """A padding row (valid 0) counts in no modality, so its joint embedding is the zero vector, which nothing uses.

  The 1e-12 floor keeps the value finite, but the norm's NaN gradient at 0 leaks through it (0 * NaN), so one
  padding row turns every encoder gradient into NaN (training batches are never padded today).
  """
  u = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
  used = jnp.array([[0.0], [1.0]])
  grad = np.asarray(jax.grad(lambda u: (losses.l2_normalize(u) * used).sum())(u))
  np.testing.assert_array_equal(grad[0], 0.0)


def test_pick_rows_is_indexing_with_its_gradient():
  """The decoder heads' one-hot pick equals table[index] (negative indices wrap), value and gradient."""
  from clue_jax.model.network import pick_rows
  rng = np.random.default_rng(7)
  table = jnp.asarray(rng.normal(size=(3, 5)))
  index = jnp.asarray([[0, 2, -1, 1], [1, 1, 0, -3]], jnp.int32)
  weights = jnp.asarray(rng.normal(size=(2, 4, 5)))
  np.testing.assert_array_equal(pick_rows(table, index), table[index])
  np.testing.assert_allclose(jax.grad(lambda t: (pick_rows(t, index) * weights).sum())(table),
                             jax.grad(lambda t: (t[index] * weights).sum())(table), rtol=1e-6)
