"""Train state, the train step (discriminator update, then generator update), evaluation and encoding.

Pure functions of arrays: the trainer jits them over its mesh. Optimisers are two states of one kind, by default
RMSprop with PyTorch semantics (decay 0.99, eps 1e-8 outside the sqrt; `UPDATE_RULES` has the others); the
learning rate is a traced argument so that ReduceLROnPlateau and warm-up change it without recompiling. A step
whose losses are not finite changes nothing but the step counter.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from clue_jax import batch as batch_lib
from clue_jax.data import device_data
from clue_jax.model import losses
from clue_jax.model.network import CLUE

DISCRIMINATOR = "discriminator"
# XLA options for a program run once (initialisation): its backend optimisations would only cost compile time.
RUN_ONCE = {"xla_backend_optimization_level": 0}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_vae: Any
  opt_dsc: Any


def rmsprop() -> optax.GradientTransformation:
  """torch.optim.RMSprop's update direction (the learning rate is applied by the step)."""
  return optax.scale_by_rms(decay=0.99, eps=1e-8, eps_in_sqrt=False)


# Update directions by `train.optimizer` (config.OPTIMIZERS); the step applies the learning rate. "rmsprop" is the
# reference's, "adam" has torch.optim.Adam's defaults, "lamb" is Adam with a layer-wise trust ratio.
UPDATE_RULES = {
    "rmsprop": rmsprop,
    "adam": optax.scale_by_adam,
    "lamb": lambda: optax.chain(optax.scale_by_adam(eps=1e-6), optax.scale_by_trust_ratio()),
}


def split_params(params):
  """(encoders + decoders + classifier, discriminator): the two optimisers' parameter sets."""
  vae = {k: v for k, v in params.items() if k != DISCRIMINATOR}
  return vae, params[DISCRIMINATOR]


def init_state(model: CLUE, key, optimizer: str = "rmsprop") -> TrainState:
  """Fresh parameters and optimiser states (their shapes depend only on the model's `ModalitySpec`s)."""
  example = batch_lib.zeros({s.name: (s.n_features, None if s.normalize_input else s.input_dim)
                             for s in model.specs})
  variables = model.init(key, example)
  params = variables["params"]
  vae, dsc = split_params(params)
  transform = UPDATE_RULES[optimizer]()
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                    opt_vae=transform.init(vae), opt_dsc=transform.init(dsc))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def make_train_step(model: CLUE, weights: losses.Weights, optimizer: str = "rmsprop"):
  """`step(state, batch, key, lr, noise_scale) -> (state, measurements)` for one minibatch."""
  optimizer = UPDATE_RULES[optimizer]()
  dsc_apply = nn.apply(losses.discriminator_objective, model, mutable=["batch_stats"])
  gen_apply = nn.apply(losses.generator_objective, model, mutable=["batch_stats"])

  def step(state: TrainState, batch, key, lr, noise_scale):
    key = jax.random.fold_in(key, state.step)
    dsc_dropout, dsc_key, gen_dropout, gen_key = jax.random.split(key, 4)
    vae, dsc = split_params(state.params)

    def dsc_loss(dsc_params):
      variables = {"params": {**vae, DISCRIMINATOR: dsc_params}, "batch_stats": state.batch_stats}
      loss, mutated = dsc_apply(variables, batch, dsc_key, noise_scale, weights, rngs={"dropout": dsc_dropout})
      return loss, mutated["batch_stats"]

    (dsc_value, batch_stats), grads = jax.value_and_grad(dsc_loss, has_aux=True)(dsc)
    updates, opt_dsc = optimizer.update(grads, state.opt_dsc, dsc)
    new_dsc = jax.tree.map(lambda p, u: p - lr * u, dsc, updates)

    def gen_loss(vae_params):
      variables = {"params": {**vae_params, DISCRIMINATOR: new_dsc}, "batch_stats": batch_stats}
      (loss, terms), mutated = gen_apply(variables, batch, gen_key, noise_scale, weights,
                                         rngs={"dropout": gen_dropout})
      return loss, (terms, mutated["batch_stats"])

    (gen_value, (terms, batch_stats)), grads = jax.value_and_grad(gen_loss, has_aux=True)(vae)
    finite = jnp.isfinite(gen_value) & jnp.isfinite(dsc_value)

    def update_vae():
      updates, opt_vae = optimizer.update(grads, state.opt_vae, vae)
      return jax.tree.map(lambda p, u: p - lr * u, vae, updates), opt_vae

    # The large update runs only on finite steps: a conditional, ~5 % faster steps on CPU than computing it and
    # then selecting between new and old values element by element (as is still done for the small rest).
    new_vae, opt_vae = jax.lax.cond(finite, update_vae, lambda: (vae, state.opt_vae))
    new_dsc, opt_dsc, batch_stats = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                                 (new_dsc, opt_dsc, batch_stats),
                                                 (dsc, state.opt_dsc, state.batch_stats))
    new_state = TrainState(step=state.step + 1, params={**new_vae, DISCRIMINATOR: new_dsc},
                           batch_stats=batch_stats, opt_vae=opt_vae, opt_dsc=opt_dsc)
    return new_state, {**terms, "finite": finite.astype(jnp.float32)}

  return step


def steps_loop(step, state, n_steps, length: int, batch_at):
  """`step(state, batch_at(i))` for i < `n_steps`, a traced count of at most `length`: one compiled program serves
  every count (a short last chunk of an epoch included).

  Returns the state and the steps' measurements stacked on a leading axis of `length` (0 past `n_steps`).
  """
  _, shapes = jax.eval_shape(step, state, batch_at(0))
  buffers = jax.tree.map(lambda s: jnp.zeros((length, *s.shape), s.dtype), shapes)

  def body(i, carry):
    state, measured = carry
    state, values = step(state, batch_at(i))
    return state, jax.tree.map(lambda buffer, value: buffer.at[i].set(value), measured, values)

  return jax.lax.fori_loop(0, n_steps, body, (state, buffers))


def make_train_chunk(model: CLUE, weights: losses.Weights, optimizer: str = "rmsprop"):
  """`chunk(state, batches, n_steps, key, lr, noise_scale)`: the first `n_steps` minibatches of `batches` (a `Batch`
  with a leading steps axis; the rest is padding), one step each."""
  step = make_train_step(model, weights, optimizer)

  def chunk(state, batches, n_steps, key, lr, noise_scale):
    length = batches.valid.shape[0]
    return steps_loop(lambda s, b: step(s, b, key, lr, noise_scale), state, n_steps, length,
                      lambda i: jax.tree.map(lambda a: a[i], batches))

  return chunk


def make_device_train_chunk(model: CLUE, weights: losses.Weights, widths: dict, optimizer: str = "rmsprop"):
  """As `make_train_chunk`, with the data on the devices: `chunk(state, arrays, indices, n_steps, key, lr,
  noise_scale)`.

  `arrays` are `device_data.host_arrays` put on the devices, `indices` one of `device_data.epoch_chunks` put on
  the devices, `widths` `device_data.widths`; each step gathers its own minibatch.
  """
  step = make_train_step(model, weights, optimizer)

  def chunk(state, arrays, indices, n_steps, key, lr, noise_scale):
    length = indices["valid"].shape[0]
    return steps_loop(lambda s, b: step(s, b, key, lr, noise_scale), state, n_steps, length,
                      lambda i: device_data.gather(arrays, jax.tree.map(lambda a: a[i], indices), widths))

  return chunk


def make_eval_step(model: CLUE, weights: losses.Weights):
  """Validation loss terms in eval mode (running statistics, no dropout), anneal noise included."""
  gen_apply = nn.apply(losses.generator_objective, model)

  def evaluate(state: TrainState, batch, key, noise_scale):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, terms = gen_apply(variables, batch, key, noise_scale, weights, train=False)
    return terms

  return evaluate


def make_encode(model: CLUE, name: str, library: bool = False):
  """Posterior means (all K * latent_dim dimensions) of modality `name`'s cells; with `library`, the estimates of NB
  modality `name`'s library-size head instead (one per modality: the size in that modality's decoder)."""

  def encode(state: TrainState, rep, counts):
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    loc, _, sizes = model.apply(variables, name, rep, counts, False, library, method=CLUE.encode)
    return sizes if library else loc

  return encode
