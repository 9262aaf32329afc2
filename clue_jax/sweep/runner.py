"""Running a sweep: every grid point checked first, then trained as its own `python -m clue_jax.train` process by a
launcher (here `Local`: subprocesses of this process; `slurm.Slurm`: SLURM jobs), finished points skipped, the summary
rewritten after each point."""

import concurrent.futures
import dataclasses
import inspect
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import ml_collections

from clue_jax import config as config_lib
from clue_jax.sweep import grid, report


COMPILE_CACHE = ".jax_cache"  # Under WORKDIR, shared by the points unless JAX_COMPILATION_CACHE_DIR is set.
QUIET = {"train.progress": False}  # Passed to every run unless its point sets it: no progress bar in the logs.


@dataclasses.dataclass(frozen=True)
class Point:
  name: str
  setting: str
  overrides: dict  # With the config's types (an int given for a float field is a float here).
  config: ml_collections.ConfigDict  # The config the run gets: base, QUIET and the overrides.


def load_grid(spec: str) -> list[Point]:
  """The points of the config file's grid, every one checked as the command line checks overrides."""
  path, arguments = config_lib.split_spec(spec)
  module = config_lib.load_module(path)
  if not hasattr(module, "get_sweep"):
    raise grid.GridError(f"{path} defines no get_sweep(); add one returning a list of override dicts "
                         f"(see clue_jax/sweep/grid.py)")
  # get_sweep takes the config file's argument too when it has a parameter for it (`configs/plus/sweep.py:cite`).
  takes_argument = bool(inspect.signature(module.get_sweep).parameters)
  base, points = module.get_config(*arguments), module.get_sweep(*(arguments if takes_argument else ()))
  grid.check_points(points, str(path))
  names = grid.run_names(points)
  configs = []
  for i, (point, name) in enumerate(zip(points, names)):
    try:
      configs.append(config_lib.apply_overrides(base, QUIET | point))
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{path}: get_sweep() point {i} ({name}): {e}") from None
  typed = [{key: _get(config, key) for key in point} for point, config in zip(points, configs)]
  grid.check_distinct(typed, str(path))
  return [Point(name, setting, overrides, config) for name, setting, overrides, config
          in zip(grid.run_names(typed), grid.setting_names(typed), typed, configs)]


def _get(config: ml_collections.ConfigDict, key: str):
  for part in key.split("."):
    config = config[part]
  return config


def is_finished(point: Point, run_dir: pathlib.Path) -> bool:
  """Whether `run_dir` holds this point's finished run (a run with another config is left to the trainer to refuse)."""
  if not (run_dir / "summary.json").exists() or not (run_dir / "config.json").exists():
    return False
  return config_lib.same_config(json.loads((run_dir / "config.json").read_text()), point.config.to_dict())


def command_line_value(value) -> str:
  """The text that `--config.KEY=` parses back to `value`."""
  if isinstance(value, bool):
    return str(value).lower()
  return repr(value) if isinstance(value, float) else str(value)


def train_command(spec: str, point: Point, run_dir: pathlib.Path) -> list[str]:
  path, arguments = config_lib.split_spec(spec)
  config_flag = ":".join([str(path.resolve()), *arguments])
  return [sys.executable, "-m", "clue_jax.train", f"--config={config_flag}", f"--workdir={run_dir}",
          *(f"--config.{key}={command_line_value(value)}" for key, value in (QUIET | point.overrides).items())]


def run_point(spec: str, point: Point, workdir: pathlib.Path) -> report.Result:
  """Trains one point in WORKDIR/<name> (resuming what that directory holds) and reports how it ended.

  Runs where it is called: in the sweep's process (local launcher) or in the point's SLURM job, with that process's
  environment plus the sweep's compile cache.
  """
  run_dir = (workdir / point.name).resolve()
  run_dir.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str((workdir / COMPILE_CACHE).resolve()))
  resumed = (run_dir / "checkpoints" / "latest").exists()
  command = train_command(spec, point, run_dir)
  started = time.time()
  with open(run_dir / "stdout.log", "a") as out, open(run_dir / "stderr.log", "a") as err:
    out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n")
    out.flush()
    error_offset = err.tell()
    returncode = subprocess.run(command, stdout=out, stderr=err, env=env).returncode
  result = report.Result(point.name, point.setting, point.overrides, action="resumed" if resumed else "trained",
                         wall_s=time.time() - started)
  if returncode == 0 and (run_dir / "summary.json").exists():
    result.status = "done"
  else:
    result.status, result.error = "failed", last_error(run_dir / "stderr.log", error_offset, returncode)
  return result


def last_error(stderr_log: pathlib.Path, offset: int, returncode: int) -> str:
  """The last line this attempt wrote to stderr, without the trainer's "error: " prefix."""
  with open(stderr_log) as f:
    f.seek(offset)
    lines = [line.strip() for line in f.read().splitlines() if line.strip()]
  if not lines:
    return f"exit status {returncode}, nothing on stderr"
  return lines[-1].removeprefix("error: ")


class Local:
  """The default launcher: points trained as subprocesses of this process, `parallel` at a time."""

  def __init__(self, parallel: int = 1):
    self.parallel = parallel

  def describe(self, count: int) -> str:
    return f"training {count}, {self.parallel} at a time"

  def run(self, spec: str, workdir: pathlib.Path, points: dict[int, Point], finished):
    """Trains `points` (grid index -> point), calling `finished(index, result)` as each one ends."""
    def run(i):
      finished(i, run_point(spec, points[i], workdir))

    with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
      for future in [pool.submit(run, i) for i in points]:
        future.result()


def plan(spec: str, workdir: pathlib.Path) -> tuple[list[Point], list[report.Result]]:
  """The grid's points and their results so far: finished points done ("skipped"), the others pending."""
  points = load_grid(spec)
  results = [report.Result(p.name, p.setting, p.overrides) for p in points]
  for point, result in zip(points, results):
    if is_finished(point, workdir / point.name):
      result.status, result.action = "done", "skipped"
  return points, results


def run_sweep(spec: str, workdir: pathlib.Path, launcher, log=print) -> list[report.Result]:
  """Runs the grid of `spec` under `workdir` with `launcher` (`Local` or `slurm.Slurm`); returns one result per
  point, in grid order. The summaries are rewritten before the first point and after each one."""
  points, results = plan(spec, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  todo = {i: point for i, (point, result) in enumerate(zip(points, results)) if result.status == "pending"}
  log(f"{len(points)} points, {len(points) - len(todo)} already finished; {launcher.describe(len(todo))}")
  lock = threading.Lock()
  report.write(workdir, spec, results)

  def finished(i: int, result: report.Result):
    with lock:
      results[i] = result
      report.write(workdir, spec, results)
      ended = sum(r.status != "pending" for r in results)
      wall = "" if result.wall_s is None else f", {result.wall_s:.0f} s"
      log(f"[{ended}/{len(points)}] {result.name}: {result.status} ({result.action}{wall})"
          + (f": {result.error}" if result.error else ""))

  if todo:
    launcher.run(spec, workdir, todo, finished)
  return results


def write_report(spec: str, workdir: pathlib.Path) -> list[report.Result]:
  """The summaries of what `workdir` holds now, training nothing (unfinished points are pending)."""
  _, results = plan(spec, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  report.write(workdir, spec, results)
  return results
