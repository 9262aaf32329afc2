"""CLUE's Flax (Linen) modules: encoder matrix, cross-linked decoders, modality discriminator, classifier.

Layer by layer as the reference (docs/method.md §1): PyTorch initialisation, activation before BatchNorm, the batch
one-hot injected at every decoder layer, zero-initialised per-batch heads. Modules are pure: all state lives in the
`params` and `batch_stats` collections, all randomness in the `dropout` rng stream.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from clue_jax.model import rng

EPS = 1e-7
LEAKY_SLOPE = 0.2

LIKELIHOODS = ("NB", "Normal", "ZIN", "ZILN", "Bernoulli", "MSE", "RMSE")
# Per-feature, per-batch heads of each likelihood (docs/method.md §1.3 table).
HEADS = {
    "NB": ("scale_lin", "bias", "log_theta"),
    "Normal": ("std_lin",),
    "ZIN": ("std_lin", "zi_logits"),
    "ZILN": ("std_lin", "zi_logits"),
    "Bernoulli": ("scale_lin", "bias"),
    "MSE": (),
    "RMSE": (),
}


class ModalitySpec(NamedTuple):
  """Shapes and choices of one modality, as the model needs them."""

  name: str
  input_dim: int  # Encoder input width (representation or features).
  n_features: int  # Decoder output width.
  n_batches: int
  likelihood: str
  normalize_input: bool  # Encoder input is log1p-CP10k of the counts (NB without a representation).


def torch_uniform(fan_in: int):
  """PyTorch's default Linear initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / jnp.sqrt(jnp.asarray(fan_in, jnp.float32))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


@jax.custom_vjp
def bf16_matmul(x, w):
  """x @ w of 2-D arrays with bf16 operands and float32 accumulation, in both products of its gradient too.

  Autodiff of `dot(x.astype(bf16), w.astype(bf16))` would multiply the float32 cotangent with a bf16 operand (no
  bf16 matrix units) and round the gradients to bf16; here the cotangent is rounded instead and the gradients
  accumulate in float32.
  """
  return _bf16_matmul_forward(x, w)[0]


def _bf16_matmul_forward(x, w):
  x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  return jnp.dot(x, w, preferred_element_type=jnp.float32), (x, w)


def _bf16_matmul_backward(residuals, g):
  x, w = residuals
  g = g.astype(jnp.bfloat16)
  d_x = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  d_w = jnp.dot(_materialised_transpose(x), g, preferred_element_type=jnp.float32)
  return d_x, d_w


def _materialised_transpose(a):
  """a.T of a 2-D array as a row-major copy.

  A plain `.T` is folded into the product's dimension numbers, and XLA:CPU runs a bf16 product that contracts
  its operands' leading axis without the bf16 matrix units (~5x slower), and under `vmap` not at all ("Unsupported
  element type for DotThunk"). Through a unit axis the transpose is a real copy and the product a plain one.
  """
  rows, cols = a.shape
  return jnp.swapaxes(a.reshape(rows, cols, 1), 0, 2).reshape(cols, rows)


bf16_matmul.defvjp(_bf16_matmul_forward, _bf16_matmul_backward)


class Linear(nn.Module):
  """x @ kernel + bias with float32 parameters; `matmul_dtype` "bfloat16" multiplies bf16 operands into float32."""

  features: int
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
    bias = self.param("bias", torch_uniform(fan_in), (self.features,))
    # Leading axes folded into one: XLA's CPU backend is far slower on dots with several contracting dimensions
    # (the kernel gradient of a 3-D input).
    rows = x.reshape(-1, fan_in)
    out = (rows @ kernel if self.matmul_dtype == "float32" else bf16_matmul(rows, kernel)) + bias
    return out.reshape(x.shape[:-1] + (self.features,))


class MaskedBatchNorm(nn.Module):
  """BatchNorm1d with PyTorch semantics over the rows selected by `row_mask`.

  Training normalises with the biased variance of the selected rows and moves the running statistics
  (momentum 0.1) towards their mean and *unbiased* variance; no rows selected leaves them untouched, as the
  reference, which skips the call. Evaluation uses the running statistics. Inputs (..., B, F) with leading axes
  are independent calls stacked: each is normalised over its own rows, and the running statistics move once per
  call, in order.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool, row_mask=None):
    width = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (width,))
    bias = self.param("bias", nn.initializers.zeros, (width,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (width,))
    running_var = self.variable("batch_stats", "var", jnp.ones, (width,))
    if not train:
      return (x - running_mean.value) / jnp.sqrt(running_var.value + self.epsilon) * scale + bias
    weights = jnp.ones(x.shape[:-1], x.dtype) if row_mask is None else row_mask.astype(x.dtype)
    count = weights.sum(-1)[..., None]  # (..., 1)
    weights = weights[..., None]
    mean = (weights * x).sum(-2) / jnp.maximum(count, 1.0)  # (..., F)
    var = (weights * jnp.square(x - mean[..., None, :])).sum(-2) / jnp.maximum(count, 1.0)
    if not self.is_initializing():
      unbiased = var * count / jnp.maximum(count - 1.0, 1.0)
      stats = (mean.reshape(-1, width), unbiased.reshape(-1, width), count.reshape(-1) > 0)
      for call_mean, call_var, seen in zip(*stats):
        running_mean.value = jnp.where(
            seen, (1 - self.momentum) * running_mean.value + self.momentum * call_mean, running_mean.value)
        running_var.value = jnp.where(
            seen, (1 - self.momentum) * running_var.value + self.momentum * call_var, running_var.value)
    return (x - mean[..., None, :]) / jnp.sqrt(var[..., None, :] + self.epsilon) * scale + bias


class Dropout(nn.Module):
  """Inverted dropout: zero with probability `rate`, the rest scaled by 1 / (1 - rate); masks from `rng`."""

  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    keep = rng.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
    return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class HiddenBlock(nn.Module):
  """Linear -> LeakyReLU(0.2) -> BatchNorm -> Dropout."""

  width: int
  dropout: float
  train: bool
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x, row_mask=None):
    x = nn.leaky_relu(Linear(self.width, self.matmul_dtype)(x), LEAKY_SLOPE)
    x = MaskedBatchNorm()(x, self.train, row_mask)
    return Dropout(self.dropout, deterministic=not self.train)(x)


class SubspaceEncoder(nn.Module):
  """One cell of the encoder matrix: an MLP to one subspace's Gaussian (loc, softplus + eps)."""

  latent_dim: int
  depth: int
  width: int
  dropout: float
  train: bool
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = HiddenBlock(self.width, self.dropout, self.train, self.matmul_dtype)(x)
    loc = Linear(self.latent_dim, self.matmul_dtype, name="loc")(x)
    std = nn.softplus(Linear(self.latent_dim, self.matmul_dtype, name="std")(x)) + EPS
    return loc, std


LIBRARY_ACTIVATIONS = {"relu": nn.relu, "softplus": nn.softplus}


class ModalityEncoder(nn.Module):
  """A modality's row of the encoder matrix: K subspace MLPs (vmapped) plus the NB library-size head.

  The library head gives one size per modality (the size this cell would have in each modality's decoder): a Linear
  layer over the counts, then `library_activation` (ReLU as the reference, which can die: 0 for every cell; softplus
  stays positive).
  """

  spec: ModalitySpec
  n_modalities: int
  n_subspaces: int
  latent_dim: int
  depth: int
  width: int
  dropout: float
  matmul_dtype: str = "float32"
  library_activation: str = "relu"

  @nn.compact
  def __call__(self, rep, counts, train: bool, with_library: bool = True):
    """Returns loc and std of q(u | x) over all K * latent_dim dimensions, and the library sizes (or None)."""
    x = counts if rep is None else rep
    if self.spec.normalize_input:
      x = jnp.log1p(counts * 1e4 / jnp.maximum(counts.sum(-1, keepdims=True), EPS))
    subspaces = nn.vmap(
        SubspaceEncoder,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=None,
        out_axes=1,
        axis_size=self.n_subspaces,
    )(self.latent_dim, self.depth, self.width, self.dropout, train, self.matmul_dtype, name="subspaces")
    loc, std = subspaces(x)  # (B, K, d) each.
    batch = x.shape[0]
    loc, std = loc.reshape(batch, -1), std.reshape(batch, -1)
    library = None
    if self.spec.likelihood == "NB" and (with_library or self.is_initializing()):
      activation = LIBRARY_ACTIVATIONS[self.library_activation]
      library = activation(Linear(self.n_modalities, self.matmul_dtype, name="library")(counts))
    return loc, std, library


class ModalityDecoder(nn.Module):
  """Decodes one subspace (plus the batch one-hot at every layer) into the likelihood's parameters.

  `z` is (B, d), or (P, B, d) for P passes over the same cells (then `library` and `row_mask` are (P, B)).
  """

  spec: ModalitySpec
  depth: int
  width: int
  dropout: float
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, z, batch_index, library, train: bool, row_mask=None):
    onehot = jax.nn.one_hot(batch_index, self.spec.n_batches, dtype=z.dtype)
    onehot = jnp.broadcast_to(onehot, z.shape[:-1] + onehot.shape[-1:])
    h = jnp.concatenate([z, onehot], -1)
    for _ in range(self.depth):
      h = HiddenBlock(self.width, self.dropout, train, self.matmul_dtype)(h, row_mask)
      h = jnp.concatenate([h, onehot], -1)
    loc = Linear(self.spec.n_features, self.matmul_dtype, name="loc")(h)
    shape = (self.spec.n_batches, self.spec.n_features)
    tables = {name: self.param(name, nn.initializers.zeros, shape) for name in HEADS[self.spec.likelihood]}
    # Head transforms per (batch, feature), then picked per cell and pass. (A (B, F) pick broadcast over the
    # passes would be cheaper forwards, but its gradient, a reduction over the pass axis, is slow on XLA's CPU.
    # NB picks (B, F) heads all the same: its fused likelihood sums their gradients over the passes cheaply.)
    index = batch_index if self.spec.likelihood == "NB" else jnp.broadcast_to(batch_index, loc.shape[:-1])
    heads = {name: pick_rows(table, index) for name, table in head_values(self.spec.likelihood, tables).items()}
    return distribution_params(self.spec.likelihood, loc, heads, library)


def pick_rows(table, index):
  """`table[index]` for a small (n_batches, F) table, as a product with the one-hot rows of `index`.

  XLA's CPU backend fuses a gather with the element-wise producers of its table (here softplus, exp, lgamma) and
  evaluates them once per gathered element; a dot reads the (n_batches, F) table as it is. Its gradient is a dot
  as well, not a scatter-add. Exact for finite tables (HIGHEST precision: no TF32 on accelerators); indices wrap
  and clamp as NumPy-style indexing does.
  """
  n = table.shape[0]
  index = jnp.clip(jnp.where(index < 0, index + n, index), 0, n - 1)
  return jnp.dot(jax.nn.one_hot(index, n, dtype=table.dtype), table, precision=jax.lax.Precision.HIGHEST)


def head_values(likelihood: str, tables):
  """The per-(batch, feature) quantities the likelihood needs, from its raw head tables."""
  if likelihood == "NB":
    theta = jnp.exp(tables["log_theta"])
    return {"scale": nn.softplus(tables["scale_lin"]), "bias": tables["bias"], "theta": theta,
            "lgamma_theta": gammaln(theta)}
  if likelihood == "Bernoulli":
    return {"scale": nn.softplus(tables["scale_lin"]), "bias": tables["bias"]}
  if likelihood in ("MSE", "RMSE"):
    return {}
  values = {"std": nn.softplus(tables["std_lin"]) + EPS}
  if likelihood in ("ZIN", "ZILN"):
    values["zi_logits"] = tables["zi_logits"]
  return values


def distribution_params(likelihood: str, loc, heads, library):
  """The decoder distribution's parameters from the decoder output `loc` (..., B, F) and the picked heads."""
  if likelihood == "NB":
    # The heads are (B, F), shared by the passes. The decoder output, heads and library also go out as they are:
    # the loss scores them with `likelihoods.nb_softmax_row_log_probs`, and under jit the unused mean is never
    # computed.
    proportions = jax.nn.softmax(heads["scale"] * loc + heads["bias"], axis=-1)
    return {"mean": proportions * library[..., None], "inverse_dispersion": heads["theta"],
            "lgamma_inverse_dispersion": heads["lgamma_theta"], "decoder_loc": loc, "logit_scale": heads["scale"],
            "logit_bias": heads["bias"], "library": library}
  if likelihood == "Bernoulli":
    return {"logits": heads["scale"] * loc + heads["bias"]}
  if likelihood in ("MSE", "RMSE"):
    return {"loc": loc}
  params = {"loc": loc, "scale": heads["std"]}
  if likelihood in ("ZIN", "ZILN"):
    params["zi_logits"] = heads["zi_logits"]
  return params


class Discriminator(nn.Module):
  """Modality classifier over the full embedding: [Linear -> LeakyReLU -> Dropout] x depth -> Linear(K)."""

  n_modalities: int
  depth: int
  width: int
  dropout: float
  matmul_dtype: str = "float32"

  @nn.compact
  def __call__(self, v, train: bool):
    for _ in range(self.depth):
      v = nn.leaky_relu(Linear(self.width, self.matmul_dtype)(v), LEAKY_SLOPE)
      v = Dropout(self.dropout, deterministic=not train)(v)
    return Linear(self.n_modalities, self.matmul_dtype)(v)


class CLUE(nn.Module):
  """The whole model. Methods are called one by one (within one `nn.apply`) by the objectives in `losses.py`."""

  specs: tuple[ModalitySpec, ...]
  latent_dim: int = 50
  encoder_depth: int = 2
  encoder_width: int = 256
  decoder_depth: int = 2
  decoder_width: int = 256
  discriminator_depth: int = 2
  discriminator_width: int = 256
  dropout: float = 0.2
  shared_batches: bool = False
  n_labels: int = 0  # > 0 adds the linear cell-type classifier.
  # Ablation: one shared latent of K * latent_dim dimensions, encoded by one MLP per modality and read whole by
  # every decoder, instead of the K modality-specific subspaces.
  shared_latent: bool = False
  matmul_dtype: str = "float32"  # "bfloat16": mixed precision (bf16 matmul operands, float32 accumulation).
  library_activation: str = "relu"  # Of the NB library-size heads: "relu" (the reference) or "softplus".
  normalize_u: bool = True  # L2-normalise the sampled embeddings before decoding (docs/method.md §2).

  def setup(self):
    k = len(self.specs)
    n_subspaces, subspace_dim = (1, k * self.latent_dim) if self.shared_latent else (k, self.latent_dim)
    self.encoders = {s.name: ModalityEncoder(s, k, n_subspaces, subspace_dim, self.encoder_depth,
                                             self.encoder_width, self.dropout, self.matmul_dtype,
                                             self.library_activation) for s in self.specs}
    self.decoders = {s.name: ModalityDecoder(s, self.decoder_depth, self.decoder_width, self.dropout,
                                             self.matmul_dtype) for s in self.specs}
    self.discriminator = Discriminator(k, self.discriminator_depth, self.discriminator_width, self.dropout,
                                       self.matmul_dtype)
    if self.n_labels:
      self.classifier = Linear(self.n_labels, self.matmul_dtype)

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.specs)

  def encode(self, name, rep, counts, train: bool, with_library: bool = True):
    return self.encoders[name](rep, counts, train, with_library)

  def decode(self, name, z, batch_index, library, train: bool, row_mask=None):
    return self.decoders[name](z, batch_index, library, train, row_mask)

  def discriminate(self, v, batch_index, train: bool):
    if self.shared_batches:
      v = jnp.concatenate([v, jax.nn.one_hot(batch_index, self.specs[0].n_batches, dtype=v.dtype)], -1)
    return self.discriminator(v, train)

  def classify(self, v):
    return self.classifier(v)

  def subspace(self, u, name):
    """The slice of a full embedding that belongs to modality `name` (all of it with a shared latent)."""
    if self.shared_latent:
      return u
    j = self.names.index(name)
    return u[..., j * self.latent_dim:(j + 1) * self.latent_dim]

  def __call__(self, inputs):
    """Touches every submodule once (used only to initialise variables)."""
    v = None
    for s in self.specs:
      x = inputs[s.name]
      loc, _, library = self.encode(s.name, x.rep, x.counts, train=False)
      self.decode(s.name, self.subspace(loc, s.name), x.batch,
                  None if library is None else library[:, 0], train=False)
      v = loc
    logits = self.discriminate(v, inputs[self.specs[0].name].batch, train=False)
    if self.n_labels:
      self.classify(v)
    return logits
