"""On a real SLURM (one node on this machine, started by .ci/slurm_up.sh): a sweep of 2 points submitted as SLURM jobs
gives the summary `--launcher=local` gives on the same grid; a point whose job is cancelled (`scancel`) while it runs
is all that the sweep, submitted again, trains; and `srun -N 1 -n 2` of a point's own command
(`python -m clue_jax.train ...`, no extra flag) joins its two tasks through jax.distributed and trains the model one
process trains (the local sweep's point).

The points are configs/smoke.py at 2 epochs with XLA's optimisations off, as in test_multihost.py: the two tasks of the
srun step cannot use the compilation cache (`parallel.initialize`), so compiling is most of their time. Skipped,
saying why, where no SLURM node is up.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import pytest

from clue_jax.sweep import runner, slurm
from test_invariance import assert_same_model
from test_multihost import gloo_available, model_and_record

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 300  # Seconds, for each command.


def slurm_missing() -> str:
  """Why the tests cannot run here; "" when a SLURM node is up."""
  try:
    listed = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"no SLURM here ({e}); .ci/slurm_up.sh installs and starts a one-node SLURM (it needs root and apt-get)"
  if not set(listed.stdout.split()) & {"idle", "mix", "alloc"}:
    return (f"no SLURM node up (sinfo: {(listed.stdout + listed.stderr).strip() or 'nothing'}); .ci/slurm_up.sh "
            f"starts one")
  return ""


MISSING = slurm_missing()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(MISSING), reason=MISSING)]


def environment(devices: int) -> dict:
  """The commands' environment (SLURM passes it on to the jobs): CPU, `devices` devices, this session's cache."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  for key in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs"):
    env[key.upper()] = str(getattr(jax.config, key))
  return env


def write_grid(directory: pathlib.Path) -> pathlib.Path:
  path = directory / "grid.py"
  path.write_text(
      "from clue_jax import config as config_lib\n"
      "from clue_jax.sweep import grid\n"
      f"SMOKE = config_lib.load_module({str(ROOT / 'configs' / 'smoke.py')!r})\n"
      "def get_config():\n"
      "  config = SMOKE.get_config()\n"
      "  config.train.update(max_epochs=2, steps_per_dispatch=3)\n"
      "  return config\n"
      "def get_sweep():\n"
      "  return grid.axis('seed', [0, 1])\n")
  return path


def sweep(spec: pathlib.Path, workdir: pathlib.Path, *flags) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "clue_jax.sweep", f"--config={spec}", f"--workdir={workdir}", *flags],
                          cwd=ROOT, env=environment(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple:
  """(exit status, stdout, stderr) of a sweep."""
  out, err = process.communicate(timeout=TIMEOUT)
  return process.returncode, out, err


def cancel_once_running(workdir: pathlib.Path, name: str, process: subprocess.Popen) -> str:
  """`scancel`s the job of point `name` as soon as it runs (its stdout.log begun: seconds before its first
  checkpoint); returns the job id."""
  jobs, log = workdir / slurm.FOLDER / slurm.JOBS, workdir / name / "stdout.log"
  deadline = time.monotonic() + TIMEOUT
  while not (jobs.exists() and log.exists()):
    assert process.poll() is None and time.monotonic() < deadline, "the sweep ended before the point's job ran"
    time.sleep(0.05)
  job = json.loads(jobs.read_text())[name]
  subprocess.run(["scancel", job], check=True)
  return job


def summary(workdir: pathlib.Path) -> dict:
  with open(workdir / "summary.csv") as f:
    return {row["name"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Everything the tests read. The srun pair (point 0's command) trains while the local sweep and then the SLURM
  sweep (one point cancelled, then submitted again) run one point after the other: the first point compiles, the
  others find its programs in the compilation cache."""
  tmp = tmp_path_factory.mktemp("slurm")
  spec = write_grid(tmp)
  points = runner.load_grid(str(spec))
  on_slurm, local, pair = tmp / "on_slurm", tmp / "local", tmp / "pair"
  out = {"points": points, "on_slurm": on_slurm, "local": local, "pair": pair}
  srun = None
  if gloo_available():
    srun = subprocess.Popen(["srun", "-N", "1", "-n", "2", *runner.train_command(str(spec), points[0], pair)],
                            cwd=ROOT, env=environment(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    out["local_sweep"] = finish(sweep(spec, local))
    first = sweep(spec, on_slurm, "--launcher=slurm")
    out["cancelled"] = cancel_once_running(on_slurm, points[1].name, first)
    out["first"], out["first_summary"] = finish(first), summary(on_slurm)
    out["point0_log"] = (on_slurm / points[0].name / "stdout.log").read_text()
    out["again"] = finish(sweep(spec, on_slurm, "--launcher=slurm", "--slurm_array_cap=1"))
  finally:
    if srun is not None:
      out["pair_run"] = finish(srun)
  return out


def test_a_sweep_of_slurm_jobs_gives_the_local_summary(runs):
  assert runs["again"][0] == 0 and runs["local_sweep"][0] == 0, runs["again"][2] + runs["local_sweep"][2]
  on_slurm, local = summary(runs["on_slurm"]), summary(runs["local"])
  assert list(on_slurm) == list(local) == [p.name for p in runs["points"]]
  for name in local:
    same = {k: v for k, v in local[name].items() if k not in ("action", "wall_s")}
    assert {k: on_slurm[name][k] for k in same} == same, name  # Metrics as written: the same numbers, bit for bit.
    assert local[name]["status"] == "done" and float(local[name]["heldout_foscttm"]) > 0


def test_a_resubmitted_sweep_trains_only_the_cancelled_point(runs):
  seed0, seed1 = (p.name for p in runs["points"])
  status, out, err = runs["first"]
  assert status == 1 and "1 of 2 points failed" in err, out + err
  first = runs["first_summary"]
  assert (first[seed0]["status"], first[seed1]["status"]) == ("done", "failed")
  assert first[seed1]["error"].startswith(f"SLURM job {runs['cancelled']} ended CANCELLED before the point finished")
  status, out, err = runs["again"]
  assert "2 points, 1 already finished; running 1 as SLURM jobs" in out and "submitted 1 point as" in out, out + err
  again = summary(runs["on_slurm"])
  assert (again[seed0]["action"], again[seed1]["action"]) == ("skipped", "trained")  # Cancelled before a checkpoint.
  assert (runs["on_slurm"] / seed0 / "stdout.log").read_text() == runs["point0_log"], "point 0 ran again"
  assert (runs["on_slurm"] / seed1 / "stdout.log").read_text().count("\n== ") == 1, "one start, then one more"


@pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives for the two CPU tasks")
def test_srun_of_a_points_command_trains_the_model_of_one_process(runs):
  status, out, err = runs["pair_run"]
  assert status == 0, (out + err)[-4000:]
  assert "clue_jax: joined 2 processes, 4 cpu devices in all (jax.distributed)" in out, out
  assert out.count("done: 2 epochs") == 1, "only process 0 reports"
  pair, single = runs["pair"], runs["local"] / runs["points"][0].name
  assert [json.loads(line)["epoch"] for line in (pair / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  assert len(list((pair / "tb").iterdir())) == 1  # Process 0's event file only.
  assert_same_model(*model_and_record(single), *model_and_record(pair))
