"""Every test runs with 4 fake CPU devices (set before any JAX array exists) and a persistent compile cache; the
smoke run that several test folders read is trained once per session.

`make test` runs the suite in two pytest-xdist processes, scheduled by `pytest_xdist_make_scheduler` below: the
files in WHOLE_FILES (their tests share a module-scoped trained run) go to one process each, every other test to
whichever process is free, the longest work first."""

import fcntl
import json
import os
import pathlib
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
CACHE = pathlib.Path(os.environ.get("CLUE_JAX_TEST_CACHE", pathlib.Path(tempfile.gettempdir()) / "clue_jax_jit"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Files whose tests share a module-scoped fixture (a trained run, a compiled step): each runs whole in one process.
WHOLE_FILES = ("tests/train/test_multihost.py", "tests/train/test_slurm.py", "tests/train/test_invariance.py",
               "tests/test_fit.py", "tests/train/test_optimizers.py", "tests/data/test_fuzz.py",
               "tests/data/test_device_data.py", "tests/test_api.py", "tests/model/test_losses.py",
               "tests/evaluate/test_metrics.py")
# The longest work units, longest first (as measured on a cold compile cache on this 2-core machine, 40 to 130 s
# each): started first, they leave the short tests to fill the gaps, so that both processes finish together.
LONGEST_FIRST = ("tests/train/test_multihost.py", "tests/train/test_slurm.py", "tests/test_gpu_check.py",
                 "tests/competition/test_competition.py::test_both_stages", "tests/test_quickstart.py",
                 "tests/train/test_invariance.py", "tests/sweep/test_sweep.py::test_sweep_runs",
                 "tests/train/test_optimizers.py", "tests/test_fit.py", "tests/data/test_fuzz.py",
                 "tests/data/test_device_data.py", "tests/train/test_train.py::test_run_killed_twice",
                 "tests/data/test_streaming.py::test_bad_rows", "tests/train/test_short_epochs.py",
                 "tests/data/test_streaming.py::test_training_from_disk")


def rank(nodeid: str) -> int:
  return next((i for i, prefix in enumerate(LONGEST_FIRST) if nodeid.startswith(prefix)), len(LONGEST_FIRST))


def pytest_collection_modifyitems(items):
  """LONGEST_FIRST first, the rest in file order (a stable sort: every xdist process collects the same order)."""
  items.sort(key=lambda item: rank(item.nodeid))


def pytest_xdist_make_scheduler(config, log):
  """Whole files for WHOLE_FILES, single tests otherwise, in the collection's order."""
  from xdist.scheduler import LoadScopeScheduling

  class Scheduler(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      path = nodeid.split("::")[0]
      return path if path in WHOLE_FILES else nodeid

  config.option.loadscopereorder = False  # Keep the collection's order, not the number of tests per unit.
  return Scheduler(config, log)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, worker_id):
  """configs/smoke.py trained once for the whole session (EPOCHS epochs, scored every 2 epochs, plots at the end):
  (workdir, config, summary). Tests that change a run copy it first.

  Under pytest-xdist the workers share it: the first to ask trains it in the session's common directory, holding a
  file lock, and the others wait for it and read its summary.
  """
  from clue_jax.train import trainer
  from run_helpers import load_config
  config = load_config()
  config.evals.update(every_epochs=2, metrics="foscttm,top1,label_transfer", max_cells=300, plots=True)
  shared = tmp_path_factory.getbasetemp()
  shared = shared.parent if worker_id != "master" else shared  # The session's directory, common to its workers.
  workdir = shared / "smoke_run"
  with open(shared / "smoke_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "summary.json").is_file():
      trainer.train_and_evaluate(config, workdir)
    summary = json.loads((workdir / "summary.json").read_text())
  return workdir, config, summary
