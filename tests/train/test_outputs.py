"""Crash and disk safety of the run outputs: checkpoints, metrics.jsonl, atomically written files."""

import errno
import json
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from clue_jax import outputs
from clue_jax.train import checkpoint, parallel, writer


def no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


def tiny_state(value: float) -> dict:
  return {"params": {"w": np.full((3, 2), value, np.float32)}, "batch_stats": {"m": np.zeros(2, np.float32)}}


def save_epochs(directory, epochs):
  ckpts = checkpoint.Checkpoints(directory, keep_best=1)
  for epoch in epochs:
    ckpts.save(epoch, tiny_state(float(epoch)), {"epoch": epoch}, {"format": np.ones((), np.int32)}, {"run": 1})
  ckpts.close()


def abstract_of(state):
  return checkpoint.abstract(state, parallel.replicated(parallel.make_mesh(1)))


def flip_bytes(step_dir):
  """Inverts 64 bytes in the middle of every data file of a checkpoint step's state (Orbax's OCDBT store)."""
  for target in (step_dir / "state").glob("**/d/*"):
    raw = bytearray(target.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
    target.write_bytes(bytes(raw))


def test_damaged_latest_step_is_set_aside_and_the_previous_one_used(tmp_path):
  save_epochs(tmp_path, [1, 2])
  flip_bytes(tmp_path / "latest" / "2")
  ckpts = checkpoint.Checkpoints(tmp_path, keep_best=1)
  with pytest.warns(UserWarning, match=r"latest/2 cannot be read \(ValueError: .*OCDBT.*\); skipped it "
                                       r"\(moved to .*damaged/latest-2\)"):
    epoch, state = ckpts.restore_newest(abstract_of(tiny_state(0.0)))
  assert epoch == 1 and (np.asarray(state["params"]["w"]) == 1.0).all()
  assert ckpts.latest_epoch() == 1 and (tmp_path / "damaged" / "latest-2").is_dir()
  ckpts.save(2, tiny_state(2.0), {}, {"format": np.ones((), np.int32)}, {})  # The epoch can be saved again.


def test_a_state_that_does_not_match_its_digest_is_damaged(tmp_path, monkeypatch):
  save_epochs(tmp_path, [1])
  ckpts = checkpoint.Checkpoints(tmp_path, keep_best=1)
  monkeypatch.setattr(checkpoint, "state_digest", lambda state: "0" * 64)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=r"latest/1: the restored state does not match its SHA-256"):
    ckpts.restore_newest(abstract_of(tiny_state(0.0)))
  assert ckpts.latest_epoch() == 1  # Nothing is moved when no step is intact.


def test_unreadable_metadata_of_every_step_is_an_error(tmp_path):
  save_epochs(tmp_path, [1, 2])
  for step in (1, 2):
    (tmp_path / "latest" / str(step) / "meta" / "metadata").write_text("{cut")
  with pytest.warns(UserWarning, match="trying the previous checkpoint"):
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"latest/2: .*; .*latest/1: "):
      checkpoint.Checkpoints(tmp_path, keep_best=1).newest_extras()


def test_a_save_cut_by_a_kill_is_ignored_and_removed(tmp_path):
  save_epochs(tmp_path, [1])
  unfinished = tmp_path / "latest" / f"2{ocp.path.atomicity_types.TMP_DIR_SUFFIX}"
  shutil.copytree(tmp_path / "latest" / "1", unfinished)
  ckpts = checkpoint.Checkpoints(tmp_path, keep_best=1)
  assert ckpts.latest_epoch() == 1 and not unfinished.exists()


def test_other_model_shapes_are_reported(tmp_path):
  save_epochs(tmp_path, [1])
  other = {"params": {"w": np.zeros((4, 2), np.float32)}, "batch_stats": {"m": np.zeros(2, np.float32)}}
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=re.escape("1 model arrays differ in shape, e.g. params/w: (3, 2) saved, (4, 2) now")):
    checkpoint.Checkpoints(tmp_path, keep_best=1).restore_state(1, abstract_of(other))


def test_full_disk_while_checkpointing(tmp_path, monkeypatch):
  ckpts = checkpoint.Checkpoints(tmp_path, keep_best=1)
  monkeypatch.setattr(ocp.CheckpointManager, "save", no_space)
  with pytest.raises(outputs.OutputError, match=r"cannot write .*latest/1: No space left on device. Free disk space"):
    ckpts.save(1, tiny_state(1.0), {}, {"format": np.ones((), np.int32)}, {})


def test_full_disk_while_logging_metrics(tmp_path, monkeypatch):
  metric_writer = writer.MetricWriter(tmp_path)
  monkeypatch.setattr(writer.os, "fsync", no_space)
  with pytest.raises(outputs.OutputError, match=r"cannot write .*metrics.jsonl: No space left on device"):
    metric_writer.write({"epoch": 1, "train/loss_gen": 1.0})
  monkeypatch.undo()
  metric_writer.close()


def test_full_disk_while_writing_a_file_leaves_the_old_one(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  path.write_text("old")
  monkeypatch.setattr(type(path), "write_text", no_space)
  with pytest.raises(outputs.OutputError, match=rf"cannot write {re.escape(str(path))}: No space left on device"):
    outputs.write_atomically(path, lambda p: p.write_text("new"))
  assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"epoch": e, "lr": 0.1}) + "\n" for e in (1, 2, 3)) + '{"epoch": 4, "l')
  writer.truncate_after(path, 2)
  assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2]
  assert path.read_text().endswith("\n")


def test_state_digest_sees_every_bit():
  state = tiny_state(1.0)
  flipped = jax.tree.map(np.copy, state)
  flipped["params"]["w"].view(np.uint32)[0, 0] ^= 1
  assert checkpoint.state_digest(state) == checkpoint.state_digest(jax.tree.map(np.copy, state))
  assert checkpoint.state_digest(state) != checkpoint.state_digest(flipped)


def test_the_compilation_cache_is_on_by_default_and_a_directory_set_before_is_kept(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir
  try:
    parallel.use_compilation_cache("auto")
    assert jax.config.jax_compilation_cache_dir == before  # Set by tests/conftest.py: kept.
    jax.config.update("jax_compilation_cache_dir", None)
    parallel.use_compilation_cache("")
    assert jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parallel.use_compilation_cache("auto")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "clue_jax" / "jit")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
