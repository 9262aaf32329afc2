"""Training loop: owns devices, files and the schedule; the math lives in `model/losses.py` and `train/steps.py`.

`train_and_evaluate(config, workdir)` writes `config.json`, `metrics.jsonl`, `tb/`, `checkpoints/` and
`embeddings/` under `workdir`, and resumes from the latest checkpoint when the workdir already holds the run.

Multi-process runs (`parallel.initialize`, `python -m clue_jax.train --num_processes=...`): every process runs this
same loop on the same files and takes the same host decisions; each one densifies only its share of every batch
(`parallel.process_rows`), all take part in every checkpoint save and restore, and only process 0 writes the other
files (config.json, metrics.jsonl, tb/, embeddings/, summary.json, plots/). The workdir must be one directory that
every process sees (a shared file system), as Orbax requires for the checkpoints.
"""

import dataclasses
import json
import math
import pathlib
import shutil
import time
import warnings

import anndata as ad
import jax
import numpy as np
import pandas as pd

from clue_jax import config as config_lib, outputs
from clue_jax.data import dataset as data_lib, device_data, sampler
from clue_jax.evaluate import metrics
from clue_jax.model import losses
from clue_jax.model.network import CLUE, ModalitySpec
from clue_jax.train import adopt, checkpoint, parallel, periodic_eval, progress, schedule as schedule_lib, steps, writer

ENCODE_CHUNK = 1024


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss, incompatible workdir)."""


# ------------------------------------------------------------------------------------------------ model setup
def model_from(config, dataset: data_lib.Dataset) -> CLUE:
  specs = []
  for name, m in dataset.modalities.items():
    spec = config.data.modalities[name]
    input_dim = m.counts.shape[1] if m.rep is None else m.rep.shape[1]
    specs.append(ModalitySpec(name, input_dim, m.counts.shape[1], len(m.batch_categories), spec.likelihood,
                              normalize_input=m.rep is None and spec.likelihood == "NB"))
  has_labels = any(config.data.modalities[n].label_key for n in dataset.names)
  return clue_module(specs, config.model, len(dataset.label_categories) if has_labels else 0)


def clue_module(specs, model_config, n_labels: int) -> CLUE:
  """The CLUE module for these modalities: every `model.*` key that is a CLUE field is passed on."""
  fields = {f.name for f in dataclasses.fields(CLUE)}
  options = {k: v for k, v in model_config.items() if k in fields}
  return CLUE(tuple(specs), n_labels=n_labels, **options)


def loss_weights(config, names) -> losses.Weights:
  lc = config.loss
  raw = np.array([config.data.modalities[n].weight for n in names], np.float64)
  return losses.Weights(data=lc.lam_data, kl=lc.lam_kl, joint_cross=lc.lam_joint_cross,
                        real_cross=lc.lam_real_cross, cos=lc.lam_cos, align=lc.lam_align, sup=lc.lam_sup,
                        modality=tuple(float(w) for w in raw / raw.mean()), contrastive=lc.lam_contrastive,
                        temperature=lc.temperature)


# ------------------------------------------------------------------------------- preprocessing <-> checkpoint
def preprocess_tree(dataset: data_lib.Dataset) -> dict:
  """The fitted preprocessing as a pytree of numeric arrays (never empty)."""
  tree = {"format": np.ones((), np.int32)}
  for name, m in dataset.modalities.items():
    if m.preprocess:
      tree[name] = {k: np.asarray(v) for k, v in m.preprocess.items() if k != "kind"}
  return tree


def run_meta(config, dataset: data_lib.Dataset) -> dict:
  return {
      "config": config.to_dict(),
      "modalities": list(dataset.names),
      "features": {n: m.features.tolist() for n, m in dataset.modalities.items()},
      "rep_features": {n: m.rep_features.tolist() for n, m in dataset.modalities.items()
                       if m.rep_features is not None},
      "batch_categories": {n: list(m.batch_categories) for n, m in dataset.modalities.items()},
      "label_categories": list(dataset.label_categories),
      "preprocess_kind": {n: str(m.preprocess["kind"]) for n, m in dataset.modalities.items() if m.preprocess},
      "median_library": {n: median_total(m.counts) for n, m in dataset.modalities.items()
                         if config.data.modalities[n].likelihood == "NB"},
  }


def median_total(counts) -> float:
  """Median total counts per cell: an NB target's default library size at prediction."""
  return float(np.median(np.asarray(counts.sum(axis=1)).ravel()))


def saved_preprocessing(meta: dict, tree: dict) -> dict:
  """What `data_lib.load_dataset(saved=...)` needs from a checkpoint."""
  states = {n: {} for n in meta["modalities"]}
  for name, kind in meta["preprocess_kind"].items():
    states[name] = {"kind": np.array(kind), **{k: np.asarray(v) for k, v in tree[name].items()}}
  return {"preprocess": states, "label_categories": meta["label_categories"],
          "batch_categories": {n: tuple(c) for n, c in meta["batch_categories"].items()},
          "features": meta["features"], "rep_features": meta.get("rep_features", {}),
          "median_library": meta.get("median_library", {})}


# ------------------------------------------------------------------------------------------------- workdir
def prepare_workdir(config, workdir: pathlib.Path, ckpts: checkpoint.Checkpoints):
  """Refuses a workdir holding another run; writes config.json (atomically).

  Returns the newest readable (epoch, schedule, preprocess, meta) of the run being resumed, or None, and the changed
  `config_lib.BUDGET_KEYS` ({} when none) with which that run goes on.
  """
  try:
    extras = ckpts.newest_extras()
  except checkpoint.DamagedCheckpoint as e:
    raise TrainingError(f"no checkpoint in {workdir / 'checkpoints' / 'latest'} can be read ({e}); pass --overwrite "
                        f"to start over") from e
  continued = {}
  if extras is not None and not config_lib.same_config(extras[3]["config"], config.to_dict()):
    continued = config_lib.budget_changes(extras[3]["config"], config.to_dict())
    if continued is None:
      raise TrainingError(
          f"{workdir} holds a run with a different config (see {workdir / 'config.json'}); use a new --workdir, pass "
          f"--overwrite to start over, or --init_from={workdir} with a new --workdir to fine-tune from it (only "
          f"{', '.join(config_lib.BUDGET_KEYS)} may change: the run then goes on from its latest checkpoint)")
  if parallel.is_main_process():
    outputs.write_atomically(workdir / "config.json", lambda p: p.write_text(config.to_json_best_effort(indent=2)))
  return extras, continued


def finished_run(init_from: pathlib.Path, config):
  """(checkpoints, epoch, from_best, saved preprocessing) of the final model of the finished run in `init_from`."""
  summary = init_from / "summary.json"
  if not summary.is_file():
    raise TrainingError(f"--init_from={init_from}: no finished run there (no {summary.name}); point it at the "
                        f"--workdir of a run that completed")
  epoch = json.loads(summary.read_text())["restored_epoch"]
  ckpts = checkpoint.Checkpoints(init_from / "checkpoints", config.train.keep_best)
  from_best = epoch in ckpts.best.all_steps()
  _, tree, meta = ckpts.restore_extras(epoch, from_best)
  if meta["modalities"] != data_lib.modality_order(config):
    raise TrainingError(f"--init_from={init_from}: that run has modalities {meta['modalities']}, this config "
                        f"{data_lib.modality_order(config)}; fine-tuning needs the same modalities in the same order")
  return ckpts, epoch, from_best, saved_preprocessing(meta, tree)


# --------------------------------------------------------------------------------------------------- encoding
class Encoder:
  """Posterior means of any rows of a modality, in fixed-size padded chunks (compiled once per modality); the same
  for the estimates of an NB modality's library-size head."""

  def __init__(self, model: CLUE, dataset: data_lib.Dataset, mesh):
    self.model, self.dataset = model, dataset
    self.sharding = parallel.batch_sharding(mesh)
    n_dev = mesh.devices.size
    self.chunk = math.ceil(ENCODE_CHUNK / n_dev) * n_dev
    self.part = parallel.process_rows(mesh, self.chunk)  # The rows of each chunk that this process encodes.
    self.fns = {n: jax.jit(steps.make_encode(model, n)) for n in dataset.names}
    self.library_fns = {}

  def __call__(self, state, name: str, rows: np.ndarray) -> np.ndarray:
    return self.in_chunks(self.fns[name], state, name, rows)

  def library_sizes(self, state, name: str, rows: np.ndarray) -> np.ndarray:
    """(rows, modalities) library sizes that NB modality `name`'s head estimates for every modality's decoder."""
    if name not in self.library_fns:
      self.library_fns[name] = jax.jit(steps.make_encode(self.model, name, library=True))
    return self.in_chunks(self.library_fns[name], state, name, rows)

  def in_chunks(self, fn, state, name: str, rows: np.ndarray) -> np.ndarray:
    m = self.dataset.modalities[name]
    out = []
    for start in range(0, len(rows), self.chunk):
      r = rows[start:start + self.chunk]
      padded = np.concatenate([r, np.full(self.chunk - len(r), r[0])])[self.part]
      counts = m.counts[padded].toarray()
      rep = None if m.rep is None else m.rep[padded]
      values = fn(state, parallel.put_local(rep, self.sharding), parallel.put_local(counts, self.sharding))
      out.append(parallel.fetch(values)[:len(r)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def library_heads(encoder: Encoder, state, dataset: data_lib.Dataset) -> dict:
  """{NB modality: {modality: fraction of its cells whose library-size estimate for that modality is > 0}}.

  A ReLU head at 0 for every cell is dead (no gradient brings it back) and its decoder means are ~0: warns.
  """
  report = {}
  for spec in encoder.model.specs:
    if spec.likelihood != "NB":
      continue
    sizes = encoder.library_sizes(state, spec.name, np.arange(dataset.modalities[spec.name].counts.shape[0]))
    report[spec.name] = {target: float((sizes[:, j] > 0).mean()) for j, target in enumerate(dataset.names)}
    dead = [target for target, positive in report[spec.name].items() if positive == 0]
    if dead:
      warnings.warn(f"the library-size head of {spec.name}'s encoder is dead (a ReLU at 0 for every cell) for the "
                    f"decoder of {' and '.join(dead)}: means decoded with {spec.name}'s library estimates are ~0. "
                    f"Train again with another seed, or with --config.model.library_activation=softplus, which "
                    f"cannot die", stacklevel=1)
  return report


def heldout_foscttm(encoder: Encoder, state, dataset: data_lib.Dataset):
  """FOSCTTM over the hidden pairs, averaged over modality pairs; None without held-out pairs."""
  if dataset.heldout is None:
    return None
  names, scores = dataset.names, []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      both = (dataset.heldout[a] >= 0) & (dataset.heldout[b] >= 0)
      if both.sum() > 1:
        scores.append(metrics.foscttm(encoder(state, a, dataset.heldout[a][both]),
                                      encoder(state, b, dataset.heldout[b][both])))
  return float(np.mean(scores)) if scores else None


def unseen_foscttm(encoder: Encoder, state, dataset: data_lib.Dataset):
  """FOSCTTM over the validation cells measured in two modalities: cells held out of training entirely (their
  preprocessing was fitted without them), averaged over modality pairs; None with fewer than 2 such cells."""
  names, scores = dataset.names, []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      rows_a, rows_b = dataset.pairing.rows[a][dataset.val_ids], dataset.pairing.rows[b][dataset.val_ids]
      both = (rows_a >= 0) & (rows_b >= 0)
      if both.sum() > 1:
        scores.append(metrics.foscttm(encoder(state, a, rows_a[both]), encoder(state, b, rows_b[both])))
  return float(np.mean(scores)) if scores else None


MONITORED = {"heldout_foscttm": heldout_foscttm, "unseen_foscttm": unseen_foscttm}


def write_embeddings(encoder: Encoder, state, dataset: data_lib.Dataset, config, out_dir: pathlib.Path) -> dict:
  """`<modality>.h5ad` (obs + obsm["X_clue"]) for every modality, and `joint.h5ad` for multi-modal cells.

  Every process encodes (its share); only process 0 writes.
  """
  write = parallel.is_main_process()
  if write:
    out_dir.mkdir(parents=True, exist_ok=True)
  embeddings = {}
  for name, m in dataset.modalities.items():
    embeddings[name] = encoder(state, name, np.arange(m.counts.shape[0]))
    if write:
      save_embedding(out_dir / f"{name}.h5ad", m.obs, embeddings[name])
  pairing = sampler.pair_cells({n: m.obs.index for n, m in dataset.modalities.items()}, config.data.pair_by)
  present = np.stack([pairing.rows[n] >= 0 for n in dataset.names])
  multi = np.flatnonzero(present.sum(0) >= 2)
  joint = np.zeros((len(multi), embeddings[dataset.names[0]].shape[1]), np.float32)
  obs = pd.DataFrame(index=pd.Index(pairing.ids[multi].astype(str)))
  for name in dataset.names:
    rows = pairing.rows[name][multi]
    joint[rows >= 0] += embeddings[name][rows[rows >= 0]]
    obs[f"in_{name}"] = rows >= 0
  joint /= present[:, multi].sum(0)[:, None]
  if write:
    save_embedding(out_dir / "joint.h5ad", obs, joint)
  return {n: e.shape for n, e in embeddings.items()} | {"joint": joint.shape}


def save_embedding(path: pathlib.Path, obs: pd.DataFrame, embedding: np.ndarray):
  adata = ad.AnnData(obs=obs.copy())
  adata.obsm["X_clue"] = embedding
  outputs.write_atomically(path, lambda p: adata.write_h5ad(p))


# ------------------------------------------------------------------------------------------------------ loop
def per_step_values(measurements: list) -> dict:
  """The epoch's measurements (one dict per dispatched chunk) fetched once, as {term: (steps,) array}."""
  stacked = parallel.fetch(measurements)
  return {k: np.concatenate([np.asarray(m[k]).reshape(-1) for m in stacked]) for k in stacked[0]}


def first_bad_term(values: dict, step_in_epoch: int) -> str:
  bad = [k for k, v in values.items() if k != "finite" and not np.isfinite(v[step_in_epoch])]
  return ", ".join(f"{k}={values[k][step_in_epoch]}" for k in bad) or "unknown"


def validate(eval_fn, state, dataset, epoch_rows: sampler.EpochRows, batch_size, key, noise, sharding):
  """Validation loss terms averaged over the real validation rows."""
  totals, count = {}, 0.0
  part = parallel.process_rows(sharding.mesh, batch_size)
  for start in range(0, len(epoch_rows.valid), batch_size):
    sl = slice(start + part.start, start + part.stop)  # This process's rows of the batch.
    batch = data_lib.minibatch(dataset, {n: r[sl] for n, r in epoch_rows.rows.items()},
                           {n: m[sl] for n, m in epoch_rows.masks.items()}, epoch_rows.valid[sl])
    terms = parallel.fetch(eval_fn(state, parallel.put_local(batch, sharding), jax.random.fold_in(key, start), noise))
    n = float(epoch_rows.valid[start:start + batch_size].sum())
    for k, v in terms.items():
      totals[k] = totals.get(k, 0.0) + float(v) * n
    count += n
  return {k: v / count for k, v in totals.items()}


def process_share(epoch_rows: sampler.EpochRows, batch_size: int, part: slice) -> sampler.EpochRows:
  """The rows `part` (`parallel.process_rows`) of every batch of an epoch: this process's share, in batch order."""
  if part == slice(0, batch_size):
    return epoch_rows

  def pick(a):
    return a.reshape(-1, batch_size)[:, part].reshape(-1)

  return sampler.EpochRows({k: pick(v) for k, v in epoch_rows.rows.items()},
                           {k: pick(v) for k, v in epoch_rows.masks.items()}, pick(epoch_rows.valid))


def make_epoch_runner(config, model: CLUE, weights: losses.Weights, dataset: data_lib.Dataset, mesh):
  """`run(state, epoch_rows, n_steps, key, lr, noise) -> (state, per-chunk measurements)` for one epoch.

  With `train.data_on_device` the dataset lives on the devices and each step gathers its minibatch there (one
  explicit copy of row indices per epoch); otherwise the host densifies and sends every chunk of steps (with several
  processes, each densifies only the rows its devices hold).
  """
  normalize_u, per, optimizer = config.model.normalize_u, config.train.steps_per_dispatch, config.train.optimizer
  batch_size, replicated = config.train.batch_size, parallel.replicated(mesh)
  chunk_sharding = parallel.batch_sharding(mesh, batch_axis=1)
  if config.train.data_on_device:
    n_features = {n: m.counts.shape[1] for n, m in dataset.modalities.items()}
    arrays = parallel.put(device_data.host_arrays(dataset), replicated)
    chunk_fn = jax.jit(steps.make_device_train_chunk(model, weights, normalize_u, n_features, optimizer),
                       donate_argnums=0)

    def chunks(rows, n_steps):
      return [(arrays, c) for c in parallel.put(device_data.epoch_chunks(rows, n_steps, batch_size, per),
                                                chunk_sharding)]
  else:
    chunk_fn = jax.jit(steps.make_train_chunk(model, weights, normalize_u, optimizer), donate_argnums=0)
    part = parallel.process_rows(mesh, batch_size)

    def chunks(rows, n_steps):
      local = process_share(rows, batch_size, part)
      for first in range(0, n_steps, per):
        host = data_lib.steps_chunk(dataset, local, first, min(per, n_steps - first), part.stop - part.start)
        yield (parallel.put_local(host, chunk_sharding),)

  def run(state, rows, n_steps, key, lr, noise):
    scalars = parallel.put((key, np.float32(lr), np.float32(noise)), replicated)
    measurements = []
    for inputs in chunks(rows, n_steps):
      state, measured = chunk_fn(state, *inputs, *scalars)
      measurements.append(measured)
    return state, measurements

  return run


def train_and_evaluate(config, workdir, init_from=None, inputs=None) -> dict:
  """Trains CLUE as `config` says, writing everything under `workdir`; returns a summary.

  `init_from`: the directory of a finished run; a new run starts from its final parameters and preprocessing.
  `inputs`: {modality: AnnData} in memory instead of the files of those modalities (`clue_jax.fit`).
  """
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints", config.train.keep_best)
  extras, continued = prepare_workdir(config, workdir, ckpts)

  # Mesh (over the devices of every process; process 0 writes the files).
  main = parallel.is_main_process()
  mesh = parallel.make_mesh(config.train.num_devices)
  parallel.check_batch_size(config.train.batch_size, mesh)
  state_sharding = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh)

  # Input (with the features and preprocessing of the run being resumed or fine-tuned from, if any).
  saved, source = None, None
  if extras is not None:
    saved = saved_preprocessing(extras[3], extras[2])
  elif init_from is not None:
    source = finished_run(pathlib.Path(init_from), config)
    saved = source[3]
  dataset = data_lib.load_dataset(config, saved, new_batches=source is not None, inputs=inputs)
  model = model_from(config, dataset)
  weights = loss_weights(config, dataset.names)
  batch_size = config.train.batch_size
  lr = schedule_lib.scaled_lr(config.train.lr, batch_size, config.train.lr_scaling)
  plan = schedule_lib.auto_plan(len(dataset.train_ids), batch_size, lr, config.train.max_epochs,
                                config.train.align_burnin, config.train.patience,
                                config.train.reduce_lr_patience, config.train.auto_epoch_cap)

  # Shapes and sharded initialisation.
  root_key = jax.random.key(config.seed)
  init_key, step_key, eval_key = jax.random.split(root_key, 3)
  rows0 = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng([config.seed, 0]),
                             batch_size, drop_last=True)
  example = jax.tree.map(lambda x: x[0], data_lib.steps_chunk(dataset, rows0, 0, 1, batch_size))
  optimizer = config.train.optimizer
  init = jax.jit(lambda key, batch: steps.init_state(model, key, batch, optimizer), out_shardings=state_sharding)
  abstract_state = jax.eval_shape(lambda: steps.init_state(model, init_key, example, optimizer))
  abstract_state = checkpoint.abstract(abstract_state, state_sharding)

  # Resume, or start (from a finished run's parameters with --init_from).
  if extras is not None:
    latest, state = resume_state(ckpts, abstract_state, workdir)
    schedule = schedule_lib.Schedule.from_json(ckpts.restore_extras(latest)[0])
    ckpts.drop_best_after(latest)
    if continued:
      schedule.go_on_with(plan)
    if main:
      writer.truncate_after(workdir / "metrics.jsonl", latest)
      changes = "".join(f", {k} {old} -> {new}" for k, (old, new) in continued.items())
      print(f"{'Continuing' if continued else 'Resuming'} {workdir} from epoch {latest}{changes}.", flush=True)
  else:
    state = init(init_key, example)
    if source is not None:
      state = state.replace(**adopted_model(source, state, abstract_state, init_from, dataset, config))
      if main:
        print(f"Starting from the parameters of {init_from} (epoch {source[1]}).", flush=True)
    schedule = schedule_lib.Schedule(plan=plan, lr=lr)
    if main:
      writer.truncate_after(workdir / "metrics.jsonl", 0)

  # Steps.
  normalize_u = config.model.normalize_u
  train_epoch = make_epoch_runner(config, model, weights, dataset, mesh)
  eval_fn = jax.jit(steps.make_eval_step(model, weights, normalize_u))
  encoder = Encoder(model, dataset, mesh)
  evaluations = periodic_eval.PeriodicEvaluation(config, dataset, encoder)
  meta, tree = run_meta(config, dataset), preprocess_tree(dataset)
  metric_writer = writer.MetricWriter(workdir, enabled=main)
  bar = progress.ProgressBar(schedule.plan.max_epochs, enabled=config.train.progress and main)
  n_params = steps.count_params(state.params)
  last_save = -math.inf  # The first epoch is always checkpointed.

  # Loop.
  while not schedule.done:
    epoch = schedule.epoch + 1
    started = time.time()
    noise = schedule_lib.noise_scale(epoch, schedule.plan.align_burnin)
    rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng([config.seed, epoch, 0]),
                              batch_size, drop_last=True)
    n_steps = len(rows.valid) // batch_size
    lr = schedule.lr * schedule_lib.warmup_factor(epoch, config.train.warmup_epochs)
    state, measurements = train_epoch(state, rows, n_steps, step_key, lr, noise)
    values = per_step_values(measurements)
    finite = values["finite"]
    train_terms = {k: float(v.mean()) for k, v in values.items() if k != "finite"}
    if not finite.all():
      bad_step = int(np.flatnonzero(finite == 0)[0])
      last = ckpts.latest_epoch()
      kept = (f"the last good checkpoint is epoch {last} in {workdir / 'checkpoints' / 'latest'}" if last is not None
              else "no checkpoint had been written yet")
      raise TrainingError(
          f"non-finite loss in epoch {epoch}, step {bad_step + 1} of {n_steps} "
          f"(global step {int(state.step) - n_steps + bad_step + 1}): {first_bad_term(values, bad_step)}. "
          f"That step's update was not applied and training stopped; {kept}. Lower train.lr or check the input "
          f"data.")

    record = {"epoch": epoch, "step": int(state.step), "lr": lr, "noise_scale": noise}
    if continued and epoch == latest + 1:
      record["continued"] = continued  # The budget keys changed when the run went on from its epoch `latest`.
    record.update({f"train/loss_{k}": v for k, v in train_terms.items()})
    if len(dataset.val_ids):
      val_rows = sampler.epoch_rows(dataset.pairing, dataset.val_ids,
                                    np.random.default_rng([config.seed, epoch, 1]), batch_size, drop_last=False)
      val_terms = validate(eval_fn, state, dataset, val_rows, batch_size, jax.random.fold_in(eval_key, epoch),
                           np.float32(noise), batch_sharding)
      record.update({f"val/loss_{k}": v for k, v in val_terms.items()})
    for key, score in MONITORED.items():
      value = score(encoder, state, dataset)
      if value is not None:
        record[f"val/{key}"] = value
    monitored = (record.get("val/loss_gen", record["train/loss_gen"]) if config.train.monitor == "val_loss"
                 else record[f"val/{config.train.monitor}"])
    events = schedule.after_epoch(epoch, monitored)
    record.update(events)
    record["time/epoch_s"] = time.time() - started
    record["time/cells_per_s"] = n_steps * batch_size / record["time/epoch_s"]
    record.update(evaluations(epoch, state))
    is_best = schedule.keep_as_best(epoch, monitored, config.train.keep_best)
    save_latest = parallel.agree(schedule.done or time.time() - last_save >= config.train.checkpoint_interval_s)
    metric_writer.write(record)  # Before the checkpoint: a resumed run drops records after its checkpoint.
    if save_latest or is_best:
      ckpts.save(epoch, state, schedule.to_json(), tree, meta, latest=save_latest,
                 monitored=monitored if is_best else None)
      last_save = time.time() if save_latest else last_save
    bar.update(epoch, record)
  bar.close()
  metric_writer.close()

  # Final model: the most recent of the best checkpoints (method.md §3.2), else the last epoch.
  final_epoch = schedule.epoch
  try:
    best = ckpts.restore_newest(abstract_state, from_best=True)
  except checkpoint.DamagedCheckpoint as e:
    warnings.warn(f"{e}; the final model is the last epoch's", stacklevel=1)
    best = None
  if best is not None:
    final_epoch, state = best
  shapes = write_embeddings(encoder, state, dataset, config, workdir / "embeddings")
  summary = {"epochs_run": schedule.epoch, "restored_epoch": final_epoch, "plan": schedule.to_json()["plan"],
             "early_stopped": schedule.stopped and schedule.epoch < schedule.plan.max_epochs,
             "n_params": n_params, "heldout_foscttm": heldout_foscttm(encoder, state, dataset),
             "unseen_foscttm": unseen_foscttm(encoder, state, dataset),
             "library_heads": library_heads(encoder, state, dataset),
             "embeddings": {k: list(v) for k, v in shapes.items()}}
  if continued:
    summary["continued"] = {"from_epoch": latest, "changes": continued}
  if main:
    summary["plots"] = periodic_eval.final_plots(workdir, config)
    outputs.write_atomically(workdir / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
  ckpts.close()
  return summary


def resume_state(ckpts: checkpoint.Checkpoints, abstract_state, workdir: pathlib.Path):
  """(epoch, state) of the newest intact latest checkpoint (damaged newer ones are set aside with a warning)."""
  try:
    return ckpts.restore_newest(abstract_state)
  except checkpoint.DamagedCheckpoint as e:
    raise TrainingError(f"no checkpoint of {workdir} can be restored ({e}); pass --overwrite to start over") from e
  except checkpoint.IncompatibleCheckpoint as e:
    raise TrainingError(f"the checkpoints of {workdir} hold another model than this config builds ({e}); use a new "
                        f"--workdir or pass --overwrite") from e


def adopted_model(source, state, abstract_state, init_from, dataset: data_lib.Dataset, config) -> dict:
  """{"params", "batch_stats"} of the finished run `source` (from `finished_run`) in the freshly initialised `state`:
  the same arrays, with rows for batches that run never saw kept fresh (`clue_jax.train.adopt`)."""
  ckpts, epoch, from_best, saved = source
  fix = "use that run's model sizes (model.*), encoder inputs and modalities"
  try:
    restored = ckpts.restore_state(epoch, ckpts.saved_shapes(epoch, abstract_state, from_best), from_best)
    entries = adopt.adopt({"params": restored.params, "batch_stats": restored.batch_stats},
                          {"params": state.params, "batch_stats": state.batch_stats},
                          saved["batch_categories"], {n: m.batch_categories for n, m in dataset.modalities.items()},
                          config.model.shared_batches)
  except (checkpoint.IncompatibleCheckpoint, adopt.AdoptError) as e:
    raise TrainingError(f"--init_from={init_from}: its model does not fit this config ({e}); {fix}") from e
  except checkpoint.DamagedCheckpoint as e:
    raise TrainingError(f"--init_from={init_from}: {e}") from e
  finally:
    ckpts.close()
  return parallel.put(entries, jax.tree.map(lambda x: x.sharding, {"params": abstract_state.params,
                                                                   "batch_stats": abstract_state.batch_stats}))


def clean_workdir(workdir: pathlib.Path):
  """Removes a run directory (for `--overwrite`; process 0 removes it, the others wait)."""
  if parallel.is_main_process() and workdir.exists():
    shutil.rmtree(workdir)
  parallel.barrier("clean_workdir")
