"""The training progress bar, through tqdm (a widget in notebooks, a line in terminals): epochs, losses, time left."""

import sys

from tqdm.auto import tqdm


def losses(record: dict) -> str:
  """The figures of an epoch's metrics record that the bar shows."""
  text = f"gen {record.get('train/loss_gen', float('nan')):.4f} dsc {record.get('train/loss_dsc', 0):.4f}"
  if "val/loss_gen" in record:
    text += f" val {record['val/loss_gen']:.4f}"
  if "val/heldout_foscttm" in record:
    text += f" foscttm {record['val/heldout_foscttm']:.4f}"
  return text


class ProgressBar:
  """One bar over the run's epochs; a resumed run's bar starts at its first new epoch (its rate counts only those)."""

  def __init__(self, total_epochs: int, enabled: bool = True, stream=None):
    self.total, self.enabled, self.stream = total_epochs, enabled, stream
    self.bar = None

  def update(self, epoch: int, record: dict):
    if not self.enabled:
      return
    if self.bar is None:
      self.bar = tqdm(total=self.total, initial=epoch - 1, unit="epoch", desc="CLUE", dynamic_ncols=True,
                      file=self.stream or sys.stderr)
    self.bar.set_postfix_str(losses(record), refresh=False)
    self.bar.update(epoch - self.bar.n)

  def close(self):
    if self.bar is not None:
      self.bar.close()
