"""Strong and weak scaling of clue_jax over 1, 2, 4, ... devices: throughput and quality after a fixed budget.

  python experiments/scaling.py [--fake-devices 4] [--cells 2048] [--batch-size 128] [--per-device-batch 64]
      [--epochs 3] [--quality-epochs 4] [--threshold 0.2] [--lr-scaling sqrt] [--warmup-epochs 0] [--out runs/scaling]

Every device count runs in its own subprocess (`--fake-devices K`: K fake CPU devices, set before JAX starts;
otherwise all visible devices). Strong scaling keeps the global batch (`--batch-size`); weak scaling keeps the batch
per device (`--per-device-batch`), so its global batch grows with the devices, and its quality runs scale the
learning rate with it (`--lr-scaling`, train.lr_scaling relative to batch 128; `none` keeps the config's rate) after
`--warmup-epochs`. Per row:

  * `cells_per_s`: the trainer's epoch loop (`trainer.make_epoch_runner`, data on the devices) on synthetic paired
    cells (`bench_throughput.synthetic_files`, library-default model), compile excluded;
  * quality: `configs/smoke.py` (embedded CITE starter, 10 % of pairs hidden) trained by `trainer.train_and_evaluate`
    for `--quality-epochs`; `foscttm` is the held-out FOSCTTM after the budget, `epochs_to_threshold` the first epoch
    with FOSCTTM <= `--threshold`, `seconds_to_threshold` that many epochs at the median epoch time of epochs >= 2
    (epoch 1 includes compilation), and `trace` the FOSCTTM after every epoch against the training seconds so far.

Writes `scaling.csv`, `scaling.json` (the rows with their traces) and, with matplotlib, `scaling.png` (cells/s,
quality after the budget, and quality against training time) under `--out`.
"""

import argparse
import csv
import importlib.util
import json
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
FIELDS = ["mode", "devices", "batch_size", "lr_scaling", "cells_per_s", "foscttm", "epochs_to_threshold",
          "seconds_to_threshold"]


def throughput(n_devices: int, batch_size: int, cells: int, epochs: int) -> float:
  """Cells/s of the trainer's epoch loop over `epochs` epochs after a compiling one."""
  import jax
  import numpy as np
  import bench_throughput
  from clue_jax.data import sampler
  from clue_jax.train import parallel, run_dir, steps, trainer
  with tempfile.TemporaryDirectory() as tmp:
    args = argparse.Namespace(preset="defaults", batch_size=batch_size, devices=n_devices, steps_per_dispatch=8,
                              host_data=False, matmul_dtype="float32")
    config = bench_throughput.bench_config(bench_throughput.synthetic_files(pathlib.Path(tmp), cells), args)
    dataset = trainer.load_data(config)
  model = run_dir.model_args(config, dataset).build()
  mesh = parallel.make_mesh(n_devices)
  parallel.check_batch_size(batch_size, mesh)
  rng = np.random.default_rng(0)
  rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, rng, batch_size, drop_last=True)
  n_steps = len(rows.valid) // batch_size
  state = jax.jit(lambda k: steps.init_state(model, k), out_shardings=parallel.replicated(mesh))(jax.random.key(0))
  run = trainer.make_epoch_runner(config, model, trainer.loss_weights(config, dataset.names), dataset, mesh)
  key = jax.random.key(1)
  state, _ = run(state, rows, n_steps, key, 2e-3, 0.5)
  jax.block_until_ready(state)
  started = time.perf_counter()
  for _ in range(epochs):
    rows = sampler.epoch_rows(dataset.pairing, dataset.train_ids, rng, batch_size, drop_last=True)
    state, _ = run(state, rows, n_steps, key, 2e-3, 0.5)
  jax.block_until_ready(state)
  return epochs * n_steps * batch_size / (time.perf_counter() - started)


def quality(n_devices: int, batch_size: int, epochs: int, threshold: float, lr_scaling: str = "none",
            warmup_epochs: int = 0) -> dict:
  """Held-out FOSCTTM of configs/smoke.py after `epochs`, and the time to reach `threshold`."""
  import numpy as np
  from clue_jax.train import trainer
  spec = importlib.util.spec_from_file_location("smoke", HERE.parent / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.update(max_epochs=epochs, batch_size=batch_size, num_devices=n_devices, progress=False,
                      lr_scaling=lr_scaling, warmup_epochs=warmup_epochs)
  with tempfile.TemporaryDirectory() as tmp:
    trainer.train_and_evaluate(config, tmp)
    records = [json.loads(line) for line in (pathlib.Path(tmp) / "metrics.jsonl").read_text().splitlines()]
  scores = [r["val/heldout_foscttm"] for r in records]
  steady = float(np.median([r["time/epoch_s"] for r in records[1:]] or [records[0]["time/epoch_s"]]))
  reached = next((i + 1 for i, s in enumerate(scores) if s <= threshold), None)
  seconds = np.cumsum([r["time/epoch_s"] for r in records])
  return {"foscttm": scores[-1], "epochs_to_threshold": reached,
          "seconds_to_threshold": None if reached is None else reached * steady,
          "trace": [[float(t), s] for t, s in zip(seconds, scores)]}


def worker(args):
  if args.fake_devices:
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.fake_devices)
  sys.path.insert(0, str(HERE))
  rule = args.lr_scaling if args.mode == "weak" else "none"
  warmup = args.warmup_epochs if args.mode == "weak" else 0
  row = {"mode": args.mode, "devices": args.devices, "batch_size": args.batch_size, "lr_scaling": rule,
         "cells_per_s": throughput(args.devices, args.batch_size, args.cells, args.epochs)}
  row.update(quality(args.devices, args.batch_size, args.quality_epochs, args.threshold, rule, warmup))
  print("RESULT " + json.dumps(row), flush=True)


def device_count(args) -> int:
  if args.fake_devices:
    return args.fake_devices
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], check=True,
                       capture_output=True, text=True).stdout
  return int(out.split()[-1])


def plot(rows: list, path: pathlib.Path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib is not installed: no plot", flush=True)
    return
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
  for mode in ("strong", "weak"):
    mine = [r for r in rows if r["mode"] == mode]
    axes[0].plot([r["devices"] for r in mine], [r["cells_per_s"] for r in mine], "o-", label=mode)
    axes[1].plot([r["devices"] for r in mine], [r["foscttm"] for r in mine], "o-", label=mode)
    for r in mine:
      axes[2].plot(*zip(*r["trace"]), ".-" if mode == "weak" else ".:",
                   label=f"{mode}, {r['devices']} dev, batch {r['batch_size']}")
  ticks = sorted({r["devices"] for r in rows})
  axes[0].set(xlabel="devices", ylabel="cells/s (epoch loop)", xscale="log", xticks=ticks)
  axes[1].set(xlabel="devices", ylabel="held-out FOSCTTM after budget", xscale="log", xticks=ticks)
  axes[2].set(xlabel="training seconds (epoch 1 includes compilation)", ylabel="held-out FOSCTTM")
  axes[2].legend(fontsize=6)
  for ax in axes[:2]:
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--fake-devices", type=int, default=0, help="K fake CPU devices (0: the real devices)")
  parser.add_argument("--cells", type=int, default=2048)
  parser.add_argument("--batch-size", type=int, default=128, help="global batch of the strong-scaling runs")
  parser.add_argument("--per-device-batch", type=int, default=64, help="per-device batch of the weak-scaling runs")
  parser.add_argument("--epochs", type=int, default=3, help="timed epochs of the throughput measurement")
  parser.add_argument("--quality-epochs", type=int, default=4)
  parser.add_argument("--threshold", type=float, default=0.2)
  parser.add_argument("--lr-scaling", default="sqrt", choices=["none", "linear", "sqrt"],
                      help="train.lr_scaling of the weak-scaling quality runs")
  parser.add_argument("--warmup-epochs", type=int, default=0, help="train.warmup_epochs of the weak-scaling runs")
  parser.add_argument("--out", default="runs/scaling")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mode", default="strong", help=argparse.SUPPRESS)
  parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  counts, n = [], 1
  while n <= device_count(args):
    counts.append(n)
    n *= 2
  rows = []
  for mode in ("strong", "weak"):
    for devices in counts:
      batch = args.batch_size if mode == "strong" else args.per_device_batch * devices
      command = [sys.executable, __file__, "--worker", f"--mode={mode}", f"--devices={devices}",
                 f"--batch-size={batch}", f"--fake-devices={args.fake_devices}", f"--cells={args.cells}",
                 f"--epochs={args.epochs}", f"--quality-epochs={args.quality_epochs}", f"--threshold={args.threshold}",
                 f"--lr-scaling={args.lr_scaling}", f"--warmup-epochs={args.warmup_epochs}"]
      done = subprocess.run(command, check=True, capture_output=True, text=True)
      row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
      print({k: v for k, v in row.items() if k != "trace"}, flush=True)
      rows.append(row)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  with open(out / "scaling.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  (out / "scaling.json").write_text(json.dumps(rows, indent=2))
  plot(rows, out / "scaling.png")
  print(f"wrote {out / 'scaling.csv'}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
