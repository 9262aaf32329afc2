"""The Python side of experiments/gpu_check.sh (see its header): one measurement with the device's peak memory, the
embedded CITE starter as a paired .h5mu, and the summary of whatever parts have finished.

  python experiments/gpu_check.py measure OUT.json SCRIPT [ARGS...]
  python experiments/gpu_check.py starter-h5mu OUT.h5mu
  python experiments/gpu_check.py summary OUT_DIR MODE ATLAS_RUN_DIR

`measure` runs the experiment SCRIPT (bench_throughput.py, profile_step.py) in this process, its output passed
through, and writes the JSON it prints to OUT.json with `argv` and the device's `peak_bytes_in_use` (jax's
`memory_stats()`; null where the device has none, as on CPU) added: one process per measurement, so the peak is its
own. `summary` reads OUT_DIR/status.tsv (written by the shell script: part, outcome, seconds, time limit), the JSONs
and logs, writes throughput.json (every case), atlas.json (the 1M-cell epoch: its stage lines and metrics.jsonl
record from ATLAS_RUN_DIR) and summary.md; it imports nothing heavy, so that it can run after every part.
"""

import contextlib
import io
import json
import pathlib
import re
import runpy
import sys

STAGE = re.compile(r"^clue_jax: (.+) in ([\d.]+) s$")
MADE = re.compile(r"^([\d,]+) cells in \d+ batches, resampled from ([\d,]+) cells of (.+)$")
GIB = 2 ** 30


class Tee(io.StringIO):
  """Keeps what is written and passes it on to the real stdout as it comes (the log sees progress live)."""

  def write(self, text):
    sys.__stdout__.write(text)
    return super().write(text)

  def flush(self):
    sys.__stdout__.flush()


def measure(out: pathlib.Path, script: str, args: list):
  import jax
  sys.argv = [script, *args]
  sys.path.insert(0, str(pathlib.Path(script).resolve().parent))  # As `python SCRIPT` would: its sibling modules.
  captured = Tee()
  with contextlib.redirect_stdout(captured):
    try:
      runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
      if e.code not in (None, 0):
        raise
  printed = re.search(r"^\{.*^\}", captured.getvalue(), re.M | re.S)  # The JSON: after any log lines.
  result = json.loads(printed.group(0))
  stats = jax.local_devices()[0].memory_stats()
  result["peak_bytes_in_use"] = stats.get("peak_bytes_in_use") if stats else None
  result["argv"] = args
  out.write_text(json.dumps(result, indent=2) + "\n")


def starter_h5mu(out: pathlib.Path):
  """The embedded BMMC CITE starter (600 cells; raw counts of layers["counts"] as X) as an .h5mu of mod/rna and
  mod/adt, the source format of make_atlas.py."""
  import anndata as ad
  import h5py
  from clue_jax import config as config_lib
  with h5py.File(out, "w") as f:
    mods = f.create_group("mod")
    for name in ("rna", "adt"):
      adata = ad.read_h5ad(config_lib.DATASETS / "bmmc_cite_starter" / f"{name}.h5ad")
      ad.io.write_elem(mods, name, ad.AnnData(X=adata.layers["counts"], obs=adata.obs[["cell_type", "batch"]],
                                              var=adata.var[[]]))


def flag(argv: list, name: str, default=None):
  return argv[argv.index(name) + 1] if name in argv else default


def read_json(path: pathlib.Path):
  return json.loads(path.read_text()) if path.is_file() else None


def throughput(out_dir: pathlib.Path) -> list:
  cases = [read_json(p) for p in sorted((out_dir / "throughput").glob("*.json"))]
  for case in cases:
    case["batch_size"] = int(flag(case["argv"], "--batch-size"))
    case["matmul_dtype"] = flag(case["argv"], "--matmul-dtype", "float32")
    case["cells"] = int(flag(case["argv"], "--cells"))
  return sorted(cases, key=lambda c: (c["matmul_dtype"] != "float32", c["batch_size"]))


def atlas(out_dir: pathlib.Path, run_dir: pathlib.Path) -> dict:
  """The atlas: its size and source (make_atlas.py's log), the trainer's stage lines and its epoch record."""
  record = {}
  make_log, train_log = out_dir / "logs" / "atlas_make.log", out_dir / "logs" / "atlas_train.log"
  for line in make_log.read_text().splitlines() if make_log.is_file() else []:
    made = MADE.match(line)
    if made:
      record.update(cells=int(made.group(1).replace(",", "")), source_cells=int(made.group(2).replace(",", "")),
                    source=made.group(3))
  lines = train_log.read_text().splitlines() if train_log.is_file() else []
  record["stages"] = [{"stage": m.group(1), "seconds": float(m.group(2))} for m in map(STAGE.match, lines) if m]
  record["data_on_device"] = any(s["stage"] == "training data put on the devices" for s in record["stages"])
  metrics = run_dir / "metrics.jsonl"
  epochs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
  record["epoch"] = epochs[0] if epochs else None
  return record


def percent(value) -> str:
  return "" if value is None else f"{100 * value:.1f}"


def summary(out_dir: pathlib.Path, mode: str, run_dir: pathlib.Path):
  status = [line.split("\t") for line in (out_dir / "status.tsv").read_text().splitlines() if line.strip()]
  cases = throughput(out_dir)
  device = cases[0]["device"] if cases else "unknown (no throughput case finished)"
  if cases:
    (out_dir / "throughput.json").write_text(json.dumps({"device": device, "cases": cases}, indent=2) + "\n")
  record = atlas(out_dir, run_dir)
  if "cells" in record:
    (out_dir / "atlas.json").write_text(json.dumps(record, indent=2) + "\n")
  md = [f"# GPU check ({mode} mode)", "", f"Device: {device}; {sum(float(s[2]) for s in status):.0f} s of parts.", "",
        "| part | outcome | seconds | limit (s) |", "|---|---|---|---|"]
  md += [f"| {name} | {outcome} | {seconds} | {limit} |" for name, outcome, seconds, limit in status]
  md += ["", "## Training throughput (one device; compilation excluded)", "",
         "| batch | matmul | train step cells/s | epoch loop cells/s | % of f32 matmul FLOP/s "
         "| % of bf16 matmul FLOP/s | peak device memory (GiB) |", "|---|---|---|---|---|---|---|"]
  for c in cases:
    peak = "" if c["peak_bytes_in_use"] is None else f"{c['peak_bytes_in_use'] / GIB:.2f}"
    md.append(f"| {c['batch_size']:,} | {c['matmul_dtype']} | {c['step_cells_per_s']:,.0f} | "
              f"{c['loop_cells_per_s']:,.0f} | {percent(c['fraction_of_matmul_peak'])} | "
              f"{percent(c.get('fraction_of_bf16_matmul_peak'))} | {peak} |")
  if cases:
    f32 = ", ".join(f"{c['matmul_gflops']:,.0f}" for c in cases)
    bf16 = ", ".join(f"{c['bf16_matmul_gflops']:,.0f}" for c in cases if "bf16_matmul_gflops" in c)
    md += ["", f"Model FLOPs per training cell: {cases[0]['flops_per_cell'] / 1e6:.1f} M. Matmul GFLOP/s measured in "
           f"each case: float32 {f32}" + (f"; bfloat16 {bf16}" if bf16 else "") + "."]
  md += ["", "## Atlas epoch (python -m clue_jax.train, configs/cite.py, data on the device)", ""]
  if "cells" not in record:
    md.append("No atlas (see the parts above).")
  else:
    md.append(f"{record['cells']:,} cells resampled from {record['source_cells']:,} cells of {record['source']}.")
    if record["epoch"]:
      md.append(f"Epoch 1 (its compilation included): {record['epoch']['time/epoch_s']:.1f} s, "
                f"{record['epoch']['time/cells_per_s']:,.0f} training cells/s.")
    md += ["", "| stage | seconds |", "|---|---|"]
    md += [f"| {s['stage']} | {s['seconds']:.1f} |" for s in record["stages"]]
  profile = read_json(out_dir / "profile.json")
  if profile:
    md += ["", f"## Profile of the train step (batch {profile['batch_size']:,})", "",
           f"{profile['thunk_ms_per_step']:.2f} ms per step in traced thunks, {profile['step_ms_untraced']:.2f} ms "
           f"untraced; {percent(profile['step_fraction_of_matmul_rate'])} % of the matmul rate; shares: "
           + ", ".join(f"{k} {percent(v)} %" for k, v in profile["shares"].items()) + ".", "",
           "| slowest thunks | kind | share |", "|---|---|---|"]
    md += [f"| `{op}` | {kind} | {percent(share)} % |" for op, kind, share in profile["slowest"][:5]]
  (out_dir / "summary.md").write_text("\n".join(md) + "\n")


def main():
  command, *args = sys.argv[1:]
  if command == "measure":
    measure(pathlib.Path(args[0]), args[1], args[2:])
  elif command == "starter-h5mu":
    starter_h5mu(pathlib.Path(args[0]))
  elif command == "summary":
    summary(pathlib.Path(args[0]), args[1], pathlib.Path(args[2]))
  else:
    sys.exit(f"unknown command {command!r}: measure, starter-h5mu or summary")


if __name__ == "__main__":
  main()
