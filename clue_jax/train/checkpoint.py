"""Orbax checkpoints of a run (the only module that imports orbax).

Two managers under `<workdir>/checkpoints/`: `latest/` (the last epochs, for resuming) and `best/` (the
`keep_best` epochs with the lowest monitored value after burn-in). Each step holds the train state, the schedule,
the fitted preprocessing and the run's metadata (config, modality order, features, categories, and a SHA-256 of the
state). Restores always go against an abstract target with shardings, so a run saved on N devices restores on M.

Crash safety: Orbax writes a step under a temporary name and renames it when complete, so a run killed during a
save leaves only an unfinished temporary directory, which is ignored and removed on the next start. A finished step
that cannot be read back or whose state does not match its SHA-256 is damaged: it is moved to `checkpoints/damaged/`
with a warning and the previous step is used.
"""

import hashlib
import pathlib
import shutil
import warnings
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from clue_jax import outputs
from clue_jax.train import parallel

MODEL_KEYS = ("params", "batch_stats")


class IncompatibleCheckpoint(ValueError):
  """A checkpoint whose model shapes differ from those of the model being built."""


class DamagedCheckpoint(RuntimeError):
  """A checkpoint step that cannot be read back intact."""


class Extras(NamedTuple):
  """Everything a saved epoch holds beside the train state: the schedule (JSON), the fitted preprocessing (a tree of
  arrays) and the run's metadata (JSON, `run_dir.RunMeta`)."""

  epoch: int
  schedule: dict
  preprocess: dict
  meta: dict


def _remove_unfinished(directory: pathlib.Path):
  """Deletes the steps that a killed run left under Orbax's temporary names (never read by Orbax either).

  Process 0 deletes; the others wait for it.
  """
  if parallel.is_main_process() and directory.is_dir():
    for path in directory.glob(f"*{ocp.path.atomicity_types.TMP_DIR_SUFFIX}*"):
      shutil.rmtree(path)
  parallel.barrier("remove_unfinished")


def _manager(directory: pathlib.Path, max_to_keep: int, best: bool) -> ocp.CheckpointManager:
  _remove_unfinished(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      best_fn=(lambda metrics: metrics["monitored"]) if best else None,
      best_mode="min",
      keep_checkpoints_without_metrics=not best,
      enable_async_checkpointing=False,
  )
  handlers = {"state": ocp.StandardCheckpointHandler(), "preprocess": ocp.StandardCheckpointHandler(),
              "schedule": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory.absolute(), options=options, item_handlers=handlers)


def _brief(error: Exception) -> str:
  """The error's type and the start of its message (tensorstore appends its whole spec)."""
  text = str(error)
  return f"{type(error).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"


def state_digest(state) -> str:
  """SHA-256 over the shapes, dtypes and bytes of every leaf of `state` (the same in every process)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(parallel.fetch(state)):
    leaf = np.asarray(leaf)
    digest.update(f"{leaf.shape}{leaf.dtype}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _named_leaves(tree) -> dict:
  """{"params/encoder/Dense_0/kernel": leaf} for the model entries (params, batch_stats) of a state."""
  return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if _leaf_name(path[:1]) in MODEL_KEYS}


class Checkpoints:
  def __init__(self, directory: pathlib.Path, keep_best: int):
    self.directory = directory
    self.latest = _manager(directory / "latest", 2, best=False)
    self.best = _manager(directory / "best", keep_best, best=True)

  def save(self, epoch: int, state, schedule: dict, preprocess: dict, meta: dict, latest: bool = True,
           monitored=None):
    """Saves epoch `epoch` among the best when `monitored` is given, then as the latest (if `latest`).

    Best first: a run killed in between resumes from the previous latest epoch, which drops the newer best one.
    """
    meta = {**meta, "state_sha256": state_digest(state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), schedule=ocp.args.JsonSave(schedule),
                              preprocess=ocp.args.StandardSave(preprocess), meta=ocp.args.JsonSave(meta))
    for manager, wanted in ((self.best, monitored is not None), (self.latest, latest)):
      if not wanted:
        continue
      try:
        if manager is self.best:
          manager.save(epoch, args=args, metrics={"monitored": float(monitored)}, force=True)
        else:
          manager.save(epoch, args=args, force=True)
        manager.wait_until_finished()
      except OSError as e:
        raise outputs.OutputError(manager.directory / str(epoch), e) from e

  def latest_epoch(self):
    return self.latest.latest_step()

  def drop_best_after(self, epoch: int):
    """Deletes best checkpoints newer than `epoch` (written after the latest one by a run that was killed)."""
    for step in self.best.all_steps():
      if step > epoch:
        self.best.delete(step)

  def _manager_for(self, from_best: bool):
    return self.best if from_best else self.latest

  def restore_extras(self, epoch: int, from_best: bool = False) -> Extras:
    """Everything but the train state of `epoch`."""
    manager = self._manager_for(from_best)
    restored = manager.restore(epoch, args=ocp.args.Composite(
        schedule=ocp.args.JsonRestore(), preprocess=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    return Extras(epoch, restored["schedule"], jax.tree.map(np.asarray, restored["preprocess"]), restored["meta"])

  def state_metadata(self, epoch: int, from_best: bool = False):
    """The saved train state's tree of array metadata (shapes, dtypes) of `epoch`, without reading the arrays."""
    return self._manager_for(from_best).item_metadata(epoch)["state"]

  def newest_extras(self) -> Extras | None:
    """The extras of the newest latest epoch that reads back; None without any.

    DamagedCheckpoint when there are epochs and none reads back.
    """
    errors = []
    for epoch in sorted(self.latest.all_steps(), reverse=True):
      try:
        return self.restore_extras(epoch)
      except Exception as e:  # Orbax, tensorstore and json raise many types for damaged files.
        errors.append(f"{self.latest.directory / str(epoch)}: {_brief(e)}")
        warnings.warn(f"{errors[-1]}; trying the previous checkpoint", stacklevel=2)
    if errors:
      raise DamagedCheckpoint("; ".join(errors))
    return None

  def check_model_shapes(self, epoch: int, abstract_state, from_best: bool = False):
    """Raises IncompatibleCheckpoint when the saved params / batch_stats differ from `abstract_state`'s."""
    saved = _named_leaves(self.state_metadata(epoch, from_best))
    wanted = _named_leaves(abstract_state)
    differ = [f"{k}: {tuple(saved[k].shape) if k in saved else 'absent'} saved, "
              f"{tuple(wanted[k].shape) if k in wanted else 'absent'} now"
              for k in sorted(saved.keys() | wanted.keys())
              if k not in saved or k not in wanted or tuple(saved[k].shape) != tuple(wanted[k].shape)]
    if differ:
      raise IncompatibleCheckpoint(f"{len(differ)} model arrays differ in shape, e.g. {'; '.join(differ[:3])}")

  def saved_shapes(self, epoch: int, abstract_state, from_best: bool = False):
    """`abstract_state` with every leaf's shape as saved in `epoch`: the restore target of a checkpoint of the same
    kind of model with other sizes (e.g. fewer batch categories, for `clue_jax.train.adopt`)."""
    saved = {_leaf_name(path): leaf for path, leaf in
             jax.tree_util.tree_leaves_with_path(self.state_metadata(epoch, from_best))}

    def with_saved_shape(path, leaf):
      name = _leaf_name(path)
      if name not in saved:
        raise IncompatibleCheckpoint(f"{name} is not in the checkpoint of epoch {epoch}")
      return jax.ShapeDtypeStruct(tuple(saved[name].shape), leaf.dtype, sharding=leaf.sharding)

    return jax.tree_util.tree_map_with_path(with_saved_shape, abstract_state)

  def restore_state(self, epoch: int, abstract_state, from_best: bool = False):
    """The train state of `epoch`, placed as `abstract_state` (ShapeDtypeStructs with shardings) says.

    Raises IncompatibleCheckpoint for other model shapes and DamagedCheckpoint for a step that cannot be read back
    or whose state does not match the SHA-256 saved with it.
    """
    manager = self._manager_for(from_best)
    try:
      self.check_model_shapes(epoch, abstract_state, from_best)
      restored = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                meta=ocp.args.JsonRestore()))
    except IncompatibleCheckpoint:
      raise
    except Exception as e:  # Orbax, tensorstore and json raise many types for damaged files.
      raise DamagedCheckpoint(f"{manager.directory / str(epoch)} cannot be read ({_brief(e)})") from e
    expected = restored["meta"].get("state_sha256")
    if expected is not None and expected != state_digest(restored["state"]):
      raise DamagedCheckpoint(f"{manager.directory / str(epoch)}: the restored state does not match its SHA-256")
    return restored["state"]

  def restore_newest(self, abstract_state, from_best: bool = False):
    """(epoch, state) of the newest intact step; damaged newer steps are moved aside with a warning.

    None when there is no step; DamagedCheckpoint when every step is damaged (nothing is moved then).
    """
    manager = self._manager_for(from_best)
    epochs = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for epoch in epochs:
      try:
        state = self.restore_state(epoch, abstract_state, from_best)
      except DamagedCheckpoint as e:
        damaged.append((epoch, e))
        continue
      for bad, error in damaged:
        self._set_aside(manager, bad, "best" if from_best else "latest", error)
      return epoch, state
    if damaged:
      raise DamagedCheckpoint("; ".join(str(e) for _, e in damaged))
    return None

  def _set_aside(self, manager: ocp.CheckpointManager, epoch: int, kind: str, error: Exception):
    target = self.directory / "damaged" / f"{kind}-{epoch}"
    if parallel.is_main_process():  # Every process found the step damaged; process 0 moves it.
      if target.exists():
        shutil.rmtree(target)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(manager.directory / str(epoch), target)
    parallel.barrier("set_aside")
    manager.reload()
    warnings.warn(f"{error}; skipped it (moved to {target}) and used the previous checkpoint", stacklevel=3)

  def close(self):
    self.latest.close()
    self.best.close()


def abstract(tree, sharding):
  """ShapeDtypeStructs of `tree` with the given sharding (restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
