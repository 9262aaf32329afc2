"""The run directory: what a run saves beside its parameters, and how a saved run is found and rebuilt.

    <workdir>/config.json         the config (a resumed run must have the same, up to `config.BUDGET_KEYS`)
    <workdir>/cells.json          the cell IDs of the held-out pairs and of the validation split
    <workdir>/metrics.jsonl, tb/  one record per epoch (`train/writer.py`)
    <workdir>/checkpoints/        Orbax (`train/checkpoint.py`): each saved epoch holds the train state, the
                                  schedule, the fitted preprocessing and the `RunMeta`
    <workdir>/embeddings/         <modality>.h5ad and joint.h5ad, obsm["X_clue"]
    <workdir>/summary.json        written last: the run finished (its `restored_epoch` is the final model)
    <workdir>/rows/               with data.storage=disk: the training rows (`data/row_store.py`), rebuilt from the
                                  files whenever the run starts or resumes, removed when it finishes

A model is rebuilt from the constructor arguments in its `RunMeta` (`ModelArgs`, as scvi-tools keeps a model's
init arguments), never from the names of its parameters. Runs written before `RunMeta` held them (clue_jax up to
commit f495932) are read through `legacy_model_args`.
"""

import dataclasses
import json
import pathlib

import ml_collections
import numpy as np

from clue_jax import outputs
from clue_jax.data import dataset as data_lib
from clue_jax.model.network import CLUE, ModalitySpec
from clue_jax.train import checkpoint, parallel
from clue_jax.train.errors import NoFinishedRun

CONFIG, SUMMARY, ROWS = "config.json", "summary.json", "rows"


@dataclasses.dataclass(frozen=True)
class ModelArgs:
  """The `CLUE` module's constructor arguments: one `ModalitySpec` per modality (in subspace order) and every other
  keyword (the `model.*` keys that are `CLUE` fields, and `n_labels`)."""

  specs: tuple
  options: dict

  def build(self) -> CLUE:
    return CLUE(self.specs, **self.options)

  def to_json(self) -> dict:
    return {"specs": [s._asdict() for s in self.specs], "options": dict(self.options)}

  @classmethod
  def from_json(cls, saved: dict) -> "ModelArgs":
    return cls(tuple(ModalitySpec(**s) for s in saved["specs"]), dict(saved["options"]))


def model_options(model_config, n_labels: int) -> dict:
  """Every `model.*` key that is a `CLUE` field, and `n_labels`."""
  fields = {f.name for f in dataclasses.fields(CLUE)} - {"specs", "parent", "name"}
  return {**{k: v for k, v in model_config.items() if k in fields}, "n_labels": n_labels}


def model_args(config, dataset: data_lib.Dataset) -> ModelArgs:
  """The model `config` builds for `dataset`'s modalities."""
  specs = []
  for name, m in dataset.modalities.items():
    spec = config.data.modalities[name]
    input_dim = m.counts.shape[1] if m.rep is None else m.rep.shape[1]
    specs.append(ModalitySpec(name, input_dim, m.counts.shape[1], len(m.batch_categories), spec.likelihood,
                              normalize_input=m.rep is None and spec.likelihood == "NB"))
  has_labels = any(config.data.modalities[n].label_key for n in dataset.names)
  return ModelArgs(tuple(specs), model_options(config.model, len(dataset.label_categories) if has_labels else 0))


def legacy_model_args(config: dict, meta: dict, state_metadata) -> ModelArgs:
  """The model of a run saved before `RunMeta` held `ModelArgs`: encoder input widths read from the saved first
  encoder layer under the parameter names of that version."""
  config = ml_collections.ConfigDict(config)
  first = ("HiddenBlock_0", "Linear_0") if config.model.encoder_depth else ("loc",)
  specs = []
  for name in meta["modalities"]:
    node = state_metadata["params"][f"encoders_{name}"]["subspaces"]
    for key in first:
      node = node[key]
    spec = config.data.modalities[name]
    specs.append(ModalitySpec(name, int(node["kernel"].shape[-2]), len(meta["features"][name]),
                              len(meta["batch_categories"][name]), spec.likelihood,
                              normalize_input=spec.rep == "none" and spec.likelihood == "NB"))
  has_labels = any(config.data.modalities[n].label_key for n in meta["modalities"])
  return ModelArgs(tuple(specs), model_options(config.model, len(meta["label_categories"]) if has_labels else 0))


@dataclasses.dataclass(frozen=True)
class RunMeta:
  """What every checkpoint saves beside the state, schedule and fitted preprocessing arrays."""

  config: dict  # config.to_dict() of the run.
  model: ModelArgs
  features: dict  # modality -> decoder feature names, in subspace order.
  rep_features: dict  # modality -> the features its PCA / LSI was fitted on (fitted modalities only).
  batch_categories: dict  # modality -> tuple of batch names.
  label_categories: tuple
  preprocess_kind: dict  # modality -> "pca" | "lsi" (fitted modalities only).
  median_library: dict  # NB modality -> median total counts per training cell.

  @property
  def modalities(self) -> list:
    return list(self.features)

  def to_json(self) -> dict:
    return {"config": self.config, "model": self.model.to_json(), "modalities": self.modalities,
            "features": self.features, "rep_features": self.rep_features,
            "batch_categories": {n: list(c) for n, c in self.batch_categories.items()},
            "label_categories": list(self.label_categories), "preprocess_kind": self.preprocess_kind,
            "median_library": self.median_library}

  @classmethod
  def from_json(cls, saved: dict, state_metadata=None) -> "RunMeta":
    """From a checkpoint's meta; `state_metadata` (`Checkpoints.state_metadata`) is needed by legacy runs only."""
    model = (ModelArgs.from_json(saved["model"]) if "model" in saved
             else legacy_model_args(saved["config"], saved, state_metadata))
    return cls(config=saved["config"], model=model,
               features={n: list(saved["features"][n]) for n in saved["modalities"]},
               rep_features=dict(saved.get("rep_features", {})),
               batch_categories={n: tuple(c) for n, c in saved["batch_categories"].items()},
               label_categories=tuple(saved["label_categories"]), preprocess_kind=dict(saved["preprocess_kind"]),
               median_library=dict(saved.get("median_library", {})))

  def fitted(self, preprocess_tree: dict) -> data_lib.Fitted:
    """What `data_lib.load_dataset(fitted=...)` needs, from this meta and the saved preprocessing arrays."""
    states = {n: {} for n in self.modalities}
    for name, kind in self.preprocess_kind.items():
      states[name] = {"kind": np.array(kind), **{k: np.asarray(v) for k, v in preprocess_tree[name].items()}}
    return data_lib.Fitted(features=self.features, rep_features=self.rep_features, preprocess=states,
                           batch_categories=self.batch_categories, label_categories=self.label_categories)


def run_meta(config, dataset: data_lib.Dataset, args: ModelArgs) -> RunMeta:
  return RunMeta(
      config=config.to_dict(), model=args,
      features={n: m.features.tolist() for n, m in dataset.modalities.items()},
      rep_features={n: m.rep_features.tolist() for n, m in dataset.modalities.items() if m.rep_features is not None},
      batch_categories={n: tuple(m.batch_categories) for n, m in dataset.modalities.items()},
      label_categories=tuple(dataset.label_categories),
      preprocess_kind={n: str(m.preprocess["kind"]) for n, m in dataset.modalities.items() if m.preprocess},
      median_library={n: data_lib.median_total(m.counts) for n, m in dataset.modalities.items()
                      if config.data.modalities[n].likelihood == "NB"})


def preprocess_tree(dataset: data_lib.Dataset) -> dict:
  """The fitted preprocessing as a pytree of numeric arrays (never empty, as Orbax needs)."""
  tree = {"format": np.ones((), np.int32)}
  for name, m in dataset.modalities.items():
    if m.preprocess:
      tree[name] = {k: np.asarray(v) for k, v in m.preprocess.items() if k != "kind"}
  return tree


@dataclasses.dataclass(frozen=True)
class SavedEpoch:
  """A checkpointed epoch of a run, everything but its train state."""

  epoch: int
  from_best: bool  # Whether it is read from checkpoints/best (else checkpoints/latest).
  schedule: dict
  meta: RunMeta
  fitted: data_lib.Fitted


def saved_epoch(ckpts: checkpoint.Checkpoints, extras: checkpoint.Extras, from_best: bool = False) -> SavedEpoch:
  state_metadata = None if "model" in extras.meta else ckpts.state_metadata(extras.epoch, from_best)
  meta = RunMeta.from_json(extras.meta, state_metadata)
  return SavedEpoch(extras.epoch, from_best, extras.schedule, meta, meta.fitted(extras.preprocess))


def newest_epoch(ckpts: checkpoint.Checkpoints) -> SavedEpoch | None:
  """The newest latest epoch whose extras read back (the one a run resumes from); None without any.

  Raises `checkpoint.DamagedCheckpoint` when there are epochs and none reads back.
  """
  extras = ckpts.newest_extras()
  return None if extras is None else saved_epoch(ckpts, extras)


@dataclasses.dataclass
class FinishedRun:
  """The final model of a finished run: its config, checkpoints (close them when done) and saved epoch."""

  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  checkpoints: checkpoint.Checkpoints
  saved: SavedEpoch

  def restore_state(self, abstract_state):
    """The final model's train state, placed as `abstract_state` says (see `Checkpoints.restore_state`)."""
    return self.checkpoints.restore_state(self.saved.epoch, abstract_state, self.saved.from_best)

  def close(self):
    self.checkpoints.close()


def finished(workdir) -> FinishedRun:
  """The finished run in `workdir`: the epoch its summary.json names, from the best checkpoints if it is among them.

  Raises `NoFinishedRun` (the message names the missing file) when there is none.
  """
  workdir = pathlib.Path(workdir)
  for name in (SUMMARY, CONFIG):
    if not (workdir / name).is_file():
      raise NoFinishedRun(workdir, f"{workdir}: no finished run there (no {name})")
  config = ml_collections.ConfigDict(json.loads((workdir / CONFIG).read_text()))
  epoch = json.loads((workdir / SUMMARY).read_text())["restored_epoch"]
  ckpts = checkpoint.Checkpoints(workdir / "checkpoints", config.train.keep_best)
  try:
    from_best = epoch in ckpts.best.all_steps()
    if not from_best and epoch not in ckpts.latest.all_steps():
      raise NoFinishedRun(workdir, f"{workdir}: no checkpoint of its final epoch {epoch} (see {SUMMARY})")
    saved = saved_epoch(ckpts, ckpts.restore_extras(epoch, from_best), from_best)
  except BaseException:
    ckpts.close()
    raise
  return FinishedRun(workdir, config, ckpts, saved)


def write_cells(workdir: pathlib.Path, dataset: data_lib.Dataset):
  """cells.json: the held-out pairs' and the validation split's cell IDs (process 0 writes)."""
  if parallel.is_main_process():
    cells = {"heldout_pairs": dataset.heldout_names(), "validation": dataset.validation_names()}
    outputs.write_text_atomically(workdir / outputs.CELLS_FILE, json.dumps(cells))
