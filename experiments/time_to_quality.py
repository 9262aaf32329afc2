"""Time to quality: the wall clock a user waits, from the command to an embedding of a given held-out quality.

  python experiments/time_to_quality.py --config=configs/pbmc.py [--batch-sizes 128,512,2048,8192]
      [--lr-scaling sqrt] [--warmup-epochs 2] [--optimizer rmsprop] [--max-epochs 20] [--seed 0]
      [--ref-python /tmp/ref/bin/python] [--target 0.25] --out=runs/time_to_quality

Every clue_jax setting is one `python -m clue_jax.train` subprocess: batch 128 exactly as the config says (the
reference's rule), every other batch size with `--lr-scaling`, `--warmup-epochs` and `--optimizer`. The clock starts
before the subprocess does, so interpreter start-up, imports, data loading, preprocessing and compilation count; each
epoch is timed when its line lands in metrics.jsonl (polled every 0.1 s), with both held-out protocols of that epoch:
`heldout` (pairs hidden during training, whose cells trained unpaired) and `unseen` (validation cells measured in
both modalities, never trained on). The final quality is the run's restored model's (summary.json), timed when the
process ends; it is the last point of each trace.

With `--ref-python`, the PyTorch reference (`reference_scglue.py --trace`, library defaults, the config's own epoch
budget and patiences as `compare_reference.py` sets them) runs afterwards on the same cells, encoder inputs and hidden
pairs, its clock also started before its subprocess; its per-epoch held-out FOSCTTM is traced with the tracing time
taken out, and its final (restored) model is timed at the end of its fit. The reference trains on every exported
cell, so it has no unseen-cell protocol here.

The target (`--target`, else the reference's final held-out FOSCTTM) gives each setting's time to the target: the
first epoch whose held-out FOSCTTM is at or below it. Three ratios against the reference: its own first reach of
the target over the setting's (the like-for-like reading: both first reach the target), its end of fit (when its
user gets the final model) over the setting's first reach, and its whole wall time over the setting's. Writes
time_to_quality.json, time_to_quality.md and, with matplotlib, time_to_quality.png under `--out`.
"""

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="clue_jax config (PATH or PATH:ARGUMENT) with held-out pairs")
  parser.add_argument("--batch-sizes", default="128,512,2048,8192", help="comma-separated global batch sizes")
  parser.add_argument("--lr-scaling", default="sqrt", choices=["none", "linear", "sqrt"],
                      help="train.lr_scaling for every batch size but 128")
  parser.add_argument("--warmup-epochs", type=int, default=2, help="train.warmup_epochs for every batch size but 128")
  parser.add_argument("--optimizer", default="rmsprop", help="train.optimizer for every batch size but 128")
  parser.add_argument("--max-epochs", type=int, default=20, help="train.max_epochs of every clue_jax run")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--ref-python", help="python of a virtualenv with scglue 0.4.1 (reference_scglue.py)")
  parser.add_argument("--target", type=float, help="held-out FOSCTTM target (default: the reference's final)")
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  if args.ref_python is None and args.target is None:
    parser.error("give --target, or --ref-python to take the reference's final held-out FOSCTTM")
  return args


def settings(args) -> list[dict]:
  out = []
  for batch_size in (int(b) for b in args.batch_sizes.split(",")):
    overrides = {"train.batch_size": batch_size}
    if batch_size != 128:
      overrides.update({"train.lr_scaling": args.lr_scaling, "train.warmup_epochs": args.warmup_epochs,
                        "train.optimizer": args.optimizer})
    name = f"batch {batch_size}" + ("" if batch_size == 128 else f", {args.lr_scaling} lr, warm-up "
                                                                  f"{args.warmup_epochs}, {args.optimizer}")
    out.append({"name": name, "overrides": overrides})
  return out


def run_clue(args, setting: dict, workdir: pathlib.Path) -> dict:
  """One training subprocess; its per-epoch qualities at the wall time their records appeared."""
  flags = [f"--config.{k}={v}" for k, v in setting["overrides"].items()]
  command = [sys.executable, "-m", "clue_jax.train", f"--config={args.config}", f"--workdir={workdir}", "--overwrite",
             f"--config.seed={args.seed}", f"--config.train.max_epochs={args.max_epochs}",
             "--config.train.progress=False", "--config.evals.plots=False", *flags]
  metrics, trace = workdir / "metrics.jsonl", []
  start = time.time()
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  while True:
    finished = process.poll() is not None
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    for line in lines[len(trace):]:
      if line.endswith("}"):
        record = json.loads(line)
        trace.append({"epoch": record["epoch"], "time": time.time() - start,
                      "heldout": record.get("val/heldout_foscttm"), "unseen": record.get("val/unseen_foscttm")})
    if finished:
      break
    time.sleep(0.1)
  wall = time.time() - start
  if process.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
  summary = json.loads((workdir / "summary.json").read_text())
  trace.append({"epoch": "final", "time": wall, "heldout": summary["heldout_foscttm"],
                "unseen": summary["unseen_foscttm"]})  # The restored model, with the embeddings written.
  return {**setting, "trace": trace, "wall_s": wall, "final_heldout": summary["heldout_foscttm"],
          "final_unseen": summary["unseen_foscttm"], "epochs_run": summary["epochs_run"],
          "restored_epoch": summary["restored_epoch"]}


def run_reference(args, out: pathlib.Path) -> dict:
  """The reference at its library defaults on the config's exported cells, traced every epoch."""
  import compare_reference
  from clue_jax import config as config_lib
  from clue_jax.train import schedule, trainer

  path, arguments = config_lib.split_spec(args.config)
  config = config_lib.load_module(path).get_config(*arguments)
  config.seed = args.seed
  dataset = trainer.load_data(config)
  export = out / "reference_inputs"
  export.mkdir(parents=True, exist_ok=True)
  mods = compare_reference.export(dataset, export)
  plan = schedule.auto_plan(len(dataset.train_ids), config.train.batch_size, config.train.lr, config.train.max_epochs,
                            config.train.align_burnin, config.train.patience, config.train.reduce_lr_patience,
                            config.train.auto_epoch_cap)
  result_path = out / "reference.json"
  command = [args.ref_python, str(HERE / "reference_scglue.py"), *mods, "--heldout", str(export / "pairs.tsv"),
             "--preset", "defaults", "--seed", str(args.seed), "--trace", "--max-epochs", str(plan.max_epochs),
             "--align-burnin", str(plan.align_burnin), "--patience", str(plan.patience),
             "--reduce-lr-patience", str(plan.reduce_lr_patience),
             "--shared-batches", str(config.model.shared_batches).lower(), "--out", str(result_path)]
  start = time.time()
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
  wall = time.time() - start
  result = json.loads(result_path.read_text())
  trace = [{"epoch": r["epoch"], "time": r["time"] - start, "heldout": r["foscttm"], "unseen": None}
           for r in result["trace"]]
  trace.append({"epoch": "final", "time": result["fit_ended"] - start, "heldout": result["foscttm"], "unseen": None})
  return {"name": "PyTorch reference, batch 128", "overrides": {}, "trace": trace,
          "wall_s": wall - result["traced_seconds"], "final_s": result["fit_ended"] - start,
          "final_heldout": result["foscttm"], "final_unseen": None, "epochs_run": result["epochs_run"],
          "plan": plan.__dict__}


def fmt(value, spec=".1f") -> str:
  return "-" if value is None else format(value, spec)


def ratio(reference_s, setting_s) -> str:
  """How many times sooner the setting is than the reference: `N.Nx sooner` (or later), "-" without a time."""
  if reference_s is None or setting_s is None:
    return "-"
  value = reference_s / setting_s
  return f"{value:.1f}x sooner" if value >= 1 else f"{1 / value:.1f}x later"


def first_time(trace: list, key: str, target: float):
  return next((p["time"] for p in trace if p[key] is not None and p[key] <= target), None)


def cpu_name() -> str:
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
  return f"{len(names)} x {names[0]}" if names else platform.machine()


def commit() -> str:
  done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
  return done.stdout.strip() or "unknown"


def markdown(args, rows: list, reference, target: float) -> str:
  lines = [f"# Time to quality: {args.config}", "",
           f"{datetime.date.today()}, host `{platform.node()}` ({cpu_name()}), "
           f"commit {commit()}; seed {args.seed}, clue_jax runs capped at {args.max_epochs} epochs.", "",
           "```", "python experiments/time_to_quality.py " + " ".join(sys.argv[1:]), "```", "",
           f"Target: held-out-pair FOSCTTM <= {target:.4f}"
           + (" (the reference's final)." if args.target is None else "."), "",
           "| setting | first epoch's record (s) | to target, held-out pairs (s) | to target, unseen cells (s) | "
           "final held-out | final unseen | epochs run (restored) | wall (s) | reference's first reach / this "
           "setting's | reference's end of fit / this setting's first reach | reference's wall / this setting's |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  ref_first = first_time(reference["trace"], "heldout", target) if reference else None
  for row in rows + ([reference] if reference else []):
    to_heldout, to_unseen = first_time(row["trace"], "heldout", target), first_time(row["trace"], "unseen", target)
    ratios = ["", "", ""]
    if reference and row is not reference:
      ratios = [ratio(ref_first, to_heldout), ratio(reference["final_s"], to_heldout),
                ratio(reference["wall_s"], row["wall_s"])]
    restored = f" ({row['restored_epoch']})" if "restored_epoch" in row else ""
    lines.append(f"| {row['name']} | {fmt(row['trace'][0]['time'] if row['trace'] else None)} | {fmt(to_heldout)} | "
                 f"{fmt(to_unseen)} | {fmt(row['final_heldout'], '.4f')} | {fmt(row['final_unseen'], '.4f')} | "
                 f"{row['epochs_run']}{restored} | {fmt(row['wall_s'])} | {' | '.join(ratios)} |")
  if reference:
    lines += ["", f"The reference's fit ended {reference['final_s']:.1f} s after its command started (its final model: "
              f"held-out FOSCTTM {reference['final_heldout']:.4f}, {reference['epochs_run']} epochs, plan "
              f"{reference['plan']}); its first traced point (an epoch, or the final model) at or below the target "
              f"came at {fmt(first_time(reference['trace'], 'heldout', target))} s."]
  return "\n".join(lines) + "\n"


def plot(rows: list, target: float, path: pathlib.Path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return
  fig, ax = plt.subplots(figsize=(8, 5))
  for row in rows:
    points = [(p["time"], p["heldout"]) for p in row["trace"] if p["heldout"] is not None]
    line, = ax.plot(*zip(*points), marker=".", label=f"{row['name']} (held-out pairs)")
    unseen = [(p["time"], p["unseen"]) for p in row["trace"] if p["unseen"] is not None]
    if unseen:
      ax.plot(*zip(*unseen), linestyle="--", color=line.get_color(), alpha=0.6, label="  unseen cells")
  ax.axhline(target, color="grey", linestyle=":", label=f"target {target:.3f}")
  ax.set(xscale="log", xlabel="wall clock from the command (s, log)", ylabel="FOSCTTM (lower is better)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  for i, setting in enumerate(settings(args)):
    rows.append(run_clue(args, setting, out / f"clue_{i}"))
    print(f"{setting['name']}: {rows[-1]['wall_s']:.1f} s, final held-out {rows[-1]['final_heldout']:.4f}", flush=True)
  reference = run_reference(args, out) if args.ref_python else None
  target = args.target if args.target is not None else reference["final_heldout"]
  (out / "time_to_quality.json").write_text(json.dumps({"target": target, "rows": rows, "reference": reference},
                                                       indent=2))
  (out / "time_to_quality.md").write_text(markdown(args, rows, reference, target))
  plot(rows + ([reference] if reference else []), target, out / "time_to_quality.png")
  print((out / "time_to_quality.md").read_text())


if __name__ == "__main__":
  main()
