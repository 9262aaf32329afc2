"""Orbax checkpoints of a run (the only module that imports orbax).

Two managers under `<workdir>/checkpoints/`: `latest/` (the last epochs, for resuming) and `best/` (the
`keep_best` epochs with the lowest monitored value after burn-in). Each step holds the train state, the schedule,
the fitted preprocessing and the run's metadata (config, modality order, features, categories). Restores always
go against an abstract target with shardings, so a run saved on N devices restores on M.
"""

import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


def _manager(directory: pathlib.Path, max_to_keep: int, best: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      best_fn=(lambda metrics: metrics["monitored"]) if best else None,
      best_mode="min",
      keep_checkpoints_without_metrics=not best,
      enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(directory.absolute(), options=options)


class Checkpoints:
  def __init__(self, directory: pathlib.Path, keep_best: int):
    self.latest = _manager(directory / "latest", 2, best=False)
    self.best = _manager(directory / "best", keep_best, best=True)

  def save(self, epoch: int, state, schedule: dict, preprocess: dict, meta: dict, latest: bool = True,
           monitored=None):
    """Saves epoch `epoch` as the latest (if `latest`), and among the best when `monitored` is given."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), schedule=ocp.args.JsonSave(schedule),
                              preprocess=ocp.args.StandardSave(preprocess), meta=ocp.args.JsonSave(meta))
    if latest:
      self.latest.save(epoch, args=args, force=True)
    if monitored is not None:
      self.best.save(epoch, args=args, metrics={"monitored": float(monitored)}, force=True)
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def latest_epoch(self):
    return self.latest.latest_step()

  def drop_best_after(self, epoch: int):
    """Deletes best checkpoints newer than `epoch` (written after the latest one by a run that was killed)."""
    for step in self.best.all_steps():
      if step > epoch:
        self.best.delete(step)

  def best_epoch(self):
    """The most recent of the kept best epochs (what the reference restores at the end)."""
    steps = self.best.all_steps()
    return max(steps) if steps else None

  def _manager_for(self, from_best: bool):
    return self.best if from_best else self.latest

  def restore_extras(self, epoch: int, from_best: bool = False):
    """(schedule, preprocess, meta) of `epoch`: everything but the train state."""
    manager = self._manager_for(from_best)
    restored = manager.restore(epoch, args=ocp.args.Composite(
        schedule=ocp.args.JsonRestore(), preprocess=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return restored["schedule"], jax.tree.map(np.asarray, restored["preprocess"]), restored["meta"]

  def restore_state(self, epoch: int, abstract_state, from_best: bool = False):
    """The train state of `epoch`, placed as `abstract_state` (ShapeDtypeStructs with shardings) says."""
    manager = self._manager_for(from_best)
    restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def restore_meta(self, epoch: int) -> dict:
    """The run metadata (config, features, categories) of a latest-checkpoint epoch."""
    restored = self.latest.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def close(self):
    self.latest.close()
    self.best.close()


def abstract(tree, sharding):
  """ShapeDtypeStructs of `tree` with the given sharding (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
