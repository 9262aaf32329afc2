"""The training progress bar: what it shows, from where a resumed run starts, and silence when disabled."""

import io

from clue_jax.train import progress

RECORD = {"train/loss_gen": 1.25, "train/loss_dsc": 0.5, "val/loss_gen": 2.0, "val/heldout_foscttm": 0.125}


def test_bar_shows_epochs_and_losses_from_the_first_new_epoch():
  stream = io.StringIO()
  bar = progress.ProgressBar(5, stream=stream)
  bar.update(3, RECORD)  # A run resumed after epoch 2.
  assert bar.bar.n == 3 and bar.bar.total == 5 and bar.bar.postfix == "gen 1.2500 dsc 0.5000 val 2.0000 foscttm 0.1250"
  bar.update(4, {"train/loss_gen": 1.0})
  bar.close()
  text = stream.getvalue()  # tqdm redraws at most every 0.1 s; closing draws the last state.
  assert "CLUE:" in text and "4/5" in text and "epoch/s" in text and text.endswith("gen 1.0000 dsc 0.0000]\n")


def test_disabled_bar_writes_nothing():
  stream = io.StringIO()
  bar = progress.ProgressBar(5, enabled=False, stream=stream)
  bar.update(1, RECORD)
  bar.close()
  assert stream.getvalue() == ""
