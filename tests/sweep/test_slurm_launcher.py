"""The SLURM launcher without a SLURM: fake `srun`, `sbatch` and `squeue` on PATH record what submitit submits and
answer with the job states a test sets. What it checks: the job array and its sbatch options, each job's call
(`runner.run_point` of its point), how the end of each job is read, and that jobs still queued from an earlier start
are waited for, not submitted again. tests/train/test_slurm.py runs the same on a real SLURM."""

import json
import os
import pathlib
import sys

import pytest
from submitit.core import utils as submitit_utils

from clue_jax.sweep import report, runner, slurm
from test_sweep import write_grid

FAKES = {
    "srun": "exit 0\n",
    # Keeps each submission script, answers as sbatch does (the job id is in $DIR/next_id), or fails with $DIR/refuse.
    "sbatch": 'if [ -f "$DIR/refuse" ]; then cat "$DIR/refuse" >&2; exit 1; fi\n'
              'cp "$1" "$DIR/submitted_$(cat "$DIR/next_id").sh"\n'
              'echo "Submitted batch job $(cat "$DIR/next_id")"\n',
    # Lists $DIR/queue.0, then moves on to queue.1 (and queue.2 to queue.1) if there is one: what a later call sees.
    "squeue": 'echo "$*" >> "$DIR/squeue_calls"\ncat "$DIR/queue.0"\ncd "$DIR"\n'
              'if [ -f queue.1 ]; then mv queue.1 queue.0; [ -f queue.2 ] && mv queue.2 queue.1; fi\nexit 0\n',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> pathlib.Path:
  """A directory of fake SLURM commands first on PATH; returns it (where they keep what they were given)."""
  directory = tmp_path / "fake_slurm"
  directory.mkdir()
  for name, body in FAKES.items():
    (directory / name).write_text(f"#!/bin/bash\nDIR={directory}\n{body}")
    (directory / name).chmod(0o755)
  (directory / "next_id").write_text("42")
  (directory / "queue.0").write_text("")
  monkeypatch.setenv("PATH", f"{directory}{os.pathsep}{os.environ['PATH']}")
  return directory


@pytest.fixture
def grid(tmp_path):
  """(spec, points, workdir) of a 3-point grid."""
  spec = str(write_grid(tmp_path, 'grid.axis("seed", [0, 1, 2])'))
  return spec, runner.load_grid(spec), tmp_path / "runs"


def finish(point: runner.Point, workdir: pathlib.Path):
  """The files of the point's finished run: what `runner.is_finished` looks for."""
  run_dir = workdir / point.name
  run_dir.mkdir(parents=True)
  (run_dir / "config.json").write_text(json.dumps(point.config.to_dict()))
  (run_dir / "summary.json").write_text(json.dumps({"epochs_run": 2, "restored_epoch": 2}))


def test_points_become_one_job_array_with_the_resources_asked_for(fake_slurm, grid):
  spec, points, workdir = grid
  resources = slurm.Resources(partition="gpu", time_min=90, cpus=4, gpus=2, array_cap=2,
                              options=("account=proj", "--qos=short", "exclusive"))
  launcher = slurm.Slurm(resources)
  jobs = launcher.submit(spec, workdir, workdir / slurm.FOLDER, dict(enumerate(points)))
  script = (fake_slurm / "submitted_42.sh").read_text()
  for option in ("--array=0-2%2", "--partition=gpu", "--time=90", "--cpus-per-task=4", "--gpus-per-node=2",
                 "--account=proj", "--qos=short", "--exclusive", f"--job-name=clue_jax-{workdir.name}"):
    assert f"#SBATCH {option}\n" in script, option
  assert "--wckey" not in script and f"{sys.executable} -u -m submitit.core._submit" in script
  assert sorted(jobs) == [0, 1, 2]
  for i, job in jobs.items():
    assert job.job_id == f"42_{i}"
    call = job.submission()  # What the job runs: run_point, which trains the point with runner.train_command.
    assert call.function is runner.run_point and call.args[0] == spec and call.args[2] == workdir
    assert call.args[1].name == points[i].name and call.args[1].config.to_dict() == points[i].config.to_dict()


def test_without_a_cap_every_point_may_run_at_once(fake_slurm, grid):
  spec, points, workdir = grid
  slurm.Slurm(slurm.Resources()).submit(spec, workdir, workdir / slurm.FOLDER, dict(enumerate(points)))
  script = (fake_slurm / "submitted_42.sh").read_text()
  assert "#SBATCH --array=0-2%3\n" in script and "#SBATCH --time=60\n" in script and "--partition" not in script


def test_each_job_ends_done_or_failed_with_slurms_reason(fake_slurm, grid):
  """Point 0's job returned its result; point 1's job was cancelled; point 2's returned a failed result (the
  trainer's error) and was then reported FAILED by SLURM. They are listed running at first, results written: a job
  ends when SLURM says so."""
  spec, points, workdir = grid
  folder = workdir / slurm.FOLDER
  folder.mkdir(parents=True)
  finish(points[0], workdir)
  done = report.Result(points[0].name, points[0].setting, points[0].overrides, "done", "trained", 12.0)
  submitit_utils.cloudpickle_dump(("success", done), folder / "42_0_0_result.pkl")
  failed = report.Result(points[2].name, points[2].setting, points[2].overrides, "failed", "resumed", 3.0,
                         "train.lr=-1.0 is not allowed")
  submitit_utils.cloudpickle_dump(("success", failed), folder / "42_2_0_result.pkl")
  (fake_slurm / "queue.1").write_text("42_0 RUNNING\n42_1 RUNNING\n42_2 COMPLETING\n")  # queue.0: before submitting.
  (fake_slurm / "queue.2").write_text("42_0 COMPLETED\n42_1 CANCELLED\n42_2 FAILED\n")
  ended, lines = {}, []
  slurm.Slurm(slurm.Resources(), log=lines.append).run(spec, workdir, dict(enumerate(points)),
                                                         lambda i, result: ended.setdefault(i, result))
  assert (ended[0].status, ended[0].action, ended[0].wall_s) == ("done", "trained", 12.0)
  assert ended[1].status == "failed" and ended[1].error == \
      f"SLURM job 42_1 ended CANCELLED before the point finished; its log: {folder.resolve() / '42_1_0_log.err'}"
  assert (ended[2].status, ended[2].error) == ("failed", "train.lr=-1.0 is not allowed")
  assert json.loads((folder / slurm.JOBS).read_text()) == {p.name: f"42_{i}" for i, p in enumerate(points)}
  assert lines == [f"submitted 3 points as SLURM job 42 (submission scripts and job logs in {folder.resolve()})"]
  calls = (fake_slurm / "squeue_calls").read_text().splitlines()
  assert len(calls) == 3 and all("--me" in call for call in calls)


def test_jobs_still_queued_from_an_earlier_start_are_waited_for_not_submitted_again(fake_slurm, grid):
  spec, points, workdir = grid
  folder = workdir / slurm.FOLDER
  folder.mkdir(parents=True)
  # Points 0 and 1 were submitted before: 0's job is still pending, 1's was cancelled (so 1 is submitted again).
  (folder / slurm.JOBS).write_text(json.dumps({points[0].name: "41_0", points[1].name: "41_1"}))
  (fake_slurm / "queue.0").write_text("41_0 PENDING\n41_1 CANCELLED\n")
  (fake_slurm / "queue.1").write_text("41_0 TIMEOUT\n42_0 OUT_OF_MEMORY\n42_1 NODE_FAIL\n")
  ended, lines = {}, []
  slurm.Slurm(slurm.Resources(), log=lines.append).run(spec, workdir, dict(enumerate(points)),
                                                         lambda i, result: ended.setdefault(i, result))
  assert lines[0] == "1 point still queued or running from an earlier start (jobs 41_0); waiting for them"
  script = (fake_slurm / "submitted_42.sh").read_text()
  assert "#SBATCH --array=0-1%2\n" in script, "only points 1 and 2 are submitted"
  assert json.loads((folder / slurm.JOBS).read_text()) == \
      {points[0].name: "41_0", points[1].name: "42_0", points[2].name: "42_1"}
  assert [ended[i].error.split(" before")[0] for i in range(3)] == \
      ["SLURM job 41_0 ended TIMEOUT", "SLURM job 42_0 ended OUT_OF_MEMORY", "SLURM job 42_1 ended NODE_FAIL"]


def test_no_slurm_or_a_refusal_is_one_clear_error(fake_slurm, grid, monkeypatch):
  spec, points, workdir = grid
  launcher = slurm.Slurm(slurm.Resources(partition="gpu"))
  (fake_slurm / "refuse").write_text("sbatch: error: invalid partition specified: gpu\n")
  with pytest.raises(slurm.SlurmError, match="^sbatch refused the jobs: sbatch: error: invalid partition specified: "
                                             "gpu$"):
    launcher.submit(spec, workdir, workdir / slurm.FOLDER, dict(enumerate(points)))
  monkeypatch.setenv("PATH", str(workdir))
  with pytest.raises(slurm.SlurmError, match=r"no `srun` on PATH: --launcher=slurm submits from a machine of a SLURM "
                                             r"cluster \(a login node\); use --launcher=local elsewhere"):
    launcher.submit(spec, workdir, workdir / slurm.FOLDER, dict(enumerate(points)))
