"""Atlas scale end to end: the wall time and peak RSS of every stage of `python -m clue_jax.train` (one epoch), for
the in-memory and the streaming data paths, at N cells, with the PyTorch reference beside it.

  python experiments/bench_atlas.py --cite-source BMMC_CITE.h5mu --multiome-source BMMC_MULTIOME.h5mu \
      --atlas-dir /tmp/atlases --cases cite:100000,cite:300000,cite:1000000,multiome:100000,multiome:500000 \
      --storages memory,disk [--reference-python /tmp/ref/bin/python] --out experiments/results/atlas.jsonl

Atlases (experiments/make_atlas.py) are generated into `--atlas-dir/<kind>_<N>` when absent. Each run is a fresh
process (`configs/cite.py` or `configs/multiome.py` on the atlas files: counts in X, the PCA fitted with the Gram
solver on 100,000 training cells, the ATAC LSI on 20,000; `--config.data.storage` set per run). A thread samples the
process's resident memory every 0.2 s; each stage's peak is the largest sample between the log line of the stage
before and its own (the trainer logs a line as each stage ends). The reference (experiments/reference_atlas.py, run
by `--reference-python` in its own virtualenv) reads, preprocesses with scanpy as its tutorials do, trains one epoch
and encodes; it is sampled the same way. Every run appends one JSON line to `--out`; `--table` prints the Markdown
table and draws the PNG from that file. Epoch 1's time includes compiling its programs (a new program whenever the
data's shapes change, unless JAX's compilation cache holds it): `--epochs 2` also records the next epoch's cells/s.
"""

import argparse
import json
import pathlib
import re
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
STAGES = [  # (name, pattern of the trainer's log line that ends it)
    ("read", re.compile(r"clue_jax: (\w+): read .* in ([\d.]+) s")),
    ("fit", re.compile(r"clue_jax: (\w+): (?:PCA|LSI) fitted .* in ([\d.]+) s")),
    ("arrays", re.compile(r"clue_jax: (\w+): training arrays built in ([\d.]+) s")),
    ("device_put", re.compile(r"clue_jax: ()training data put on the devices in ([\d.]+) s")),
    ("epoch", re.compile(r"clue_jax: ()epoch 1 .* in ([\d.]+) s")),
    ("encode_write", re.compile(r"clue_jax: ()embeddings encoded and written in ([\d.]+) s")),
]
FIT_CELLS = {"rna": 100_000, "adt": 100_000, "atac": 20_000}


def rss_gb(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) / 1e6
  except OSError:
    pass
  return 0.0


class Sampler:
  """Resident memory of a process every `period` s; `peak()` since the last `mark()`, and overall."""

  def __init__(self, pid: int, period: float = 0.2):
    self.pid, self.period, self.window, self.overall, self.done = pid, period, 0.0, 0.0, False
    self.thread = threading.Thread(target=self.run, daemon=True)
    self.thread.start()

  def run(self):
    while not self.done:
      value = rss_gb(self.pid)
      self.window, self.overall = max(self.window, value), max(self.overall, value)
      time.sleep(self.period)

  def mark(self) -> float:
    peak = max(self.window, rss_gb(self.pid))
    self.window = 0.0
    return peak

  def stop(self):
    self.done = True
    self.thread.join()


def atlas(kind: str, cells: int, source: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  out = root / f"{kind}_{cells}"
  if not (out / "rna.h5ad").is_file():
    subprocess.run([sys.executable, str(ROOT / "experiments" / "make_atlas.py"), "--kind", kind, "--source",
                    str(source), "--cells", str(cells), "--out", str(out)], check=True)
  return out


def train_command(kind: str, data: pathlib.Path, storage: str, workdir: pathlib.Path, epochs: int) -> list:
  other = "adt" if kind == "cite" else "atac"
  flags = [f"--config={ROOT / 'configs' / f'{kind}.py'}", f"--workdir={workdir}", "--overwrite",
           f"--config.data.storage={storage}", f"--config.train.max_epochs={epochs}", "--config.train.progress=False",
           "--config.data.modalities.rna.rep_normalize=log1p_cp10k", "--config.data.modalities.rna.rep_solver=gram"]
  for name in ("rna", other):
    flags += [f"--config.data.modalities.{name}.path={data / f'{name}.h5ad'}",
              f"--config.data.modalities.{name}.layer=X",
              f"--config.data.modalities.{name}.rep_fit_cells={FIT_CELLS[name]}"]
  if kind == "cite":
    flags += ["--config.data.modalities.adt.rep_normalize=clr", "--config.data.modalities.adt.rep_solver=gram"]
  return [sys.executable, "-m", "clue_jax.train", *flags]


def measure(command: list, log: pathlib.Path, parse_stages: bool, timeout_s: float) -> dict:
  """Runs `command`, its output teed to `log`, SIGKILLed after `timeout_s`; wall time, overall peak RSS and
  (clue_jax) per-stage seconds and peak."""
  started = time.perf_counter()
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  timer = threading.Timer(timeout_s, process.kill)
  timer.start()
  sampler = Sampler(process.pid)
  stages = {}
  with open(log, "w") as out:
    for line in process.stdout:
      out.write(line)
      out.flush()
      if not parse_stages:
        continue
      for name, pattern in STAGES:
        match = pattern.search(line)
        if match:
          key = f"{name}_{match.group(1)}" if match.group(1) else name
          stages[key] = {"seconds": float(match.group(2)), "peak_rss_gb": round(sampler.mark(), 3)}
  returncode = process.wait()
  timer.cancel()
  sampler.stop()
  result = {"returncode": returncode, "wall_s": round(time.perf_counter() - started, 1), "timeout_s": timeout_s,
            "peak_rss_gb": round(sampler.overall, 3)}
  if parse_stages:
    result["stages"] = stages
  return result


def clue_run(kind, cells, data, storage, scratch, log_dir, timeout_s, epochs) -> dict:
  workdir = scratch / f"run_{kind}_{cells}_{storage}"
  result = measure(train_command(kind, data, storage, workdir, epochs), log_dir / f"{kind}_{cells}_{storage}.log",
                   True, timeout_s)
  metrics = workdir / "metrics.jsonl"
  if metrics.is_file() and metrics.read_text().strip():
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    result["cells_per_s"] = round(records[0]["time/cells_per_s"], 1)  # Epoch 1, its compilation included.
    if len(records) > 1:
      result["later_epochs_cells_per_s"] = [round(r["time/cells_per_s"], 1) for r in records[1:]]
  return {"implementation": "clue_jax", "storage": storage, **result}


def reference_run(kind, cells, data, python, scratch, log_dir, timeout_s) -> dict:
  out = scratch / f"reference_{kind}_{cells}.json"
  out.unlink(missing_ok=True)
  other = "adt" if kind == "cite" else "atac"
  command = [python, str(ROOT / "experiments" / "reference_atlas.py"), "--kind", kind, "--rna",
             str(data / "rna.h5ad"), "--other", str(data / f"{other}.h5ad"), "--out", str(out), "--threads", "2"]
  result = measure(command, log_dir / f"{kind}_{cells}_reference.log", False, timeout_s)
  if out.is_file():
    result["reference"] = json.loads(out.read_text())
  return {"implementation": "scglue 0.4.1", **result}


def host() -> dict:
  import platform
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
  return {"cpu": cpu, "cores": len([1 for line in open("/proc/cpuinfo") if line.startswith("processor")]),
          "python": platform.python_version(), "commit": commit.strip(), "date": time.strftime("%Y-%m-%d %H:%M")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cite-source", type=pathlib.Path)
  parser.add_argument("--multiome-source", type=pathlib.Path)
  parser.add_argument("--atlas-dir", type=pathlib.Path, default=pathlib.Path("/tmp/atlases"))
  parser.add_argument("--scratch", type=pathlib.Path, default=pathlib.Path("/tmp/bench_atlas"))
  parser.add_argument("--cases", default="cite:100000")
  parser.add_argument("--storages", default="memory,disk")
  parser.add_argument("--reference-python", default="")
  parser.add_argument("--epochs", type=int, default=1, help="epochs of each clue_jax run (later ones: no compiling)")
  parser.add_argument("--timeout", type=float, default=3600, help="seconds after which a run is stopped (SIGKILL)")
  parser.add_argument("--out", type=pathlib.Path, default=ROOT / "experiments" / "results" / "atlas.jsonl")
  parser.add_argument("--table", action="store_true", help="print the table and draw the PNG from --out, then stop")
  args = parser.parse_args()
  if args.table:
    return report(args.out)
  args.scratch.mkdir(parents=True, exist_ok=True)
  machine = host()
  for case in args.cases.split(","):
    kind, cells = case.split(":")
    cells = int(cells)
    source = args.cite_source if kind == "cite" else args.multiome_source
    data = atlas(kind, cells, source, args.atlas_dir)
    runs = [lambda s=s: clue_run(kind, cells, data, s, args.scratch, args.scratch, args.timeout, args.epochs)
            for s in args.storages.split(",") if s]
    if args.reference_python:
      runs.append(lambda: reference_run(kind, cells, data, args.reference_python, args.scratch, args.scratch,
                                        args.timeout))
    for run in runs:
      result = {"kind": kind, "cells": cells, **run(), "host": machine}
      print(json.dumps(result), flush=True)
      with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")


def report(path: pathlib.Path):
  """The Markdown table of every run in `path` and a PNG beside it (peak RSS and wall time against cells)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  print("| data | cells | implementation | end to end | peak RSS | read + preprocess | epoch (cells/s) | "
        "encode + write | outcome | commit |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in runs:
    name = r["implementation"] + (f" ({r['storage']})" if "storage" in r else "")
    stages = r.get("stages", {})
    prep = sum(v["seconds"] for k, v in stages.items() if k.split("_")[0] in ("read", "fit", "arrays"))
    epoch = stages.get("epoch", {}).get("seconds")
    encode = stages.get("encode_write", {}).get("seconds")
    ok = r["returncode"] == 0
    if "reference" in r:
      ref = r["reference"]
      prep = sum(ref["stages"][k]["seconds"] for k in ("read", "preprocess") if k in ref.get("stages", {}))
      epoch = ref.get("stages", {}).get("fit", {}).get("seconds")
      encode = ref.get("stages", {}).get("encode", {}).get("seconds")
      ok = ok and not ref.get("failed_stage")
      stage = ref.get("failed_stage") or ref.get("running_stage")
      error = ref.get("error") or f"exit {r['returncode']}"
      outcome = "completed" if ok else f"failed in {stage}: {error[:80]}"
    else:
      outcome = "completed" if ok else f"exit {r['returncode']}"
    rate = r.get("cells_per_s") or (r.get("reference", {}).get("cells_per_s"))
    later = "".join(f"; then {v:,.0f}" for v in r.get("later_epochs_cells_per_s", []))
    print(f"| {r['kind']} | {r['cells']:,} | {name} | {r['wall_s'] / 60:.1f} min | {r['peak_rss_gb']:.2f} GB | "
          f"{prep:.0f} s | {'' if epoch is None else f'{epoch:.0f} s'}"
          f"{'' if rate is None else f' ({rate:,.0f}{later})'} | "
          f"{'' if encode is None else f'{encode:.0f} s'} | {outcome} | {r['host']['commit']} |")
  figure, (memory, wall) = plt.subplots(1, 2, figsize=(10, 4))
  for key in sorted({(r["kind"], r["implementation"], r.get("storage", "")) for r in runs}):
    chosen = sorted((r for r in runs if (r["kind"], r["implementation"], r.get("storage", "")) == key),
                    key=lambda r: r["cells"])
    label = f"{key[0]}: {key[1]}" + (f" ({key[2]})" if key[2] else "")
    style = "o-" if all(r["returncode"] == 0 and not r.get("reference", {}).get("failed_stage") for r in chosen) \
        else "x--"
    memory.plot([r["cells"] for r in chosen], [r["peak_rss_gb"] for r in chosen], style, label=label)
    wall.plot([r["cells"] for r in chosen], [r["wall_s"] / 60 for r in chosen], style, label=label)
  for axis, title in ((memory, "peak RSS (GB)"), (wall, "end to end, one epoch (min)")):
    axis.set_xscale("log")
    axis.set_xlabel("cells")
    axis.set_title(title)
    axis.grid(alpha=0.3)
  memory.axhline(8, color="grey", lw=0.8, ls=":")
  memory.legend(fontsize=7)
  figure.tight_layout()
  figure.savefig(path.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
  main()
