"""Every test runs with 4 fake CPU devices (set before any JAX array exists) and a persistent compile cache; the
smoke run that several test folders read is trained once per session."""

import os
import pathlib
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)
CACHE = pathlib.Path(os.environ.get("CLUE_JAX_TEST_CACHE", pathlib.Path(tempfile.gettempdir()) / "clue_jax_jit"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """configs/smoke.py trained once for the whole session (EPOCHS epochs, scored every 2 epochs, plots at the end):
  (workdir, config, summary). Tests that change a run copy it first."""
  from clue_jax.train import trainer
  from run_helpers import load_config
  workdir = tmp_path_factory.mktemp("smoke")
  config = load_config()
  config.evals.update(every_epochs=2, metrics="foscttm,top1,label_transfer", max_cells=300, plots=True)
  summary = trainer.train_and_evaluate(config, workdir)
  return workdir, config, summary
