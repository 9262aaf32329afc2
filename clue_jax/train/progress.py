"""A one-line progress bar on stderr: epoch, losses, time per epoch and time left."""

import sys
import time


def _clock(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
  def __init__(self, total_epochs: int, enabled: bool = True, width: int = 20, stream=sys.stderr):
    self.total, self.enabled, self.width, self.stream = total_epochs, enabled, width, stream
    self.started = time.time()
    self.first_epoch = None
    self.tty = stream.isatty()

  def update(self, epoch: int, record: dict):
    if not self.enabled:
      return
    if self.first_epoch is None:
      self.first_epoch = epoch
    done = epoch - self.first_epoch + 1
    per_epoch = (time.time() - self.started) / done
    filled = int(self.width * epoch / max(self.total, 1))
    losses = f"gen {record.get('train/loss_gen', float('nan')):.4f} dsc {record.get('train/loss_dsc', 0):.4f}"
    if "val/loss_gen" in record:
      losses += f" val {record['val/loss_gen']:.4f}"
    if "val/heldout_foscttm" in record:
      losses += f" foscttm {record['val/heldout_foscttm']:.4f}"
    line = (f"epoch {epoch}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] {losses} | "
            f"{per_epoch:.2f}s/epoch, left <= {_clock(per_epoch * (self.total - epoch))}")
    if self.tty:
      self.stream.write("\r" + line + "\033[K")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self):
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()
