"""Training throughput of clue_jax, the machine's dense-matmul FLOP/s, and (optionally) the PyTorch reference.

  python experiments/bench_throughput.py [--cells 3000] [--batch-size 128] [--devices 0] [--preset defaults]
      [--matmul-dtype float32] [--ref-python /tmp/ref/bin/python] [--compare loss.lam_contrastive=0.1]

Default shape: the reference's benchmark preset (benchmark.md §B): 3,000 fully paired synthetic cells, NB counts of
2,000 + 100 features, 2 batches, 100-d encoder inputs, batch 128, library-default model. Reports

  * train-step cells/s on device-resident chunks (compile excluded), and end-to-end cells/s of the trainer's epoch
    loop (`trainer.make_epoch_runner`: minibatches gathered on the devices, or densified on the host with
    --host-data) over whole epochs;
  * model FLOPs per training cell (XLA's cost analysis of the compiled chunk) and the achieved fraction of the
    measured f32 matmul FLOP/s (with --matmul-dtype bfloat16, also of the measured bf16 matmul FLOP/s);
  * with --ref-python (a venv with scglue, see reference_scglue.py), the reference's cells/s measured in the same
    run on the same shape, and the ratio.

With --compare KEY=VALUE (repeatable), a second model with those config overrides is timed in the same rounds
(train step and epoch loop), and its cells/s ratio to the first is reported: the cost of a switch, A/B in one run.

With --rounds R every figure is measured R times in turn (matmul FLOP/s, steps, loop, reference, then again), so that
each round's ratios compare measurements taken minutes apart on a machine whose speed drifts; it reports the medians
and, beside them, each round's figures.
"""

import argparse
import ast
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from clue_jax import config as config_lib
from clue_jax.data import dataset as data_lib, sampler
from clue_jax.train import parallel, run_dir, steps, trainer

HERE = pathlib.Path(__file__).resolve().parent


def synthetic_files(directory: pathlib.Path, n_cells: int, seed: int = 0) -> dict:
  """Paired NB-like counts (2,000 RNA + 100 ADT features, 2 batches) with a random 100-d obsm["X_rep"]."""
  rng = np.random.default_rng(seed)
  paths = {}
  for name, n_features in (("rna", 2000), ("adt", 100)):
    profiles = rng.gamma(0.3, 1.0, (10, n_features))
    cluster = rng.integers(0, 10, n_cells)
    counts = rng.poisson(profiles[cluster] * rng.gamma(2.0, 1.0, (n_cells, 1))).astype(np.float32)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    obs["batch"] = pd.Categorical(np.where(np.arange(n_cells) % 2, "b1", "b0"), categories=["b0", "b1"])
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs)
    adata.obsm["X_rep"] = rng.normal(size=(n_cells, 100)).astype(np.float32)
    paths[name] = directory / f"{name}.h5ad"
    adata.write_h5ad(paths[name])
  return paths


def bench_config(paths: dict, args) -> config_lib.ml_collections.ConfigDict:
  config = config_lib.get_config()
  if args.preset == "competition_cite":
    config = config_lib.competition_cite(config)
  for name in ("rna", "adt"):
    config.data.modalities[name] = config_lib.modality(str(paths[name]), layer="X", batch_key="batch",
                                                       feature_selection="all", rep="obsm", rep_key="X_rep")
  config.data.modality_order = "rna,adt"
  config.model.shared_batches = True
  config.train.batch_size = args.batch_size
  config.train.num_devices = args.devices
  config.train.steps_per_dispatch = args.steps_per_dispatch
  config.train.data_on_device = not args.host_data
  config.model.matmul_dtype = args.matmul_dtype
  return config


def matmul_flops(n: int = 2048, repeats: int = 20, dtype=jnp.float32) -> float:
  """Measured dense matmul FLOP/s of the default device (`dtype` operands, float32 accumulation)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  started = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - started)


class Timers:
  """The compiled train chunk and epoch loop of `config`, each timed on demand (cells/s; compile excluded)."""

  def __init__(self, config, epochs: int):
    self.dataset = dataset = trainer.load_data(config)
    model = run_dir.model_args(config, dataset).build()
    weights = trainer.loss_weights(config, dataset.names)
    self.mesh = mesh = parallel.make_mesh(config.train.num_devices)
    parallel.check_batch_size(config.train.batch_size, mesh)
    self.batch_size, self.epochs = config.train.batch_size, epochs
    self.rng = np.random.default_rng(0)
    rows = self.epoch_rows()
    self.n_steps = len(rows.valid) // self.batch_size
    # An epoch shorter than one dispatch (large batches) is timed as the trainer runs it: one partial chunk.
    self.per_dispatch = min(config.train.steps_per_dispatch, self.n_steps)
    chunk_sharding = parallel.batch_sharding(mesh, 1)
    self.state = jax.jit(lambda k: steps.init_state(model, k), out_shardings=parallel.replicated(mesh))(
        jax.random.key(0))
    self.train_chunk = jax.jit(steps.make_train_chunk(model, weights), donate_argnums=0)
    self.inputs = (jax.random.key(1), np.float32(2e-3), np.float32(0.5))
    # XLA's cost analysis counts a loop body once: cost a one-step program.
    one_step = parallel.put(self.chunk_at(rows, 0, 1), chunk_sharding)
    cost = self.train_chunk.lower(self.state, one_step, np.int32(1), *self.inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    self.flops_per_cell = float(cost["flops"]) / self.batch_size
    self.device_chunk = parallel.put(self.chunk_at(rows, 0, self.per_dispatch), chunk_sharding)
    self.dispatch_steps = parallel.put(np.int32(self.per_dispatch), parallel.replicated(mesh))
    self.state, _ = self.train_chunk(self.state, self.device_chunk, self.dispatch_steps, *self.inputs)  # Compiles.
    # The trainer's own epoch loop (data on the devices unless --host-data), compiled by a first epoch.
    self.run_epoch = trainer.make_epoch_runner(config, model, weights, dataset, mesh)
    self.state, _ = self.run_epoch(self.state, self.epoch_rows(), self.n_steps, *self.inputs)
    jax.block_until_ready(self.state)

  def epoch_rows(self):
    return sampler.epoch_rows(self.dataset.pairing, self.dataset.train_ids, self.rng, self.batch_size, drop_last=True)

  def chunk_at(self, epoch_rows, first, count):
    return data_lib.steps_chunk(self.dataset, epoch_rows, first, count, self.batch_size)

  def steps(self) -> float:
    """Cells/s of the jitted train chunk on one device-resident chunk, over about `epochs` epochs of steps."""
    repeats = max(1, (self.epochs * self.n_steps) // self.per_dispatch)
    started = time.perf_counter()
    for _ in range(repeats):
      self.state, _ = self.train_chunk(self.state, self.device_chunk, self.dispatch_steps, *self.inputs)
    jax.block_until_ready(self.state)
    return repeats * self.per_dispatch * self.batch_size / (time.perf_counter() - started)

  def loop(self) -> float:
    """Cells/s of the trainer's epoch loop over `epochs` whole epochs (fresh minibatches each)."""
    started = time.perf_counter()
    for _ in range(self.epochs):
      self.state, _ = self.run_epoch(self.state, self.epoch_rows(), self.n_steps, *self.inputs)
    jax.block_until_ready(self.state)
    return self.epochs * self.n_steps * self.batch_size / (time.perf_counter() - started)


def reference_cells_per_s(python: str, n_cells: int, preset: str) -> float:
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "ref.json"
    subprocess.run([python, str(HERE / "reference_scglue.py"), "--synthetic", str(n_cells), "--preset", preset,
                    "--max-epochs", "5", "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["cells_per_second"]


def parse_override(item: str) -> tuple:
  """"loss.lam_align=0.0" -> ("loss.lam_align", 0.0): a Python literal, else the text itself."""
  key, _, text = item.partition("=")
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cells", type=int, default=3000)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--devices", type=int, default=0, help="0 = all visible devices")
  parser.add_argument("--steps-per-dispatch", type=int, default=8)
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=1, help="measurements, each of every figure in turn")
  parser.add_argument("--host-data", action="store_true", help="densify minibatches on the host (no data on device)")
  parser.add_argument("--preset", choices=["defaults", "competition_cite"], default="defaults")
  parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32",
                      help="model.matmul_dtype of clue_jax (the reference always runs float32)")
  parser.add_argument("--matmul-size", type=int, default=2048,
                      help="n of the n x n products that measure the matmul FLOP/s (large on a GPU, e.g. 8192)")
  parser.add_argument("--ref-python", help="python of a venv with scglue: also measure the reference")
  parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                      help="config override of a second model timed beside the first (repeatable)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    config = bench_config(synthetic_files(pathlib.Path(tmp), args.cells), args)
    timers = Timers(config, args.epochs)
    if args.compare:
      other = config_lib.apply_overrides(config, dict(map(parse_override, args.compare)))
      compared = Timers(other, args.epochs)
  rounds = []
  for _ in range(args.rounds):
    measured = {"matmul_gflops": matmul_flops(args.matmul_size) / 1e9, "step_cells_per_s": timers.steps(),
                "loop_cells_per_s": timers.loop()}
    measured["fraction_of_matmul_peak"] = (measured["step_cells_per_s"] * timers.flops_per_cell
                                           / (measured["matmul_gflops"] * 1e9))
    if args.matmul_dtype == "bfloat16":  # The same FLOPs against the bf16 products' own rate.
      measured["bf16_matmul_gflops"] = matmul_flops(args.matmul_size, dtype=jnp.bfloat16) / 1e9
      measured["fraction_of_bf16_matmul_peak"] = (measured["step_cells_per_s"] * timers.flops_per_cell
                                                  / (measured["bf16_matmul_gflops"] * 1e9))
    if args.compare:
      measured["compared_step_cells_per_s"], measured["compared_loop_cells_per_s"] = compared.steps(), compared.loop()
      measured["compared_step_ratio"] = measured["compared_step_cells_per_s"] / measured["step_cells_per_s"]
      measured["compared_loop_ratio"] = measured["compared_loop_cells_per_s"] / measured["loop_cells_per_s"]
    if args.ref_python:
      measured["reference_cells_per_s"] = reference_cells_per_s(args.ref_python, args.cells, args.preset)
      measured["ratio_vs_reference"] = measured["loop_cells_per_s"] / measured["reference_cells_per_s"]
    rounds.append(measured)
  result = {"compare": args.compare, "devices": int(timers.mesh.devices.size), "device": jax.devices()[0].device_kind,
            "n_params": steps.count_params(timers.state.params), "flops_per_cell": timers.flops_per_cell}
  for key in rounds[0]:  # The median over the rounds, and each round's figure.
    result[key] = float(np.median([r[key] for r in rounds]))
    if args.rounds > 1:
      result[f"{key}_rounds"] = [r[key] for r in rounds]
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  sys.exit(main())
