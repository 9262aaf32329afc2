"""Two processes joined by `jax.distributed` (gloo over TCP on 127.0.0.1, 2 fake CPU devices each) train the same model
as one process with 4 devices, resume together after being killed, fine-tune a run (`--init_from`) as one process
does, and what they save restores in one process.

The pair runs the real command line (`python -m clue_jax.train ... --num_processes=2 --process_id=I`) on
configs/smoke.py while this process (4 fake devices, tests/conftest.py) trains the same config. Both stream their
rows from disk (`data.storage=disk`), so each process reads from its store only the rows of its half of every batch:
the test counts them. Both members of the
pair are SIGKILLed once the checkpoint of epoch 1 is on disk, and a second launch resumes from it and finishes. The
pair densifies batches on the host (`train.data_on_device=False`), each process only its half of every batch, which
is the path with the most multi-process logic; in one process that path trains bitwise like the default one
(test_device_data.py), and the pair did too (measured once, both ways).

Both use a 4-device mesh, yet they are not bitwise equal: the cross-process (gloo) reductions sum in another order.
Measured on CPU: the first step's losses agree to 1.5e-7 (relative; optimised XLA), and after 2 epochs the round-off
has grown as it does between device counts in test_invariance.py (largest parameter difference 0.048, 1.1 % of the
parameters' norm; BatchNorm statistics 0.13; generator loss 2e-4 relative; held-out FOSCTTM 0.0006), so its
tolerances apply.
"""

import contextlib
import importlib.util
import io
import json
import re
import os
import pathlib
import socket
import signal
import subprocess
import sys
import threading
import time

import anndata as ad
import jax
import numpy as np
import pytest

from clue_jax import api
from clue_jax.train import trainer
from test_invariance import assert_same_model

ROOT = pathlib.Path(__file__).resolve().parents[2]
STARTER = ROOT / "clue_jax" / "datasets" / "bmmc_cite_starter"
EPOCHS = 2
PROCESSES = 2
# Compile time is most of the test: 3 steps a dispatch divides the smoke run's 9 steps an epoch (one train program,
# not two), and XLA's optimisations are off in both runs (jax_disable_most_optimizations). A multi-process CPU
# run cannot use the persistent compilation cache (`parallel.initialize`), so the pair compiles everything each time.
OVERRIDES = {"max_epochs": EPOCHS, "progress": False, "steps_per_dispatch": 3}


def gloo_available() -> bool:
  try:
    from jax._src.lib import _jax  # Private: where jaxlib exposes its CPU collectives.
  except ImportError:
    return False
  return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(not gloo_available(), reason="this jaxlib has no gloo CPU collectives, which the two "
                                "CPU processes need to talk to each other")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def smoke_config():
  spec = importlib.util.spec_from_file_location("config_smoke", ROOT / "configs" / "smoke.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.update(**OVERRIDES)
  config.data.storage = "disk"
  return config


def launch_pair(workdir: pathlib.Path, logs: list, init_from: pathlib.Path | None = None) -> list:
  """Starts the two processes of the pair on `workdir` (fine-tuning the run in `init_from`, if given), each writing
  its output to its log."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  command = [sys.executable, "-m", "clue_jax.train", f"--config={ROOT / 'configs' / 'smoke.py'}",
             f"--workdir={workdir}", "--config.train.data_on_device=False", "--config.data.storage=disk",
             *(f"--config.train.{k}={v}" for k, v in OVERRIDES.items()),
             f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={PROCESSES}",
             *([f"--init_from={init_from}"] if init_from else [])]
  processes = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      processes.append(subprocess.Popen(command + [f"--process_id={i}"], cwd=ROOT, env=env, stdout=f,
                                        stderr=subprocess.STDOUT))
  return processes


def kill_after_first_checkpoint(workdir: pathlib.Path, processes: list, outcome: dict):
  """SIGKILLs every process once `workdir` holds the finished checkpoint of epoch 1 (Orbax renames it into place)."""
  first = workdir / "checkpoints" / "latest" / "1"
  deadline = time.monotonic() + 300
  while not first.is_dir() and time.monotonic() < deadline and all(p.poll() is None for p in processes):
    time.sleep(0.005)
  outcome["running_at_kill"] = all(p.poll() is None for p in processes)
  for process in processes:
    if process.poll() is None:
      process.kill()  # Not SIGTERM: jax.distributed catches it (preemption notice) and carries on.


def wait_all(processes: list, timeout: float = 300):
  try:
    for process in processes:
      process.wait(timeout=timeout)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()


def train_alone(workdir: pathlib.Path, init_from: pathlib.Path | None = None) -> str:
  """Trains the smoke config in this process (4 devices), XLA optimisations off like the pair's; returns its output."""
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  output = io.StringIO()
  try:
    with contextlib.redirect_stdout(output):
      trainer.train_and_evaluate(smoke_config(), workdir, init_from=init_from)
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
  return output.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(pair workdir, single-process workdir, pair logs): the pair trained, killed after epoch 1 and resumed in
  subprocesses while this process trains alone."""
  tmp = tmp_path_factory.mktemp("multihost")
  pair = tmp / "pair"
  killed_logs = [tmp / f"killed{i}.log" for i in range(PROCESSES)]
  processes = launch_pair(pair, killed_logs)
  outcome = {}
  killer = threading.Thread(target=kill_after_first_checkpoint, args=(pair, processes, outcome))
  killer.start()
  try:
    (tmp / "single.log").write_text(train_alone(tmp / "single"))
  finally:
    killer.join()
    wait_all(processes)
  assert outcome["running_at_kill"], "the pair ended before its first checkpoint: " + killed_logs[0].read_text()[-4000:]
  assert [p.returncode for p in processes] == [-signal.SIGKILL] * PROCESSES
  logs = [tmp / f"process{i}.log" for i in range(PROCESSES)]
  processes = launch_pair(pair, logs)
  wait_all(processes)
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log.read_text()[-4000:]
  return pair, tmp / "single", logs


@pytest.fixture(scope="module")
def finetuned(runs):
  """(pair workdir, single-process workdir, pair logs): the single-process run fine-tuned (`--init_from`) by the pair
  and, at the same time, by this process."""
  _, single, _ = runs
  tmp = single.parent
  logs = [tmp / f"finetune{i}.log" for i in range(PROCESSES)]
  processes = launch_pair(tmp / "pair_finetuned", logs, init_from=single)
  try:
    train_alone(tmp / "single_finetuned", init_from=single)
  finally:
    wait_all(processes)
  for process, log in zip(processes, logs):
    assert process.returncode == 0, log.read_text()[-4000:]
  return tmp / "pair_finetuned", tmp / "single_finetuned", logs


def model_and_record(workdir: pathlib.Path):
  """(final params and batch_stats as a flat dict, last epoch's record), the model restored in this process."""
  state = api.load(workdir).state
  flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path({"params": state.params, "batch_stats": state.batch_stats})}
  return flat, json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])


def test_two_processes_train_the_model_of_one(runs):
  """The pair, killed after epoch 1 and resumed, ends with the model one process trains without interruption."""
  pair, single, logs = runs
  assert f"Resuming {pair} from epoch 1." in logs[0].read_text()
  pair_model, pair_record = model_and_record(pair)  # Restores the pair's checkpoint, SHA-256 checked.
  single_model, single_record = model_and_record(single)
  assert_same_model(single_model, single_record, pair_model, pair_record)


def rows_read(log: str) -> tuple:
  """(rows read from the store, epochs) from a run's `process I of N read R rows from its store in E epochs` line."""
  match = re.search(r"process \d of \d read ([\d,]+) rows from its store in (\d+) epochs?", log)
  assert match, log[-4000:]
  return int(match.group(1).replace(",", "")), int(match.group(2))


def test_each_process_reads_only_its_half_of_the_rows(runs):
  """Per epoch, each process of the pair reads from its store exactly half the rows one process reads (its half of
  every training and validation batch and of every chunk it encodes), counted where the rows are read."""
  pair, single, logs = runs
  alone, alone_epochs = rows_read((single.parent / "single.log").read_text())
  assert alone_epochs == EPOCHS and alone > 0
  for log in logs:  # The resumed launch: epoch 2 only.
    read, epochs = rows_read(log.read_text())
    assert epochs == 1 and read * 2 == alone / EPOCHS, (read, alone)


def test_two_processes_fine_tune_as_one(finetuned):
  """`--init_from` in the pair: each process restores the one-process run's final model, and the pair ends where
  one process fine-tuning the same run ends."""
  pair, single, logs = finetuned
  log = logs[0].read_text()
  assert f"Starting from the parameters of {single.parent / 'single'} (epoch {EPOCHS})." in log
  assert "Resuming" not in log
  pair_model, pair_record = model_and_record(pair)
  single_model, single_record = model_and_record(single)
  assert pair_record["epoch"] == EPOCHS
  assert_same_model(single_model, single_record, pair_model, pair_record)


def test_only_process_zero_writes_the_outputs(runs):
  pair, _, _ = runs
  assert [json.loads(line)["epoch"] for line in (pair / "metrics.jsonl").read_text().splitlines()] == [1, 2]
  assert len(list((pair / "tb").iterdir())) == 2  # One event file per launch: process 0's.
  assert json.loads((pair / "summary.json").read_text())["epochs_run"] == EPOCHS
  assert not list(pair.glob("**/*.tmp"))


def test_the_pairs_embeddings_are_its_checkpoints(runs):
  """The embeddings the pair gathered from both processes = those of its checkpoint encoded in one process."""
  pair, _, _ = runs
  run = api.load(pair)
  for modality in ("rna", "adt"):
    saved = ad.read_h5ad(pair / "embeddings" / f"{modality}.h5ad")
    encoded = run.encode(ad.read_h5ad(STARTER / f"{modality}.h5ad"), modality)
    np.testing.assert_allclose(encoded.obsm["X_clue"], saved[encoded.obs_names].obsm["X_clue"], atol=1e-5)
