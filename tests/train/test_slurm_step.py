"""Which processes join a multi-process run by themselves under SLURM: the tasks of an `srun` step of several tasks,
not a batch script's own process (tests/train/test_slurm.py runs `srun -n 2` on a real SLURM)."""

import pytest

from clue_jax.train import parallel

JOB = {"SLURM_JOB_ID": "12", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODELIST": "a,b"}
STEP = {"SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "a,b", "SLURM_STEP_NUM_NODES": "2"}


@pytest.mark.parametrize("environ, tasks", [
    ({}, 1),  # No SLURM.
    (JOB, 1),  # `sbatch -n 2` running python itself: its allocation has 2 tasks, the batch script is one process.
    (JOB | STEP | {"SLURM_STEP_NUM_TASKS": "2"}, 2),  # Each task of `srun -N 2 -n 2 python ...`.
    (JOB | STEP | {"SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}, 1),  # `srun -n 1` (a sweep point's job).
])
def test_the_tasks_of_an_srun_step_count_a_batch_script_does_not(environ, tasks):
  assert parallel.slurm_step_tasks(environ) == tasks


def test_a_bad_task_count_is_named():
  with pytest.raises(ValueError, match="SLURM_STEP_NUM_TASKS='two' is not an integer"):
    parallel.slurm_step_tasks(JOB | STEP | {"SLURM_STEP_NUM_TASKS": "two"})
