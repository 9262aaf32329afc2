"""Every configuration key of clue_jax and its default, in one place.

The config files in `configs/` start from `get_config()` and change a few fields. Defaults are the reference
library's (scglue 0.4.1 `SCCLUEModel`, docs/method.md §1.5, §2, §3).
"""

import copy
import difflib
import importlib.util
import json
import pathlib
import types

import ml_collections

# The embedded default data (shipped inside the package).
DATASETS = pathlib.Path(__file__).resolve().parent / "datasets"
LR_SCALING = ("none", "linear", "sqrt")  # train.lr_scaling rules (train/schedule.py: scaled_lr).
OPTIMIZERS = ("rmsprop", "adam", "lamb")  # train.optimizer update rules (train/steps.py: UPDATE_RULES).
STORAGES = ("auto", "memory", "disk")  # data.storage: where the training rows live.

AUTO = -1  # For epoch counts and patiences: use the reference's AUTO formula (docs/method.md §3.2).


def modality(path: str = "", likelihood: str = "NB", **overrides) -> ml_collections.ConfigDict:
  """One modality's data and model settings."""
  config = ml_collections.ConfigDict()
  config.path = path  # .h5ad file, or .h5mu file holding this modality (see `mod_key`).
  config.mod_key = ""  # Modality name inside an .h5mu file; "" = this modality's config name.
  config.layer = "counts"  # Raw counts: a layer name, or "X".
  # A modality kept inside another's AnnData: its counts are obsm[obsm_key] of the file at `path` (totalVI:
  # "protein_expression", a DataFrame whose columns are the features; openproblems: "mode2", with the feature names
  # in uns[var_names_key], "mode2_var"). `layer` is then not read. "" = the file's own X / layers.
  config.obsm_key = ""
  config.var_names_key = ""  # uns entry of the feature names when obsm[obsm_key] is an array.
  config.likelihood = likelihood  # NB | Normal | ZIN | ZILN | Bernoulli | MSE | RMSE.
  config.batch_key = ""  # obs column holding the batch covariate; "" = one batch.
  config.label_key = ""  # obs column with cell-type labels (supervised term); "" = none.
  # Decoder features: var["highly_variable"] when present, else `feature_selection` keeps `n_features` of them:
  # "all", "dispersion" (Seurat-v1 normalised dispersion on log-CP10k), or "total_counts" (ATAC rule).
  config.feature_selection = "dispersion"
  config.n_features = 2000
  # Encoder input: "pca" / "lsi" fitted on the training cells (docs/method.md §4.1), "obsm" (use `rep_key`), or
  # "none" (log1p-CP10k of the counts for NB, the raw values otherwise).
  config.rep = "pca"
  config.rep_key = ""  # obsm key when rep == "obsm".
  config.rep_dim = 100  # Components of the PCA/LSI (clamped to the number of features and cells).
  config.rep_layer = "X"  # Matrix the PCA is fitted on: a layer name or "X".
  config.rep_normalize = "none"  # Applied before the PCA: "none" | "log1p_cp10k" | "clr".
  config.rep_features = "all"  # PCA on "all" features or only the "decoder" features.
  # How the PCA is solved: "randomized" (the reference's randomized SVD, 15 power iterations: about 34 passes over
  # the training cells) or "gram" (exact top eigenvectors of the F x F Gram matrix of the standardised, clipped
  # cells, built in one pass after the two of the mean and std; cells x F^2 work, F^2 float64 memory: for up to a few
  # thousand features). LSI is always randomized.
  config.rep_solver = "randomized"
  config.rep_fit_cells = 0  # Fit the PCA / LSI on a seeded random subset of this many training cells; 0 = all.
  config.weight = 1.0  # modality_weight (rescaled to mean 1 over modalities).
  config.update(overrides)
  return config


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.modalities = ml_collections.ConfigDict()  # name -> modality(); config order = modality order.
  config.data.modality_order = ""  # Comma-separated names; "" = sorted names. Fixes the subspace order.
  config.data.pair_by = "obs_names"  # "obs_names" pairs cells across modalities; "none" makes all unpaired.
  config.data.fingerprint = ""  # Set by clue_jax.fit: shapes and hashes of the in-memory inputs it trained on.
  config.data.val_split = 0.1  # Fraction of cell IDs held out for the validation loss.
  config.data.heldout_pairs = 0.0  # Fraction of paired IDs whose pairing is hidden (held-out FOSCTTM check).
  config.data.count_check = "warn"  # Non-integer counts under NB: "warn" or "error".
  # Where the training rows live: "memory" reads each file whole; "disk" reads the files a block of rows at a time
  # into a store in the workdir (rows/) that minibatches are read from, so memory does not grow with the cells (set
  # rep_fit_cells too: the PCA / LSI fit holds its cells); "auto" picks disk when the files' count matrices hold more
  # than a tenth of this machine's memory (AnnData given to clue_jax.fit stays in memory). Both train the same model.
  config.data.storage = "auto"

  config.model = ml_collections.ConfigDict()
  config.model.latent_dim = 50  # Per subspace; the embedding has K * latent_dim dimensions.
  config.model.encoder_depth = 2
  config.model.encoder_width = 256
  config.model.decoder_depth = 2
  config.model.decoder_width = 256
  config.model.discriminator_depth = 2
  config.model.discriminator_width = 256
  config.model.dropout = 0.2
  config.model.shared_batches = False  # Condition the discriminator on the batch one-hot.
  config.model.normalize_u = True  # L2-normalise the sampled embeddings (docs/method.md §2).
  # Ablation: one latent shared by all modalities instead of modality-specific subspaces (same total width).
  config.model.shared_latent = False
  # "bfloat16": mixed precision, bf16 matmul operands with float32 accumulation; parameters, BatchNorm, losses and
  # optimiser stay float32 (an addition to the reference, which computes in float32 throughout).
  config.model.matmul_dtype = "float32"
  # Activation of the NB library-size heads: "relu" as the reference, or "softplus", which cannot die (a ReLU head
  # can end up outputting 0 for every cell, and its decoder's means with it; an addition to the reference).
  config.model.library_activation = "relu"

  config.loss = ml_collections.ConfigDict()
  config.loss.lam_data = 1.0
  config.loss.lam_kl = 1.0
  config.loss.lam_joint_cross = 0.02
  config.loss.lam_real_cross = 0.02
  config.loss.lam_cos = 0.02
  config.loss.lam_align = 0.02
  config.loss.lam_sup = 0.02
  # Beyond the reference (0 = off): symmetric InfoNCE between the L2-normalised posterior means of each pair of
  # modalities over the cells of the batch observed in both (MatchCLOT-style), at softmax temperature `temperature`.
  config.loss.lam_contrastive = 0.0
  config.loss.temperature = 0.1

  config.train = ml_collections.ConfigDict()
  config.train.lr = 2e-3
  config.train.batch_size = 128  # Global batch; must be divisible by the device count.
  # Learning rate at other batch sizes: "none" (train.lr as given, the reference), "linear" or "sqrt" (train.lr is
  # the rate at batch 128, scaled by the batch ratio or its square root; the AUTO epoch counts use the scaled rate).
  config.train.lr_scaling = "none"
  # Update rule of both optimisers: "rmsprop" (the reference's, PyTorch semantics), "adam" or "lamb" (Adam with a
  # layer-wise trust ratio, for large batches); train.lr is their learning rate.
  config.train.optimizer = "rmsprop"
  config.train.warmup_epochs = 0  # Linear learning-rate warm-up: epoch e <= W uses lr * e / (W + 1); 0 = none.
  config.train.max_epochs = AUTO
  config.train.align_burnin = AUTO
  config.train.patience = AUTO  # Early stopping (after burn-in); 0 disables it.
  config.train.reduce_lr_patience = AUTO  # ReduceLROnPlateau (factor 0.1) on both optimisers; 0 disables it.
  config.train.auto_epoch_cap = 1000  # AUTO values are scaled down together so max_epochs <= this cap.
  # Early stopping / best checkpoints on "val_loss" (the reference), "heldout_foscttm" (the hidden pairs) or
  # "unseen_foscttm" (the validation cells measured in two modalities, never trained on).
  config.train.monitor = "val_loss"
  config.train.keep_best = 3  # Best checkpoints kept; the latest of them is restored at the end.
  config.train.checkpoint_interval_s = 30.0  # Latest checkpoint at most this often (and at the end); 0 = every epoch.
  config.train.steps_per_dispatch = 8  # Train steps run in one jitted loop (one dispatch).
  # Keep the training data on the devices (sparse counts as CSR) and gather each minibatch inside the step;
  # False densifies minibatches on the host and sends them (for data that does not fit in device memory).
  config.train.data_on_device = True
  config.train.num_devices = 0  # 0 = all local devices.
  config.train.progress = True  # Progress bar on stderr.
  # JAX's persistent compilation cache, so that the next run of the same model does not compile again: "auto" (a
  # per-user directory, $XDG_CACHE_HOME/clue_jax/jit or ~/.cache/clue_jax/jit), a directory, or "" (off). A cache
  # directory set before training (jax.config) is left as it is.
  config.train.compilation_cache = "auto"

  # Evaluation during and after training (clue_jax/evaluate/); none of it changes the training itself.
  config.evals = ml_collections.ConfigDict()
  config.evals.every_epochs = 0  # Score the model every this many epochs into metrics.jsonl as eval/*; 0 = never.
  config.evals.metrics = "foscttm,top1,label_transfer"  # Comma-separated subset of foscttm,top1,label_transfer,joint.
  config.evals.max_cells = 1000  # Cell IDs scored (a fixed seeded subset), to keep it cheap.
  config.evals.label_key = ""  # obs column of cell types to score with; "" = a modality's label_key, else cell_type.
  config.evals.batch_key = ""  # obs column of batches; "" = a modality's batch_key, else batch.
  config.evals.plots = True  # Write plots/*.png at the end of training.
  return config


def competition_cite(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The competition's CITE-seq model sizes and weights (docs/method.md §1.5, §2)."""
  config.seed = 5
  config.model.latent_dim = 20
  config.model.encoder_width = 512
  config.model.decoder_depth = 1
  config.model.decoder_width = 128
  config.model.discriminator_width = 128
  config.model.shared_batches = True
  config.loss.lam_joint_cross = 2.0
  config.loss.lam_cos = 1.0
  config.loss.lam_align = 2.0
  return config


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the allowed values."""


def _check(ok: bool, key: str, value, allowed: str):
  if not ok:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(config: ml_collections.ConfigDict):
  """Rejects impossible values before any data is read or anything is compiled."""
  # Imported here so that config files load without pulling in JAX.
  from clue_jax.data.preprocess import PCA_SOLVERS
  from clue_jax.evaluate import evaluation
  from clue_jax.model.network import LIKELIHOODS

  names = list(config.data.modalities.keys())
  _check(len(names) >= 2, "data.modalities", names, "configure at least two modalities")
  for name in names:
    spec, key = config.data.modalities[name], f"data.modalities.{name}"
    _check(spec.likelihood in LIKELIHOODS, f"{key}.likelihood", spec.likelihood, f"one of {LIKELIHOODS}")
    _check(spec.rep in ("pca", "lsi", "obsm", "none"), f"{key}.rep", spec.rep, "pca, lsi, obsm or none")
    _check(spec.rep != "obsm" or bool(spec.rep_key), f"{key}.rep_key", spec.rep_key,
           "name the obsm key when rep is 'obsm'")
    _check(spec.rep_dim > 0, f"{key}.rep_dim", spec.rep_dim, "a positive integer")
    _check(spec.n_features > 0, f"{key}.n_features", spec.n_features, "a positive integer")
    _check(spec.feature_selection in ("all", "dispersion", "total_counts"), f"{key}.feature_selection",
           spec.feature_selection, "all, dispersion or total_counts")
    _check(spec.rep_normalize in ("none", "log1p_cp10k", "clr"), f"{key}.rep_normalize", spec.rep_normalize,
           "none, log1p_cp10k or clr")
    _check(spec.rep_features in ("all", "decoder"), f"{key}.rep_features", spec.rep_features, "all or decoder")
    _check(spec.rep_solver in PCA_SOLVERS, f"{key}.rep_solver", spec.rep_solver, " or ".join(PCA_SOLVERS))
    _check(spec.rep_solver != "gram" or spec.rep != "lsi", f"{key}.rep_solver", spec.rep_solver,
           "LSI is solved by randomized SVD only (its Gram matrix over 10^4+ peaks is too large); use randomized, "
           "and rep_fit_cells to bound the cost")
    _check(spec.rep_fit_cells >= 0, f"{key}.rep_fit_cells", spec.rep_fit_cells, "0 (all) or a positive integer")
    _check(spec.weight > 0, f"{key}.weight", spec.weight, "a positive number")
  _check(config.data.pair_by in ("obs_names", "none"), "data.pair_by", config.data.pair_by, "obs_names or none")
  _check(0 <= config.data.val_split < 1, "data.val_split", config.data.val_split, "a fraction in [0, 1)")
  _check(0 <= config.data.heldout_pairs < 1, "data.heldout_pairs", config.data.heldout_pairs,
         "a fraction in [0, 1)")
  _check(config.data.count_check in ("warn", "error"), "data.count_check", config.data.count_check,
         "warn or error")
  _check(config.data.storage in STORAGES, "data.storage", config.data.storage, " or ".join(STORAGES))
  for key in ("latent_dim", "encoder_width", "decoder_width", "discriminator_width"):
    _check(config.model[key] > 0, f"model.{key}", config.model[key], "a positive integer")
  for key in ("encoder_depth", "decoder_depth", "discriminator_depth"):
    _check(config.model[key] >= 0, f"model.{key}", config.model[key], "an integer >= 0")
  _check(0 <= config.model.dropout < 1, "model.dropout", config.model.dropout, "a probability in [0, 1)")
  _check(config.model.matmul_dtype in ("float32", "bfloat16"), "model.matmul_dtype", config.model.matmul_dtype,
         "float32 or bfloat16")
  _check(config.model.library_activation in ("relu", "softplus"), "model.library_activation",
         config.model.library_activation, "relu or softplus")
  for key, value in config.loss.items():
    _check(value >= 0, f"loss.{key}", value, "a number >= 0")
  train = config.train
  _check(train.lr > 0, "train.lr", train.lr, "a positive number")
  _check(config.loss.lam_contrastive >= 0, "loss.lam_contrastive", config.loss.lam_contrastive, "a number >= 0")
  _check(config.loss.temperature > 0, "loss.temperature", config.loss.temperature, "a positive number")
  _check(train.lr_scaling in LR_SCALING, "train.lr_scaling", train.lr_scaling, f"one of {LR_SCALING}")
  _check(train.optimizer in OPTIMIZERS, "train.optimizer", train.optimizer, f"one of {OPTIMIZERS}")
  _check(train.warmup_epochs >= 0, "train.warmup_epochs", train.warmup_epochs, "an integer >= 0")
  _check(train.batch_size > 0, "train.batch_size", train.batch_size, "a positive integer")
  for key in ("max_epochs", "align_burnin", "patience", "reduce_lr_patience"):
    _check(train[key] == AUTO or train[key] >= 0 and (key != "max_epochs" or train[key] > 0), f"train.{key}",
           train[key], f"{AUTO} (AUTO) or a non-negative integer (max_epochs: positive)")
  _check(train.auto_epoch_cap >= 0, "train.auto_epoch_cap", train.auto_epoch_cap, "0 (no cap) or a positive integer")
  _check(train.monitor in ("val_loss", "heldout_foscttm", "unseen_foscttm"), "train.monitor", train.monitor,
         "val_loss, heldout_foscttm or unseen_foscttm")
  _check(train.monitor != "unseen_foscttm" or config.data.val_split > 0, "train.monitor", train.monitor,
         "unseen_foscttm needs data.val_split > 0")
  _check(train.monitor != "heldout_foscttm" or config.data.heldout_pairs > 0, "train.monitor", train.monitor,
         "heldout_foscttm needs data.heldout_pairs > 0")
  _check(train.keep_best > 0, "train.keep_best", train.keep_best, "a positive integer")
  _check(train.checkpoint_interval_s >= 0, "train.checkpoint_interval_s", train.checkpoint_interval_s,
         "seconds >= 0")
  _check(train.steps_per_dispatch > 0, "train.steps_per_dispatch", train.steps_per_dispatch, "a positive integer")
  _check(train.num_devices >= 0, "train.num_devices", train.num_devices, "0 (all) or a positive integer")
  _check(config.evals.every_epochs >= 0, "evals.every_epochs", config.evals.every_epochs,
         "0 (off) or a positive integer")
  _check(config.evals.max_cells > 1, "evals.max_cells", config.evals.max_cells, "an integer > 1")
  try:
    evaluation.parse_metrics(config.evals.metrics)
  except ValueError as e:
    raise ConfigError(f"evals.metrics={config.evals.metrics!r}: {e}") from e


def leaves(config, prefix: str = ""):
  """(dotted key, value) for every non-group field of a ConfigDict or of its `to_dict()`."""
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def default_value(key: str):
  """The default of a dotted key (`model.matmul_dtype`, `data.modalities.rna.weight`); KeyError if it has none."""
  parts = key.split(".")
  if parts[:2] == ["data", "modalities"] and len(parts) == 4:
    return modality()[parts[3]]
  return dict(leaves(get_config()))[key]


def _typed(key: str, default, value):
  """`value` as the field's type, accepting what the command line's parser for that type accepts."""
  expected = type(default)
  if expected not in (bool, int, float, str):
    raise ConfigError(f"{key} holds a {expected.__name__}; only bool, int, float and str fields can be overridden")
  if expected is float and type(value) is int:
    return float(value)
  if type(value) is not expected:
    raise ConfigError(f"{key}={value!r} has type {type(value).__name__}; expected {expected.__name__} "
                      f"(its default is {default!r})")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with flat overrides such as `{"loss.lam_align": 0.0}`, checked as `--config.KEY=VALUE` is."""
  config = copy.deepcopy(config)
  known = dict(leaves(config))
  for key, value in overrides.items():
    if key not in known:
      inside = [k for k in known if k.startswith(f"{key}.")]
      close = inside[:3] or difflib.get_close_matches(key, known, n=3)
      hint = (f"did you mean {' or '.join(close)}?" if close else "every key is listed in clue_jax/config.py")
      raise ConfigError(f"unknown config key {key!r}: {hint}")
    parent, _, field = key.rpartition(".")
    group = config
    for part in parent.split(".") if parent else ():
      group = group[part]
    group[field] = _typed(key, known[key], value)
  return config


def parse_overrides(items) -> dict:
  """{"loss.lam_kl": 0.1} from ["loss.lam_kl=0.1"] (an experiment's repeatable --override flag): each VALUE read as
  JSON, else kept as a string; `apply_overrides` checks keys and types."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"--override={item!r}: expected KEY=VALUE, e.g. loss.lam_kl=0.1")
    try:
      out[key] = json.loads(value)
    except json.JSONDecodeError:
      out[key] = value
  return out


def comparable(config_dict: dict) -> dict:
  """The config without the keys that may change between a run and its resumption."""
  out = json.loads(json.dumps(config_dict))
  out["train"].pop("progress", None)
  out["train"].pop("compilation_cache", None)  # Where compiled programs are kept does not change training.
  out["data"].pop("storage", None)  # Nor where the rows are kept.
  out.pop("evals", None)  # Evaluation settings do not change training.
  return out


def same_config(saved: dict, current: dict) -> bool:
  """Whether a saved run's config (config.to_dict() as saved) trains what `current` trains.

  Beyond `comparable`, a key the saved config lacks counts as equal while `current` holds its default: keys that
  clue_jax added after the run was written (e.g. `model.matmul_dtype`) do not orphan older runs.
  """
  saved, current = dict(leaves(comparable(saved))), dict(leaves(comparable(current)))
  for key in current.keys() - saved.keys():
    try:
      if current[key] != default_value(key):
        return False
    except KeyError:
      return False
    saved[key] = current[key]
  return saved == current


# Keys that may change on a run's workdir without making it another run: the run goes on from its latest checkpoint.
BUDGET_KEYS = ("train.max_epochs", "train.patience", "train.reduce_lr_patience")


def budget_changes(saved: dict, current: dict) -> dict | None:
  """{key: [saved, current]} of the BUDGET_KEYS that differ, when no other key does (by `same_config`); else None."""
  def without_budget(config_dict):
    out = json.loads(json.dumps(config_dict))
    for key in BUDGET_KEYS:
      out["train"].pop(key.split(".")[1], None)
    return out

  if not same_config(without_budget(saved), without_budget(current)):
    return None
  saved_train = saved.get("train", {})
  return {k: [saved_train.get(k.split(".")[1]), current["train"][k.split(".")[1]]] for k in BUDGET_KEYS
          if saved_train.get(k.split(".")[1]) != current["train"][k.split(".")[1]]}


# ------------------------------------------------------------------------------------------------ config files
def load_module(path) -> types.ModuleType:
  """Executes the config file at `path` (configs/ is not a package) and returns it as a module."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location(f"clue_jax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def split_spec(spec: str) -> tuple[pathlib.Path, tuple[str, ...]]:
  """`configs/pbmc.py:competition` -> (path, ("competition",)): everything after the first colon is get_config's
  argument."""
  path, colon, argument = spec.partition(":")
  return pathlib.Path(path), (argument,) if colon else ()
