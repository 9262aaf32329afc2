"""Training loop: owns devices, files and the schedule; the math lives in `model/losses.py` and `train/steps.py`.

`train_and_evaluate(config, workdir)` writes the run directory (`train/run_dir.py` lists its files) and resumes from
the latest checkpoint when the workdir already holds the run.

Multi-process runs (`parallel.initialize`, `python -m clue_jax.train --num_processes=...`): every process runs this
same loop on the same files and takes the same host decisions; each one densifies only its share of every batch
(`parallel.process_rows`), all take part in every checkpoint save and restore, and only process 0 writes the other
files (config.json, metrics.jsonl, tb/, embeddings/, summary.json, plots/). The workdir must be one directory that
every process sees (a shared file system), as Orbax requires for the checkpoints.
"""

import contextlib
import json
import math
import os
import pathlib
import shutil
import time
import warnings

import anndata as ad
import h5py
import jax
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from clue_jax import batch as batch_lib, config as config_lib, outputs
from clue_jax.data import dataset as data_lib, device_data, prefetch, sampler, streaming
from clue_jax.evaluate import metrics
from clue_jax.model import losses
from clue_jax.model.network import CLUE
from clue_jax.train import (adopt, checkpoint, parallel, periodic_eval, progress, run_dir, schedule as schedule_lib,
                            steps, writer)
from clue_jax.train.encoding import Encoder
from clue_jax.train.errors import ConfigMismatch, NoFinishedRun, TrainingError


# ------------------------------------------------------------------------------------------------ model setup
def load_data(config, fitted: data_lib.Fitted | None = None, new_batches: bool = False,
              inputs: dict | None = None, report=lambda message: None, reader=None) -> data_lib.Dataset:
  """The `Dataset` that `config` trains on (see `data_lib.load_dataset` for the arguments)."""
  return data_lib.load_dataset(config.data, config.seed, batch_size=config.train.batch_size,
                               monitor=config.train.monitor, shared_batches=config.model.shared_batches,
                               fitted=fitted, new_batches=new_batches, inputs=inputs, report=report, reader=reader)


def data_reader(config, workdir: pathlib.Path, inputs: dict | None):
  """How the training data are read (`data.storage`): whole into memory, or in blocks of rows into a store under
  workdir/rows (one per process) when asked to, or with "auto" when the count matrices hold more than a tenth of
  this machine's memory."""
  storage = config.data.storage
  if inputs or storage == "memory":
    return data_lib.MemoryReader()
  if storage == "auto":
    stored, memory = streaming.stored_bytes(config.data), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if stored <= memory / 10:
      return data_lib.MemoryReader()
    log(f"the count matrices take {stored / 2**30:.1f} GiB, more than a tenth of this machine's memory: streaming "
        f"them from {workdir / run_dir.ROWS} (data.storage=auto)")
  return streaming.DiskReader(rows_dir(workdir), progress=config.train.progress and parallel.is_main_process())


def rows_dir(workdir: pathlib.Path) -> pathlib.Path:
  """This process's store of training rows (data.storage=disk); removed when the run finishes."""
  return workdir / run_dir.ROWS / f"process_{jax.process_index()}"


def log(message: str):
  """A line on stdout from process 0: where a run spends the time before and after its epochs."""
  if parallel.is_main_process():
    print(f"clue_jax: {message}", flush=True)


@contextlib.contextmanager
def stage(name: str):
  """Logs `name` and how long it took."""
  started = time.perf_counter()
  yield
  log(f"{name} in {time.perf_counter() - started:.1f} s")


def loss_weights(config, names) -> losses.Weights:
  lc = config.loss
  raw = np.array([config.data.modalities[n].weight for n in names], np.float64)
  return losses.Weights(data=lc.lam_data, kl=lc.lam_kl, joint_cross=lc.lam_joint_cross,
                        real_cross=lc.lam_real_cross, cos=lc.lam_cos, align=lc.lam_align, sup=lc.lam_sup,
                        modality=tuple(float(w) for w in raw / raw.mean()), contrastive=lc.lam_contrastive,
                        temperature=lc.temperature)


# ------------------------------------------------------------------------------------------------- workdir
def prepare_workdir(config, workdir: pathlib.Path, ckpts: checkpoint.Checkpoints):
  """Refuses a workdir holding another run; writes config.json (atomically).

  Returns the newest readable `run_dir.SavedEpoch` of the run being resumed (or None), and the changed
  `config_lib.BUDGET_KEYS` ({} when none) with which that run goes on.
  """
  try:
    resumed = run_dir.newest_epoch(ckpts)
  except checkpoint.DamagedCheckpoint as e:
    raise TrainingError(f"no checkpoint in {workdir / 'checkpoints' / 'latest'} can be read ({e}); pass --overwrite "
                        f"to start over") from e
  continued = {}
  if resumed is not None and not config_lib.same_config(resumed.meta.config, config.to_dict()):
    continued = config_lib.budget_changes(resumed.meta.config, config.to_dict())
    if continued is None:
      raise ConfigMismatch(
          workdir,
          f"{workdir} holds a run with a different config (see {workdir / run_dir.CONFIG}); use a new --workdir, "
          f"pass --overwrite to start over, or --init_from={workdir} with a new --workdir to fine-tune from it (only "
          f"{', '.join(config_lib.BUDGET_KEYS)} may change: the run then goes on from its latest checkpoint)")
  if parallel.is_main_process():
    outputs.write_atomically(workdir / run_dir.CONFIG, lambda p: p.write_text(config.to_json_best_effort(indent=2)))
  return resumed, continued


def finished_source(init_from: pathlib.Path, config) -> run_dir.FinishedRun:
  """The finished run in `init_from` that a new run starts from; it must have this config's modalities."""
  try:
    source = run_dir.finished(init_from)
  except NoFinishedRun as e:
    raise NoFinishedRun(init_from, f"--init_from={e}; point it at the --workdir of a run that completed") from e
  order = data_lib.modality_order(config.data)
  if source.saved.meta.modalities != order:
    source.close()
    raise TrainingError(f"--init_from={init_from}: that run has modalities {source.saved.meta.modalities}, this "
                        f"config {order}; fine-tuning needs the same modalities in the same order")
  return source


# --------------------------------------------------------------------------------------------------- encoding
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


SCORED_PAIRS = 4096  # Cells a monitored FOSCTTM is computed over at most (a seeded subset): it costs pairs^2.


def scored(a_rows: np.ndarray, b_rows: np.ndarray, seed: int) -> tuple:
  """The aligned rows of pairs measured in both modalities; a seeded subset of SCORED_PAIRS of them when more."""
  both = (a_rows >= 0) & (b_rows >= 0)
  a_rows, b_rows = a_rows[both], b_rows[both]
  if len(a_rows) > SCORED_PAIRS:
    keep = np.sort(sampler.scored_pairs_stream(seed).choice(len(a_rows), SCORED_PAIRS, replace=False))
    a_rows, b_rows = a_rows[keep], b_rows[keep]
  return a_rows, b_rows


def heldout_foscttm(encoder: Encoder, state, dataset: data_lib.Dataset, seed: int):
  """FOSCTTM over the hidden pairs (`scored`), averaged over modality pairs; None without held-out pairs."""
  if dataset.heldout is None:
    return None
  names, scores = dataset.names, []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      rows_a, rows_b = scored(dataset.heldout[a], dataset.heldout[b], seed)
      if len(rows_a) > 1:
        scores.append(metrics.foscttm(encoder(state, a, rows_a), encoder(state, b, rows_b)))
  return float(np.mean(scores)) if scores else None


def unseen_foscttm(encoder: Encoder, state, dataset: data_lib.Dataset, seed: int):
  """FOSCTTM over the validation cells measured in two modalities (`scored`): cells held out of training entirely
  (their preprocessing was fitted without them), averaged over modality pairs; None with fewer than 2 such cells."""
  names, scores = dataset.names, []
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      rows_a, rows_b = scored(dataset.pairing.rows[a][dataset.val_ids], dataset.pairing.rows[b][dataset.val_ids],
                              seed)
      if len(rows_a) > 1:
        scores.append(metrics.foscttm(encoder(state, a, rows_a), encoder(state, b, rows_b)))
  return float(np.mean(scores)) if scores else None


MONITORED = {"heldout_foscttm": heldout_foscttm, "unseen_foscttm": unseen_foscttm}


EMBEDDED_ROWS = 65_536  # Cells encoded and written at a time.


def write_embeddings(encoder: Encoder, state, dataset: data_lib.Dataset, config, out_dir: pathlib.Path) -> dict:
  """`<modality>.h5ad` (obs + obsm["X_clue"]) for every modality, and `joint.h5ad` for multi-modal cells (the mean of
  their modalities' embeddings), encoded and written EMBEDDED_ROWS cells at a time, so that memory does not grow with
  the cells. Every process encodes (its share); only process 0 writes.
  """
  if parallel.is_main_process():
    out_dir.mkdir(parents=True, exist_ok=True)
  width = len(encoder.model.specs) * encoder.model.latent_dim  # The embedding: K subspaces (or one of K times that).
  pairing = sampler.pair_cells({n: m.obs.index for n, m in dataset.modalities.items()}, config.data.pair_by)
  present = np.stack([pairing.rows[n] >= 0 for n in dataset.names])
  multi = np.flatnonzero(present.sum(0) >= 2)
  total = sum(m.counts.shape[0] for m in dataset.modalities.values()) + len(multi)
  bar = tqdm(total=total, desc="embeddings", unit="cell", leave=False, dynamic_ncols=True,
             disable=not (config.train.progress and parallel.is_main_process()))

  def counted(chunks):
    for start, values in chunks:
      yield start, values
      bar.update(len(values))

  for name, m in dataset.modalities.items():
    n = m.counts.shape[0]
    write_embedding(out_dir / f"{name}.h5ad", m.obs, width,
                    counted((start, encoder(state, name, np.arange(start, min(n, start + EMBEDDED_ROWS))))
                            for start in range(0, n, EMBEDDED_ROWS)))
  obs = pd.DataFrame(index=pd.Index(pairing.ids[multi].astype(str)))
  for name in dataset.names:
    obs[f"in_{name}"] = pairing.rows[name][multi] >= 0

  def joint_chunks():
    for start in range(0, len(multi), EMBEDDED_ROWS):
      ids = multi[start:start + EMBEDDED_ROWS]
      joint = np.zeros((len(ids), width), np.float32)
      for name in dataset.names:
        rows = pairing.rows[name][ids]
        joint[rows >= 0] += encoder(state, name, rows[rows >= 0])
      yield start, joint / present[:, ids].sum(0)[:, None]

  write_embedding(out_dir / "joint.h5ad", obs, width, counted(joint_chunks()))
  bar.close()
  streaming.release_free_memory()
  return {n: (m.counts.shape[0], width) for n, m in dataset.modalities.items()} | {"joint": (len(multi), width)}


def write_embedding(path: pathlib.Path, obs: pd.DataFrame, width: int, chunks):
  """An .h5ad of `obs` and obsm["X_clue"] (cells x width), filled from `chunks` ((first row, values) pairs) as they
  come; written atomically by process 0, while every process runs through `chunks` (they encode together)."""
  if not parallel.is_main_process():
    for _ in chunks:
      pass
    return

  def write(tmp: pathlib.Path):
    ad.AnnData(obs=obs).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
      embedding = f["obsm"].create_dataset("X_clue", shape=(len(obs), width), dtype="float32")
      embedding.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
      for start, values in chunks:
        embedding[start:start + len(values)] = values

  outputs.write_atomically(path, write)


# ------------------------------------------------------------------------------------------------------ loop
def per_step_values(measurements: list) -> dict:
  """The epoch's measurements ((dict, steps run) per dispatched chunk) fetched once, as {term: (steps,) array}."""
  stacked = parallel.fetch([m for m, _ in measurements])
  return {k: np.concatenate([np.asarray(m[k])[:n] for m, (_, n) in zip(stacked, measurements)]) for k in stacked[0]}


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


# The host path hands the C heap's free pages back every this many chunks: the densified chunks, freed on two
# threads, otherwise leave about 0.6 GB of free heap held by the process by the end of a CITE epoch (measured).
HEAP_TRIM_CHUNKS = 32


def make_epoch_runner(config, model: CLUE, weights: losses.Weights, dataset: data_lib.Dataset, mesh):
  """`run(state, epoch_rows, n_steps, key, lr, noise) -> (state, [(measurements, steps run)] per chunk)` for one
  epoch.

  Every chunk of an epoch has min(train.steps_per_dispatch, n_steps) steps (the last one padded), so one program is
  compiled. With `train.data_on_device` the dataset lives on the devices and each step gathers its minibatch there
  (one explicit copy of row indices per epoch); otherwise (and when the rows are on disk) the host reads and densifies
  every chunk of steps on a background thread while the devices run the one before, and sends it (with several
  processes, each reads only the rows its devices hold).
  """
  per, optimizer = config.train.steps_per_dispatch, config.train.optimizer
  batch_size, replicated = config.train.batch_size, parallel.replicated(mesh)
  chunk_sharding = parallel.batch_sharding(mesh, batch_axis=1)
  if config.train.data_on_device and not dataset.on_disk:
    arrays = parallel.put(device_data.host_arrays(dataset), replicated)
    chunk_fn = jax.jit(steps.make_device_train_chunk(model, weights, device_data.widths(dataset), optimizer),
                       donate_argnums=0)

    def chunks(rows, n_steps):
      indices, counts = zip(*device_data.epoch_chunks(rows, n_steps, batch_size, per))
      on_device = parallel.put((list(indices), [np.int32(c) for c in counts]), (chunk_sharding, replicated))
      return [((arrays, c, n), int(count)) for c, n, count in zip(*on_device, counts)]
  else:
    chunk_fn = jax.jit(steps.make_train_chunk(model, weights, optimizer), donate_argnums=0)
    part = parallel.process_rows(mesh, batch_size)

    def host_chunks(rows, n_steps):
      local = process_share(rows, batch_size, part)
      length = min(per, n_steps)
      for first in range(0, n_steps, length):
        if first and first % (HEAP_TRIM_CHUNKS * length) == 0:
          streaming.release_free_memory()
        count = min(length, n_steps - first)
        yield batch_lib.padded_steps(data_lib.steps_chunk(dataset, local, first, count, part.stop - part.start),
                                     length), count

    def chunks(rows, n_steps):  # The next chunk is read and densified while the devices run this one.
      for host, count in prefetch.prefetch(host_chunks(rows, n_steps)):
        yield (parallel.put_local(host, chunk_sharding), parallel.put(np.int32(count), replicated)), count

  def run(state, rows, n_steps, key, lr, noise):
    scalars = parallel.put((key, np.float32(lr), np.float32(noise)), replicated)
    measurements = []
    for inputs, count in chunks(rows, n_steps):
      state, measured = chunk_fn(state, *inputs, *scalars)
      measurements.append((measured, count))
    return state, measurements

  return run


def train_and_evaluate(config, workdir, init_from=None, inputs=None) -> dict:
  """Trains CLUE as `config` says, writing everything under `workdir` (`train/run_dir.py`); returns the summary.

  Args:
    config: a validated-on-entry config (`clue_jax.config.get_config()` and a config file's changes).
    workdir: the run directory; a run already there resumes (or goes on with a larger epoch budget).
    init_from: the directory of a finished run; a new run starts from its final parameters and preprocessing.
    inputs: {modality: AnnData} in memory instead of the files of those modalities (`clue_jax.fit`).

  Returns:
    The summary also written to summary.json. Raises `TrainingError` (or a subclass of it) when training cannot go
    on, `DataError` / `ConfigError` for bad input.
  """
  config_lib.validate(config)
  parallel.use_compilation_cache(config.train.compilation_cache)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints", config.train.keep_best)
  resumed, continued = prepare_workdir(config, workdir, ckpts)

  # Mesh (over the devices of every process; process 0 writes the files).
  main = parallel.is_main_process()
  mesh = parallel.make_mesh(config.train.num_devices)
  parallel.check_batch_size(config.train.batch_size, mesh)
  state_sharding = parallel.replicated(mesh)
  batch_sharding = parallel.batch_sharding(mesh)

  # Input (with the features and preprocessing of the run being resumed or fine-tuned from, if any).
  source = None
  if resumed is None and init_from is not None:
    source = finished_source(pathlib.Path(init_from), config)
  fitted = resumed.fitted if resumed is not None else source.saved.fitted if source is not None else None
  with stage("data read and preprocessed"):
    dataset = load_data(config, fitted, new_batches=source is not None, inputs=inputs, report=log,
                        reader=data_reader(config, workdir, inputs))
  args = run_dir.model_args(config, dataset)
  model = args.build()
  weights = loss_weights(config, dataset.names)
  batch_size = config.train.batch_size
  lr = schedule_lib.scaled_lr(config.train.lr, batch_size, config.train.lr_scaling)
  plan = schedule_lib.auto_plan(len(dataset.train_ids), batch_size, lr, config.train.max_epochs,
                                config.train.align_burnin, config.train.patience,
                                config.train.reduce_lr_patience, config.train.auto_epoch_cap)

  # Sharded initialisation.
  init_key, step_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
  optimizer = config.train.optimizer
  init = jax.jit(lambda key: steps.init_state(model, key, optimizer), out_shardings=state_sharding,
                 compiler_options=steps.RUN_ONCE)
  abstract_state = checkpoint.abstract(jax.eval_shape(init, init_key), state_sharding)

  # Resume, or start (from a finished run's parameters with --init_from).
  if resumed is not None:
    restored_epoch, state = resume_state(ckpts, abstract_state, workdir)
    if restored_epoch != resumed.epoch:  # The newest state was damaged and set aside: an older epoch's schedule.
      resumed = run_dir.saved_epoch(ckpts, ckpts.restore_extras(restored_epoch))
    schedule = schedule_lib.Schedule.from_json(resumed.schedule)
    ckpts.drop_best_after(resumed.epoch)
    if continued:
      schedule.go_on_with(plan)
    if main:
      writer.truncate_after(workdir / "metrics.jsonl", resumed.epoch)
      changes = "".join(f", {k} {old} -> {new}" for k, (old, new) in continued.items())
      print(f"{'Continuing' if continued else 'Resuming'} {workdir} from epoch {resumed.epoch}{changes}.", flush=True)
  else:
    state = init(init_key)
    if source is not None:
      state = state.replace(**adopted_model(source, state, abstract_state, init_from, dataset, config))
      if main:
        print(f"Starting from the parameters of {init_from} (epoch {source.saved.epoch}).", flush=True)
    schedule = schedule_lib.Schedule(plan=plan, lr=lr)
    if main:
      writer.truncate_after(workdir / "metrics.jsonl", 0)
  run_dir.write_cells(workdir, dataset)

  # Steps.
  on_device = config.train.data_on_device and not dataset.on_disk
  with stage("training data put on the devices") if on_device else contextlib.nullcontext():
    train_epoch = make_epoch_runner(config, model, weights, dataset, mesh)
  eval_fn = jax.jit(steps.make_eval_step(model, weights))
  encoder = Encoder(model, dataset, mesh)
  evaluations = periodic_eval.PeriodicEvaluation(config, dataset, encoder)
  meta, tree = run_dir.run_meta(config, dataset, args).to_json(), run_dir.preprocess_tree(dataset)
  metric_writer = writer.MetricWriter(workdir, enabled=main)
  bar = progress.ProgressBar(schedule.plan.max_epochs, enabled=config.train.progress and main)
  n_params = steps.count_params(state.params)
  last_save = -math.inf  # The first epoch is always checkpointed.
  first_epoch = schedule.epoch + 1
  rows_read = rows_read_from_disk(dataset)

  # Loop.
  while not schedule.done:
    epoch = schedule.epoch + 1
    started = time.time()
    noise = schedule_lib.noise_scale(epoch, schedule.plan.align_burnin)
    rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, sampler.train_epoch_stream(config.seed, epoch),
                              batch_size, drop_last=True)
    n_steps = len(rows.valid) // batch_size
    lr = schedule.lr * schedule_lib.warmup_factor(epoch, config.train.warmup_epochs)
    state, measurements = train_epoch(state, rows, n_steps, step_key, lr, noise)
    values = per_step_values(measurements)
    streaming.release_free_memory()  # The epoch's freed chunks, before validation and scoring allocate.
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
    if continued and epoch == resumed.epoch + 1:
      record["continued"] = continued  # The budget keys changed when the run went on from the resumed epoch.
    record.update({f"train/loss_{k}": v for k, v in train_terms.items()})
    if len(dataset.val_ids):
      val_rows = sampler.epoch_rows(dataset.pairing, dataset.val_ids, sampler.val_epoch_stream(config.seed, epoch),
                                    batch_size, drop_last=False)
      val_terms = validate(eval_fn, state, dataset, val_rows, batch_size, jax.random.fold_in(eval_key, epoch),
                           np.float32(noise), batch_sharding)
      record.update({f"val/loss_{k}": v for k, v in val_terms.items()})
    for key, score in MONITORED.items():
      value = score(encoder, state, dataset, config.seed)
      if value is not None:
        record[f"val/{key}"] = value
    monitored = (record.get("val/loss_gen", record["train/loss_gen"]) if config.train.monitor == "val_loss"
                 else record[f"val/{config.train.monitor}"])
    events = schedule.after_epoch(epoch, monitored)
    record.update(events)
    record["time/epoch_s"] = time.time() - started
    record["time/cells_per_s"] = n_steps * batch_size / record["time/epoch_s"]
    if epoch == first_epoch:
      log(f"epoch {epoch} (its programs compiled, unless the compilation cache held them) in "
          f"{record['time/epoch_s']:.1f} s")
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
  if dataset.on_disk:  # Every process says what it read: with several, each reads only its share of every batch.
    epochs = schedule.epoch - first_epoch + 1
    print(f"clue_jax: process {jax.process_index()} of {jax.process_count()} read "
          f"{rows_read_from_disk(dataset) - rows_read:,} rows from its store in {epochs} epoch{'s' * (epochs != 1)}",
          flush=True)

  # Final model: the most recent of the best checkpoints (docs/method.md §3.2), else the last epoch.
  final_epoch = schedule.epoch
  try:
    best = ckpts.restore_newest(abstract_state, from_best=True)
  except checkpoint.DamagedCheckpoint as e:
    warnings.warn(f"{e}; the final model is the last epoch's", stacklevel=1)
    best = None
  if best is not None:
    final_epoch, state = best
  with stage("embeddings encoded and written"):
    shapes = write_embeddings(encoder, state, dataset, config, workdir / "embeddings")
  summary = {"epochs_run": schedule.epoch, "restored_epoch": final_epoch, "plan": schedule.to_json()["plan"],
             "early_stopped": schedule.stopped and schedule.epoch < schedule.plan.max_epochs,
             "n_params": n_params, "heldout_foscttm": heldout_foscttm(encoder, state, dataset, config.seed),
             "unseen_foscttm": unseen_foscttm(encoder, state, dataset, config.seed),
             "library_heads": library_heads(encoder, state, dataset),
             "embeddings": {k: list(v) for k, v in shapes.items()}}
  if continued:
    summary["continued"] = {"from_epoch": resumed.epoch, "changes": continued}
  if main:
    summary["plots"] = periodic_eval.final_plots(workdir, config)
    outputs.write_atomically(workdir / run_dir.SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2)))
  ckpts.close()
  if dataset.on_disk:  # Only an unfinished run needs its rows again, and a resumed run rebuilds them.
    shutil.rmtree(rows_dir(workdir), ignore_errors=True)
  return summary


def rows_read_from_disk(dataset: data_lib.Dataset) -> int:
  """The rows this process has read from its on-disk store so far, over every modality (0 in memory)."""
  return sum(getattr(m.counts, "rows_read", 0) for m in dataset.modalities.values())


def resume_state(ckpts: checkpoint.Checkpoints, abstract_state, workdir: pathlib.Path):
  """(epoch, state) of the newest intact latest checkpoint (damaged newer ones are set aside with a warning)."""
  try:
    return ckpts.restore_newest(abstract_state)
  except checkpoint.DamagedCheckpoint as e:
    raise TrainingError(f"no checkpoint of {workdir} can be restored ({e}); pass --overwrite to start over") from e
  except checkpoint.IncompatibleCheckpoint as e:
    raise TrainingError(f"the checkpoints of {workdir} hold another model than this config builds ({e}); use a new "
                        f"--workdir or pass --overwrite") from e


def adopted_model(source: run_dir.FinishedRun, state, abstract_state, init_from, dataset: data_lib.Dataset,
                  config) -> dict:
  """{"params", "batch_stats"} of the finished run `source` in the freshly initialised `state`: the same arrays,
  with rows for batches that run never saw kept fresh (`clue_jax.train.adopt`). Closes `source`."""
  saved = source.saved
  fix = "use that run's model sizes (model.*), encoder inputs and modalities"
  try:
    restored = source.checkpoints.restore_state(
        saved.epoch, source.checkpoints.saved_shapes(saved.epoch, abstract_state, saved.from_best), saved.from_best)
    entries = adopt.adopt({"params": restored.params, "batch_stats": restored.batch_stats},
                          {"params": state.params, "batch_stats": state.batch_stats},
                          saved.fitted.batch_categories, {n: m.batch_categories for n, m in dataset.modalities.items()},
                          config.model.shared_batches)
  except (checkpoint.IncompatibleCheckpoint, adopt.AdoptError) as e:
    raise TrainingError(f"--init_from={init_from}: its model does not fit this config ({e}); {fix}") from e
  except checkpoint.DamagedCheckpoint as e:
    raise TrainingError(f"--init_from={init_from}: {e}") from e
  finally:
    source.close()
  return parallel.put(entries, jax.tree.map(lambda x: x.sharding, {"params": abstract_state.params,
                                                                   "batch_stats": abstract_state.batch_stats}))


def clean_workdir(workdir: pathlib.Path):
  """Removes a run directory (for `--overwrite`; process 0 removes it, the others wait)."""
  if parallel.is_main_process() and workdir.exists():
    shutil.rmtree(workdir)
  parallel.barrier("clean_workdir")
