"""experiments/gpu_check.sh --small runs every part on the CPU and writes what the GPU session will read: the
throughput of each matmul dtype (one batch size here, three on the GPU), the profile, the atlas epoch and
summary.md."""

import itertools
import json
import os
import pathlib
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A guard against a hung script, not a speed check: each of its jax processes (2 throughput cases, the profile, the
# atlas) imports, traces and compiles its own program, about 45 s in all on a 2-core machine.
TIMEOUT_S = 900


def test_gpu_check_small(tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             # The test session's persistent compilation cache; XLA's backend optimisations off (the compiled
             # programs' speed is not what is checked): every part starts a process that compiles its own step.
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(jax.config.jax_persistent_cache_min_compile_time_secs),
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  done = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_check.sh"), "--small", "--out", str(out)], env=env,
                        capture_output=True, text=True, timeout=TIMEOUT_S)
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

  status = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines()]
  assert [s[1] for s in status] == ["ok"] * 6

  cases = json.loads((out / "throughput.json").read_text())["cases"]
  assert sorted((c["matmul_dtype"], c["batch_size"]) for c in cases) == sorted(
      itertools.product(("float32", "bfloat16"), (32,)))
  for c in cases:
    assert c["step_cells_per_s"] > 0 and c["loop_cells_per_s"] > 0 and c["flops_per_cell"] > 1e6
    assert 0 < c["fraction_of_matmul_peak"] and c["peak_bytes_in_use"] is None  # CPU devices keep no memory stats.
    assert (c["matmul_dtype"] == "bfloat16") == (c.get("fraction_of_bf16_matmul_peak", 0) > 0)
    assert (out / "throughput" / f"{c['matmul_dtype']}_{c['batch_size']}.json").is_file()

  atlas = json.loads((out / "atlas.json").read_text())
  assert atlas["cells"] == 3000 and atlas["source_cells"] == 600 and atlas["data_on_device"]
  assert atlas["epoch"]["epoch"] == 1 and atlas["epoch"]["time/cells_per_s"] > 0
  stages = [s["stage"] for s in atlas["stages"]]
  assert "rna: PCA fitted on 2,700 training cells" in stages and "embeddings encoded and written" in stages

  profile = json.loads((out / "profile.json").read_text())
  assert profile["batch_size"] == 32 and abs(sum(profile["shares"].values()) - 1) < 1e-6 and profile["slowest"]

  summary = (out / "summary.md").read_text()
  assert "| 32 | bfloat16 |" in summary and "3,000 cells resampled from 600 cells" in summary
  assert "## Profile of the train step (batch 32)" in summary
  for part in ("throughput_float32_32", "profile", "atlas_make", "atlas_train"):
    assert (out / "logs" / f"{part}.log").is_file() and f"| {part} | ok |" in summary
