"""Where the train step's time goes on this machine: the share of its XLA thunks that multiply matrices, that are
element-wise, and the rest, at any batch size.

  taskset -c 0 python experiments/profile_step.py [--batch-size 2048] [--cells 16384] [--matmul-dtype float32]

Builds the benchmark's model and data (`bench_throughput.py`: reference preset shape, library-default model, one
device), runs the compiled train chunk once under `jax.profiler.trace`, and sums the duration of every leaf thunk of
the compiled program (loops and conditionals, which contain others, are not counted twice). A thunk is "matmul"
when it is a dot or a fusion whose computation holds a dot or a convolution (XLA:CPU fuses some products with their
element-wise neighbours, so such a fusion's time counts as matmul), "element-wise" when it is any other fusion, and
"other" otherwise (copies, sorts, random bits, scatters...). Run it on one core (`taskset -c 0`) so that thunks do
not overlap; prints JSON with the shares, the ten slowest thunks and the FLOP rate of the step against the measured
matmul rate.
"""

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

import jax

import bench_throughput

CONTAINERS = ("while", "conditional", "call")


def fused_with_products(hlo_text: str) -> set:
  """Names of the fusion instructions of `hlo_text` whose fused computation (or one it calls) holds a dot."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      current = computations.setdefault(header.group(1), [])
    elif current is not None:
      current.append(line)

  def has_product(name, seen=()):
    body = computations.get(name, [])
    if any(re.search(r"\b(dot|convolution)\(", line) for line in body):
      return True
    called = [c for line in body for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)]
    return any(has_product(c, seen + (name,)) for c in called if c not in seen)

  out = set()
  for body in computations.values():
    for line in body:
      match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .* fusion\(.*calls=%?([\w.\-]+)", line)
      if match and has_product(match.group(2)):
        out.add(match.group(1))
  return out


def thunk_times(trace_dir: pathlib.Path, module_prefix: str = "jit_chunk") -> collections.Counter:
  """Total microseconds per HLO op of the compiled chunk in the newest perfetto trace under `trace_dir`."""
  path = sorted(glob.glob(str(trace_dir / "**" / "perfetto_trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  out = collections.Counter()
  for event in events:
    args = event.get("args") or {}
    if event.get("ph") == "X" and str(args.get("hlo_module", "")).startswith(module_prefix) and "hlo_op" in args:
      out[args["hlo_op"]] += float(event.get("dur", 0.0))
  return out


def kind_of(op: str, products: set) -> str:
  if op.split(".")[0] in CONTAINERS:
    return "container"
  if op.split(".")[0] == "dot" or op in products:
    return "matmul"
  return "element-wise" if "fusion" in op else "other"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cells", type=int, default=16384)
  parser.add_argument("--batch-size", type=int, default=2048)
  parser.add_argument("--steps-per-dispatch", type=int, default=8)
  parser.add_argument("--preset", choices=["defaults", "competition_cite"], default="defaults")
  parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n products timed for the matmul rate")
  args = parser.parse_args()
  args.devices, args.host_data = 1, False
  with tempfile.TemporaryDirectory() as tmp:
    config = bench_throughput.bench_config(bench_throughput.synthetic_files(pathlib.Path(tmp), args.cells), args)
    timers = bench_throughput.Timers(config, epochs=1)
    hlo = timers.train_chunk.lower(timers.state, timers.device_chunk, timers.dispatch_steps,
                                   *timers.inputs).compile().as_text()
    products = fused_with_products(hlo)
    timers.steps()  # Warm.
    started = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      timers.state, _ = timers.train_chunk(timers.state, timers.device_chunk, timers.dispatch_steps, *timers.inputs)
      jax.block_until_ready(timers.state)
    traced_s = time.perf_counter() - started
    times = thunk_times(pathlib.Path(tmp))
  shares = collections.Counter()
  for op, microseconds in times.items():
    shares[kind_of(op, products)] += microseconds
  del shares["container"]
  busy = sum(shares.values())
  n_steps = timers.per_dispatch
  step_s = timers.batch_size / timers.steps()  # steps() is cells/s.
  matmul_rate = bench_throughput.matmul_flops(args.matmul_size)
  print(json.dumps({
      "batch_size": timers.batch_size, "steps_traced": n_steps, "thunks": len(times),
      "thunk_ms_per_step": busy / 1e3 / n_steps, "step_ms_untraced": step_s * 1e3,
      "traced_s": traced_s,
      "shares": {k: v / busy for k, v in sorted(shares.items())},
      "slowest": [[op, kind_of(op, products), round(t / busy, 4)] for op, t in times.most_common(40)
                  if kind_of(op, products) != "container"][:10],
      "flops_per_step": timers.flops_per_cell * timers.batch_size,
      "matmul_gflops_measured": matmul_rate / 1e9,
      "step_fraction_of_matmul_rate": timers.flops_per_cell * timers.batch_size / step_s / matmul_rate,
  }, indent=2))


if __name__ == "__main__":
  sys.exit(main())
