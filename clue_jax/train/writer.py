"""Run outputs: `metrics.jsonl` (one JSON object per epoch) and TensorBoard events (the only tensorboardX user)."""

import json
import math
import os
import pathlib

from tensorboardX import SummaryWriter

from clue_jax import outputs


class MetricWriter:
  """`enabled=False` (processes other than 0 of a multi-process run) writes nothing and creates no files."""

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.path = workdir / "metrics.jsonl"
    self.tb = SummaryWriter(str(workdir / "tb")) if enabled else None

  def write(self, record: dict):
    """Appends one record (a whole line, flushed and synced) and logs its numeric entries as scalars."""
    if self.tb is None:
      return
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(clean) + "\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:  # A partial line left behind is dropped by `truncate_after` on resume.
      raise outputs.OutputError(self.path, e) from e
    step = record["epoch"]
    for key, value in record.items():
      if "/" in key and isinstance(value, (int, float)) and value is not None:
        self.tb.add_scalar(key, value, step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def truncate_after(path: pathlib.Path, epoch: int):
  """Drops records of epochs after `epoch` (left by a run killed after its last checkpoint)."""
  if not path.exists():
    return
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  kept = []
  for line in lines:
    try:
      if json.loads(line).get("epoch", 0) <= epoch:
        kept.append(line)
    except json.JSONDecodeError:  # A line cut by a crash.
      continue
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  os.replace(tmp, path)
