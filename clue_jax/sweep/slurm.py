"""The SLURM launcher of `python -m clue_jax.sweep --launcher=slurm`: the points to train submitted through submitit as
one job array, each task running `runner.run_point` (the point's `python -m clue_jax.train`) on a node, then watched
with `squeue` until every one has ended. submitit's own watching asks `sacct`, which needs SLURM's accounting
database; `squeue` works on every cluster (the tests' one-node SLURM has no database).

submitit's scripts, pickles and logs, and the job id of each point, are kept in WORKDIR/.slurm: a sweep started again
while jobs of an earlier start are still queued or running waits for those instead of submitting their points twice.
"""

import dataclasses
import json
import pathlib
import subprocess
import time

import submitit
from submitit.core import utils as submitit_utils

from clue_jax import outputs
from clue_jax.sweep import report, runner

FOLDER = ".slurm"  # Under WORKDIR.
JOBS = "jobs.json"  # In FOLDER: {point name: SLURM job id} of the latest submission of each point.
# squeue states of jobs that have ended; every other listed state is a job still queued or running.
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}
GONE = "GONE"  # No longer listed by squeue (SLURM forgets ended jobs after its MinJobAge, 300 s by default).
GRACE_S = 15.0  # How long a completed job's result file may take to appear (shared file systems lag).


class SlurmError(RuntimeError):
  """No SLURM to submit to, or sbatch refused the jobs; the message says which."""


@dataclasses.dataclass(frozen=True)
class Resources:
  """What each point's job asks SLURM for."""
  partition: str = ""  # "": the cluster's default partition.
  time_min: int = 60  # The time limit of each point's job.
  cpus: int = 1
  gpus: int = 0
  array_cap: int = 0  # At most this many points running at once (the job array's %N); 0: no cap.
  options: tuple = ()  # More sbatch options as "KEY=VALUE" or "KEY" (account=proj, qos=short, exclusive).

  def parameters(self, name: str, count: int) -> dict:
    """submitit.SlurmExecutor's parameters for `count` points."""
    extra = {}
    for option in self.options:
      key, _, value = option.partition("=")
      extra[key.strip().removeprefix("--")] = value if value else True
    return {"job_name": name, "time": self.time_min, "cpus_per_task": self.cpus,
            "array_parallelism": self.array_cap or count, "wckey": None,
            **({"partition": self.partition} if self.partition else {}),
            **({"gpus_per_node": self.gpus} if self.gpus else {}),
            **({"additional_parameters": extra} if extra else {})}


def queue_states() -> dict[str, str] | None:
  """The state of each of this user's jobs that SLURM lists (array tasks one by one, as `ARRAYID_TASK`); None when
  squeue fails."""
  try:
    listed = subprocess.run(["squeue", "--me", "--noheader", "--array", "--states=all", "--format=%i %T"],
                            capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if listed.returncode:
    return None
  return dict(line.split()[:2] for line in listed.stdout.splitlines() if len(line.split()) >= 2)


def active(state: str | None) -> bool:
  return state is not None and state != GONE and state not in ENDED


class Slurm:
  """Points as jobs of one SLURM job array (resources per point), watched with squeue from this process."""

  def __init__(self, resources: Resources, log=print):
    self.resources, self.log = resources, log

  def describe(self, count: int) -> str:
    return f"running {count} as SLURM jobs"

  def run(self, spec: str, workdir: pathlib.Path, points: dict[int, runner.Point], finished):
    """Submits `points` (grid index -> point), or waits for their jobs still in the queue from an earlier start;
    calls `finished(index, result)` as each job ends."""
    workdir = workdir.resolve()
    folder = workdir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    recorded = json.loads((folder / JOBS).read_text()) if (folder / JOBS).exists() else {}
    states = queue_states() or {}
    jobs = {i: submitit.SlurmJob(folder, recorded[p.name]) for i, p in points.items()
            if active(states.get(recorded.get(p.name)))}
    if jobs:
      self.log(f"{len(jobs)} point{'s' * (len(jobs) != 1)} still queued or running from an earlier start (jobs "
               f"{', '.join(job.job_id for job in jobs.values())}); waiting for them")
    new = {i: p for i, p in points.items() if i not in jobs}
    resumed = {i: (workdir / p.name / "checkpoints" / "latest").exists() for i, p in points.items()}
    if new:
      submitted = self.submit(spec, workdir, folder, new)
      jobs |= submitted
      recorded |= {points[i].name: job.job_id for i, job in submitted.items()}
      outputs.write_text_atomically(folder / JOBS, json.dumps(recorded, indent=1) + "\n")
      ids = sorted({job.job_id.split("_")[0] for job in submitted.values()})
      self.log(f"submitted {len(new)} point{'s' * (len(new) != 1)} as SLURM job {', '.join(ids)} (submission "
               f"scripts and job logs in {folder})")
    wait(jobs, lambda i, job, state: outcome(points[i], workdir, job, state, resumed[i]), finished)

  def submit(self, spec: str, workdir: pathlib.Path, folder: pathlib.Path, points: dict[int, runner.Point]) -> dict:
    """One job per point (a job array when there are several): {grid index: submitit job}."""
    try:
      executor = submitit.SlurmExecutor(folder=folder)
    except RuntimeError:
      raise SlurmError("no `srun` on PATH: --launcher=slurm submits from a machine of a SLURM cluster (a login "
                       "node); use --launcher=local elsewhere") from None
    executor.update_parameters(**self.resources.parameters(f"clue_jax-{workdir.name}", len(points)))
    try:
      with executor.batch():
        submitted = {i: executor.submit(runner.run_point, spec, point, workdir) for i, point in points.items()}
    except submitit_utils.FailedJobError as e:  # sbatch's own message (a bad partition, too long a time, ...).
      lines = [line for line in str(e).splitlines() if line.strip()]
      raise SlurmError(f"sbatch refused the jobs: {lines[-1] if lines else e}") from None
    return submitted


def outcome(point: runner.Point, workdir: pathlib.Path, job, state: str | None, resumed: bool) -> report.Result:
  """How a point's job ended: done if its run directory holds the finished run; otherwise failed, saying why (SLURM
  ended the job, the trainer's error, or the job's own exception)."""
  result = report.Result(point.name, point.setting, point.overrides, action="resumed" if resumed else "trained")
  error = ""
  if job.paths.result_pickle.exists():
    try:
      result = job.result()  # run_point's result.
    except Exception as e:  # The job's exception, e.g. submitit's time-out notice: the last line of its trace.
      parts = str(e).split("-" * 22)  # submitit's message puts the job's traceback between two such lines.
      error = last_line(parts[1] if len(parts) > 2 else str(e))
  if runner.is_finished(point, workdir / point.name):
    result.status, result.error = "done", ""
    return result
  result.status = "failed"
  if state in ENDED - {"COMPLETED", "FAILED"}:  # Cancelled, timed out, out of memory, node failure, preempted, ...
    result.error = f"SLURM job {job.job_id} ended {state} before the point finished; its log: {job.paths.stderr}"
  elif not result.error:
    result.error = error or f"SLURM job {job.job_id} ended ({'no longer listed' if state == GONE else state}) " \
                            f"without a result; its log: {job.paths.stderr}"
  return result


def last_line(text: str) -> str:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else text


def wait(jobs: dict, ended, finished):
  """Polls squeue (every second at first, then less often) until every job has ended; for each, as it ends,
  `finished(index, ended(index, job, state))`. A job has ended when squeue says so (even with its result written, a
  job still listed as running may be being cancelled), or, while squeue fails, when its result is written."""
  pending, gone_since, start = dict(jobs), {}, time.monotonic()
  while pending:
    states = queue_states()
    now = time.monotonic()
    for i, job in list(pending.items()):
      state = None if states is None else states.get(job.job_id, GONE)
      written = job.paths.result_pickle.exists()
      if active(state) or (state is None and not written):
        continue
      if not written and state in (GONE, "COMPLETED") and now - gone_since.setdefault(i, now) < GRACE_S:
        continue  # Ended well: its result file may still be on its way.
      del pending[i]
      finished(i, ended(i, job, state))
    if pending:
      time.sleep(min(30.0, max(1.0, (time.monotonic() - start) / 10)))
