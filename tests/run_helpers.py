"""What several test folders share: the repository root, the configs in configs/, a run's saved parameters and
TensorBoard tags."""

import pathlib
import struct

import numpy as np
import orbax.checkpoint as ocp

from clue_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
EPOCHS = 4  # Of the shared smoke run (conftest.smoke_run) and of load_config()'s runs.


def load_config(name="smoke", **train):
  """configs/<name>.py at EPOCHS epochs, without a progress bar, with `train` overrides."""
  config = config_lib.load_module(ROOT / "configs" / f"{name}.py").get_config()
  config.train.update({"max_epochs": EPOCHS, "progress": False, **train})
  return config


def tensorboard_tags(directory):
  """Scalar tags in the tensorboardX event files (TFRecord framing parsed by hand)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in directory.glob("events.out.tfevents.*"):
    raw = path.read_bytes()
    offset = 0
    while offset < len(raw):
      (length,) = struct.unpack("<Q", raw[offset:offset + 8])
      event = event_pb2.Event.FromString(raw[offset + 12:offset + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      offset += 12 + length + 4
  return tags


def saved_params(workdir, epoch, kind="latest"):
  manager = ocp.CheckpointManager((workdir / "checkpoints" / kind).absolute())
  restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return restored["state"]["params"]


def assert_trees_close(a, b, atol):
  flat_a, flat_b = dict(flatten(a)), dict(flatten(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_allclose(np.asarray(flat_a[key]), np.asarray(flat_b[key]), atol=atol, rtol=0, err_msg=key)


def flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from flatten(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value
