"""Epochs shorter than one dispatch of `train.steps_per_dispatch` steps (large batches): the trainer's epoch loop and
experiments/bench_throughput.py run them as one partial chunk (data on the devices; the host-data loop takes the
same chunk lengths)."""

import argparse
import importlib.util
import math

from run_helpers import ROOT

SPEC = importlib.util.spec_from_file_location("bench_throughput", ROOT / "experiments" / "bench_throughput.py")
bench_throughput = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench_throughput)


def test_an_epoch_shorter_than_one_dispatch_is_timed(tmp_path):
  args = argparse.Namespace(preset="defaults", batch_size=256, devices=0, steps_per_dispatch=8, host_data=False,
                            matmul_dtype="float32")
  config = bench_throughput.bench_config(bench_throughput.synthetic_files(tmp_path, 700), args)
  config.model.update(latent_dim=8, encoder_width=32, decoder_width=32, discriminator_width=32)  # Seconds to compile.
  timers = bench_throughput.Timers(config, epochs=1)
  assert timers.n_steps == 2 and timers.per_dispatch == 2
  for cells_per_s in (timers.steps(), timers.loop()):
    assert math.isfinite(cells_per_s) and cells_per_s > 0
