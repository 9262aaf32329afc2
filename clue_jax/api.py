"""Notebook API on a finished run: embed, translate and match AnnData / MuData with a trained model.

    run = clue_jax.load("runs/cite")
    emb = run.encode(rna, "rna")                    # AnnData: obs of `rna`, obsm["X_clue"]
    adt_hat = run.predict(rna, "rna", "adt")        # AnnData: obs of `rna`, var = the run's ADT features
    matches = run.match(rna, "rna", adt, "adt")     # official-format pairing matrix + best partner per cell
    Ensemble([run, clue_jax.load("runs/cite_2")]).match(rna, "rna", adt, "adt")   # several runs as one

Inputs are AnnData, or MuData (anything with `.mod`) holding the modality under its name or its configured
`mod_key`. They go through exactly the run's preprocessing: features aligned by name to the training features
(missing ones are an error naming them), the saved PCA / LSI re-applied, or the configured obsm key read. Nothing is
written into the inputs unless `inplace=True` says so. The math lives in `evaluate/matching.py` and
`evaluate/prediction.py`; the run directory in `train/run_dir.py`; this module holds the run's state, its
preprocessing and the devices. Training from a notebook is `clue_jax.fit` (`clue_jax/fitting.py`).
"""

import math
from typing import NamedTuple

import anndata as ad
import jax
import mudata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from clue_jax.data import dataset as data_lib
from clue_jax.evaluate import matching, prediction
from clue_jax.model.network import CLUE
from clue_jax.train import checkpoint, encoding, parallel, run_dir, steps
from clue_jax.train.errors import NoFinishedRun


class RunError(ValueError):
  """A run directory that cannot be used, or an argument that does not fit the run; the message says the fix."""


class Matching(NamedTuple):
  """`matrix`: cells of a (rows) x cells of b (columns), rows summing to 1 (the competition's format);
  `partner`: for each cell of a (index), the obs_name of its most likely partner in b."""

  matrix: sp.csr_matrix
  partner: pd.Series


def load(workdir) -> "Run":
  """The final model of the finished run in `workdir` and its preprocessing, on all local devices.

  Args:
    workdir: the `--workdir` of a finished training run (or of `clue_jax.fit`).

  Returns:
    A `Run` at the checkpoint its summary.json names. Raises `RunError` when `workdir` holds no finished run.
  """
  try:
    finished = run_dir.finished(workdir)
  except NoFinishedRun as e:
    raise RunError(f"{e}; point load() at the --workdir of a run that completed, or finish it with "
                   f"`python -m clue_jax.train --config=... --workdir={workdir}`") from e
  try:
    model = finished.saved.meta.model.build()
    mesh = parallel.make_mesh()
    optimizer = finished.config.train.get("optimizer", "rmsprop")  # Runs from before train.optimizer: RMSprop.
    shapes = jax.eval_shape(lambda: steps.init_state(model, jax.random.key(0), optimizer))
    state = finished.restore_state(checkpoint.abstract(shapes, parallel.replicated(mesh)))
  finally:
    finished.close()
  return Run(finished.workdir, finished.config, finished.saved, model, state, mesh)


class Run:
  """A trained model with its preprocessing (`load` makes one); see the module docstring.

  Attributes:
    workdir: the run directory. config: its config. model: the `CLUE` module. state: the train state of the final
    model. epoch: the epoch of that model. modalities: the modality names, in subspace order.
  """

  def __init__(self, workdir, config, saved: run_dir.SavedEpoch, model: CLUE, state, mesh):
    self.workdir, self.config, self.model, self.state, self.epoch = workdir, config, model, state, saved.epoch
    self._saved, self._mesh = saved, mesh
    self._specs = {s.name: s for s in model.specs}
    self._compiled = {}
    self._median_cache = {}

  def __repr__(self):
    return f"Run({str(self.workdir)!r}, epoch {self.epoch}, modalities {list(self.modalities)})"

  @property
  def modalities(self) -> tuple:
    return self.model.names

  def features(self, modality: str) -> pd.Index:
    """The modality's decoder features, in the model's order."""
    return pd.Index(self._saved.meta.features[self._check_modality(modality)])

  def batch_categories(self, modality: str) -> tuple:
    """The modality's batch names, in the order of the model's batch indices."""
    return tuple(self._saved.meta.batch_categories[self._check_modality(modality)])

  # ---------------------------------------------------------------------------------------------------- encode
  def encode(self, adata, modality: str | None = None, key_added: str = "X_clue", inplace: bool = False):
    """Posterior means over all K x latent_dim dimensions of `modality`'s cells.

    Args:
      adata: an AnnData of the modality, or a MuData holding it.
      modality: one of `self.modalities`; None encodes every modality of the run that the MuData `adata` holds,
        each into its `mod[m].obsm[key_added]`, and the joint embedding (per cell, the mean over the modalities it
        was measured in, as training averages them) into the MuData's `obsm[key_added]`.
      key_added: the obsm key written.
      inplace: write into the given object instead of a new one.

    Returns:
      A new AnnData (obs copied, the embedding in obsm[key_added]) or, without `modality`, a new MuData; None with
      `inplace=True`.
    """
    if modality is None:
      return self._encode_mudata(adata, key_added, inplace)
    cells = self._modality_data(adata, modality, written=inplace)
    embedding = self._embed(cells, modality)
    if inplace:
      cells.obsm[key_added] = embedding
      return None
    out = ad.AnnData(obs=cells.obs.copy())
    out.obsm[key_added] = embedding
    return out

  def _encode_mudata(self, mdata, key_added: str, inplace: bool):
    if not hasattr(mdata, "mod"):
      raise RunError(f"encode() without a modality encodes a MuData; for one {type(mdata).__name__} name its "
                     f"modality, e.g. encode(adata, {self.modalities[0]!r})")
    present = [m for m in self.modalities if (self.config.data.modalities[m].mod_key or m) in mdata.mod]
    if not present:
      raise RunError(f"the MuData holds none of this run's modalities {list(self.modalities)} (it has "
                     f"{list(mdata.mod)})")
    encoded = {m: self.encode(mdata, m, key_added, inplace) for m in present}
    if inplace:
      mdata.obsm[key_added] = self._joint(mdata, {m: self._modality_data(mdata, m) for m in present}, key_added)
      return None
    out = mudata.MuData({self.config.data.modalities[m].mod_key or m: e for m, e in encoded.items()})
    out.obsm[key_added] = self._joint(out, {m: self._modality_data(out, m) for m in present}, key_added)
    return out

  @staticmethod
  def _joint(mdata, cells: dict, key: str) -> np.ndarray:
    """(mdata's cells, dims): the mean of `cells[m].obsm[key]` over the modalities each cell is in (NaN for cells
    in none of them)."""
    total, count = 0.0, np.zeros(mdata.n_obs)
    for name, adata in cells.items():
      rows = mdata.obs_names.get_indexer(adata.obs_names)
      if (rows < 0).any():
        raise RunError(f"{int((rows < 0).sum())} cells of modality {name!r} are not in the MuData's obs_names; call "
                       f"mdata.update() after changing its modalities")
      values = np.zeros((mdata.n_obs, adata.obsm[key].shape[1]), np.float64)
      values[rows] = adata.obsm[key]
      total, count[rows] = total + values, count[rows] + 1
    with np.errstate(invalid="ignore"):
      return (total / count[:, None]).astype(np.float32)

  def _embed(self, cells: ad.AnnData, modality: str) -> np.ndarray:
    rep, counts = self._encoder_inputs(cells, modality, with_library=False)
    fn = self._compiled_fn(("encode", modality), lambda: steps.make_encode(self.model, modality))
    return self._in_chunks(fn, rep, counts)

  def representation(self, adata, modality: str):
    """The encoder input of `modality`'s cells as this run computes it: its PCA / LSI re-applied (or the configured
    obsm representation), as a (cells, dims) float32 array; None for a modality whose encoder reads the counts."""
    rep, _ = self._encoder_inputs(self._modality_data(adata, modality), modality, with_library=False)
    return rep

  # --------------------------------------------------------------------------------------------------- predict
  def predict(self, adata, source, target: str, batch: str | None = None, normalized=False,
              library_size=None) -> ad.AnnData:
    """The target modality's expected values for the source cells in `adata`.

        run.predict(rna, "rna", "adt")                            # from one modality
        run.predict(mdata, source=("rna", "atac"), target="adt")  # from the cells' joint embedding of two

    Args:
      adata: an AnnData of the source modality, or a MuData holding it (every source, for several).
      source, target: two of `self.modalities`; `source` may be a tuple of them (not the target): the target is then
        decoded from the cells' joint embedding, the mean over the sources of their posterior means (each
        L2-normalised and the mean re-normalised when the model was trained with `normalize_u`, as training forms
        it). The cells are those of the first source, each of which must be in every other source (matched by
        obs_name; other cells there are ignored). A one-element tuple is the single-source prediction.
      batch: the target batch every cell is decoded with; None = each cell's own (obs column of the target's
        `batch_key`), which the target must know.
      normalized: False (the likelihood's scale), "clr" (Seurat's CLR of the expected counts, the competition's ADT
        scale) or "log1p" / True (log1p of the expected counts rescaled to the target's median training total, a
        log-normalised scale like the competition's GEX); NB targets only.
      library_size: NB targets: a number or one per cell; default: the source encoder's estimate when the source is
        NB (of several sources, the first NB one), else the target's median total counts over its training cells.

    Returns:
      A new AnnData: obs copied from the source cells, var = the target's training features, X = the mean of the
      target decoder's distribution (NB: expected counts at the library size; Bernoulli: probabilities; ZIN / ZILN:
      zero inflation included).
    """
    sources = self._check_sources(source if isinstance(source, (tuple, list)) else (source,), target)
    target = self._check_modality(target)
    scale = self._check_scale(normalized, target)
    cells = self._source_cells(adata, sources)
    first = cells[sources[0]]
    batch_index = self._target_batches(first, target, batch)
    nb_target = self._specs[target].likelihood == "NB"
    nb_sources = [m for m in sources if self._specs[m].likelihood == "NB"]
    library_source = nb_sources[0] if nb_target and library_size is None and nb_sources else None
    if nb_target and library_size is None and library_source is None:
      library_size = self._median_library(target)
    library = self._library_sizes(library_size, first.n_obs, target)
    inputs = [self._encoder_inputs(cells[m], m, with_library=m == library_source) for m in sources]
    reps, counts = tuple(rep for rep, _ in inputs), tuple(c for _, c in inputs)
    fn = self._compiled_fn(("predict", sources, target, library_source), lambda: prediction.make_predict(
        self.model, sources, target, library_source))
    values = encoding.in_chunks(fn, self.state, self._mesh, np.arange(first.n_obs), lambda rows: (
        tuple(None if r is None else r[rows] for r in reps), tuple(c[rows].toarray() for c in counts),
        batch_index[rows], library[rows]))
    total = self._median_library(target) if scale == "log1p" else None
    out = ad.AnnData(X=prediction.on_scale(values, scale, total), obs=first.obs.copy(),
                     var=pd.DataFrame(index=self.features(target)))
    out.uns["clue_prediction"] = {"source": sources[0] if len(sources) == 1 else list(sources), "target": target,
                                  "scale": scale}
    return out

  def _check_sources(self, sources, target: str) -> tuple:
    sources = tuple(self._check_modality(name) for name in sources)
    if not sources:
      raise RunError("source=(): name at least one source modality")
    if len(set(sources)) < len(sources):
      raise RunError(f"source={sources!r} names a modality twice")
    if sources == (target,):
      raise RunError(f"source and target are both {target!r}; predict() translates between two modalities")
    if target in sources:
      raise RunError(f"the target {target!r} is among the sources {list(sources)}; predict() translates from other "
                     f"modalities")
    return sources

  def _source_cells(self, adata, sources: tuple) -> dict:
    """{source: its cells}: those of `adata` for one source; for several, the first source's cells of the MuData
    and, in their order, the same cells of every other source."""
    if len(sources) > 1 and not hasattr(adata, "mod"):
      raise RunError(f"predicting from several sources {list(sources)} takes a MuData holding each of them, got "
                     f"{type(adata).__name__}")
    first = self._modality_data(adata, sources[0])
    if first.n_obs == 0:
      raise RunError("no cells given")
    cells = {sources[0]: first}
    for name in sources[1:]:
      other = self._modality_data(adata, name)
      rows = other.obs_names.get_indexer(first.obs_names)
      if (rows < 0).any():
        missing = list(first.obs_names[rows < 0][:3])
        raise RunError(f"{int((rows < 0).sum())} of the {first.n_obs} cells of {sources[0]!r} are not in {name!r} "
                       f"(e.g. {missing}); predicting from {list(sources)} needs every cell in every source: subset "
                       f"the MuData to the cells they share")
      cells[name] = other[rows]
    return cells

  def _check_scale(self, normalized, target: str) -> str:
    scale = {False: "counts", None: "counts", True: "log1p"}.get(normalized, normalized)
    if scale not in prediction.SCALES:
      raise RunError(f"normalized={normalized!r}: use False, 'log1p' (or True) or 'clr'")
    likelihood = self._specs[target].likelihood
    if scale != "counts" and likelihood != "NB":
      raise RunError(f"normalized={normalized!r} transforms predicted counts, but {target!r} uses likelihood "
                     f"{likelihood}: its predictions are already on its training data's scale; use normalized=False")
    return scale

  def _target_batches(self, cells: ad.AnnData, target: str, batch) -> np.ndarray:
    """The target batch index of every cell (see `predict`)."""
    categories = self.batch_categories(target)
    key = self.config.data.modalities[target].batch_key
    if batch is not None:
      if str(batch) not in categories:
        raise RunError(f"batch={batch!r} is not a batch of {target!r}; known: {list(categories)}")
      return np.full(cells.n_obs, categories.index(str(batch)), np.int32)
    if not key:
      return np.zeros(cells.n_obs, np.int32)
    if key not in cells.obs:
      raise RunError(f"obs has no column {key!r} (the batch key of {target!r}) to decode each cell with its own "
                     f"batch; add it, or pass batch=<one of {list(categories)}>")
    codes, _ = data_lib.obs_codes(cells, key, "the source cells", f"data.modalities.{target}.batch_key", categories)
    if (codes < 0).any():
      unknown = sorted({str(v) for v in cells.obs[key][codes < 0]})
      raise RunError(f"{int((codes < 0).sum())} cells have a batch that {target!r} was not trained with "
                     f"({unknown[:5]}); known: {list(categories)}. Pass batch=<one of them> to decode every cell "
                     f"with that batch")
    return codes

  def _library_sizes(self, library_size, n: int, target: str) -> np.ndarray:
    """Per-cell library sizes for an NB target (ones, unused, for other targets or the source's estimate)."""
    if library_size is None:
      return np.ones(n, np.float32)
    if self._specs[target].likelihood != "NB":
      raise RunError(f"library_size applies to NB targets; {target!r} uses {self._specs[target].likelihood}")
    sizes = np.asarray(library_size, np.float32)
    sizes = np.full(n, sizes, np.float32) if sizes.ndim == 0 else sizes
    if sizes.shape != (n,) or not (np.isfinite(sizes) & (sizes > 0)).all():
      raise RunError(f"library_size must be a positive number or one positive number per cell ({n}); got shape "
                     f"{sizes.shape}")
    return sizes

  def _median_library(self, target: str) -> float:
    """Median total counts of the target's features over the cells of its training file: saved with the run (runs
    older than that read the training file once)."""
    if target in self._saved.meta.median_library:
      return self._saved.meta.median_library[target]
    if target not in self._median_cache:
      spec = self.config.data.modalities[target]
      trained = {"features": self._saved.meta.features[target], "rep_features": None}
      try:
        raw = data_lib.read_modality(target, spec, self.config.data.count_check, trained)
      except data_lib.DataError as e:
        raise RunError(f"the library size of {target!r} defaults to its median over the training cells, but the "
                       f"training file cannot be read ({e}); pass library_size=<a number>") from e
      self._median_cache[target] = data_lib.median_total(data_lib.decoder_counts(raw, target))
    return self._median_cache[target]

  # ----------------------------------------------------------------------------------------------------- match
  def match(self, adata_a, modality_a: str, adata_b, modality_b: str, method: str = "snn", k: int = 1,
            batch_key: str | None = None, epsilon: float = 0.01, n_iter: int = 500,
            top_k: int = matching.MAX_NONZEROS_PER_ROW) -> Matching:
    """Matches the cells of `adata_a` to those of `adata_b` in the shared embedding.

    Args:
      adata_a, modality_a, adata_b, modality_b: the two sets of cells (AnnData, or MuData holding the modality).
      method: "snn" (shared nearest neighbours, `k` of them, as the competition) or "sinkhorn" (entropic optimal
        transport, `epsilon`, at most `n_iter` iterations, `top_k` weights kept per row).
      batch_key: an obs column of both: cells match only within their batch.

    Returns:
      A `Matching`: the (a cells x b cells) pairing matrix, rows summing to 1, and each a cell's best partner.
    """
    return _match_cells(self, adata_a, modality_a, adata_b, modality_b, method, k, batch_key, epsilon, n_iter, top_k)

  # ------------------------------------------------------------------------------------------------ plumbing
  def _check_modality(self, modality: str) -> str:
    if modality not in self._specs:
      raise RunError(f"unknown modality {modality!r}; this run has {list(self.modalities)}")
    return modality

  def _modality_data(self, adata, modality: str, written: bool = False) -> ad.AnnData:
    """The AnnData of `modality`: `adata` itself, its `.mod` entry for a MuData, or a new one made of its
    `obsm[obsm_key]` for a modality trained from obsm (`written`: refused, nothing could be written there)."""
    self._check_modality(modality)
    if hasattr(adata, "mod"):
      key = self.config.data.modalities[modality].mod_key or modality
      if key not in adata.mod:
        raise RunError(f"the MuData has no modality {key!r} (it has {list(adata.mod)})")
      adata = adata.mod[key]
    if not isinstance(adata, ad.AnnData):
      raise RunError(f"expected an AnnData or MuData for {modality!r}, got {type(adata).__name__}")
    spec = self.config.data.modalities[modality]
    if spec.obsm_key and spec.obsm_key in adata.obsm:  # The layout of training (else the modality's own AnnData).
      if written:
        raise RunError(f"{modality!r} is read from obsm[{spec.obsm_key!r}], so inplace=True has no AnnData of its own "
                       f"to write to; use the AnnData that encode returns")
      adata = data_lib.obsm_modality(adata, modality, spec, f"the {modality!r} cells")
    return adata

  def _encoder_inputs(self, cells: ad.AnnData, modality: str, with_library: bool):
    """(representation or None, counts CSR) of the cells as the modality's encoder takes them.

    The counts layer is read only when the encoder needs it (no representation, LSI, or the library head).
    """
    spec = self.config.data.modalities[modality]
    where = f"the {modality!r} cells"
    needs_counts = spec.rep in ("none", "lsi") or with_library
    layer = None
    if needs_counts:
      field = f"data.modalities.{modality}.layer"
      layer = data_lib.as_csr(data_lib.layer_matrix(cells, data_lib.count_layer(spec), where, field))
      data_lib.check_counts(layer, spec.likelihood, where, f"{field}={spec.layer!r}", self.config.data.count_check)
    fitted = self._saved.fitted
    features = fitted.features[modality]
    raw = data_lib.RawModality(cells, spec, where, layer, np.asarray(features), fitted.rep_features.get(modality))
    rep = data_lib.apply_representation(raw, modality, fitted.preprocess[modality])
    expected = self._specs[modality].input_dim
    if rep is not None and rep.shape[1] != expected:
      raise RunError(f"{where}: the encoder input has {rep.shape[1]} columns, the model was trained on {expected} "
                     f"(obsm[{spec.rep_key!r}]); give the same representation as in training")
    counts = (data_lib.decoder_counts(raw, modality) if needs_counts
              else sp.csr_matrix((cells.n_obs, len(features)), dtype=np.float32))
    return rep, counts

  def _compiled_fn(self, key, make):
    if key not in self._compiled:
      self._compiled[key] = jax.jit(make())
    return self._compiled[key]

  def _in_chunks(self, fn, rep, counts: sp.csr_matrix, *per_cell) -> np.ndarray:
    """fn(state, rep, counts, *per_cell) over every row (`encoding.in_chunks`)."""
    if counts.shape[0] == 0:
      raise RunError("no cells given")
    return encoding.in_chunks(fn, self.state, self._mesh, np.arange(counts.shape[0]), lambda rows: (
        None if rep is None else rep[rows], counts[rows].toarray(), *(a[rows] for a in per_cell)))


class Ensemble:
  """Several runs of the same modalities (seeds, or a fine-tuned run and the run it started from) matching as one.

      ensemble = clue_jax.api.Ensemble([clue_jax.api.load(d) for d in ("runs/a", "runs/b")])
      matches = ensemble.match(rna, "rna", adt, "adt", method="sinkhorn")

  The ensemble's embedding of a cell is its members' L2-normalised embeddings side by side, scaled by
  1 / sqrt(members): the cosine similarity of two cells in it is the mean of their cosine similarities in the members,
  which is what SNN and Sinkhorn matching compare. An ensemble of one run matches as that run does.
  """

  def __init__(self, runs):
    self.runs = list(runs)
    if not self.runs:
      raise RunError("Ensemble([]): give at least one run (clue_jax.api.load(workdir))")
    for run in self.runs[1:]:
      if set(run.modalities) != set(self.modalities):
        raise RunError(f"{run!r} has modalities {list(run.modalities)}, {self.runs[0]!r} has "
                       f"{list(self.modalities)}: an ensemble's runs embed the same modalities")

  def __repr__(self):
    return f"Ensemble({self.runs!r})"

  @property
  def modalities(self) -> tuple:
    return self.runs[0].modalities

  def _modality_data(self, adata, modality: str) -> ad.AnnData:
    return self.runs[0]._modality_data(adata, modality)

  def _embed(self, cells: ad.AnnData, modality: str) -> np.ndarray:
    parts = [matching.l2_rows(run._embed(cells, modality)) for run in self.runs]
    return (np.hstack(parts) / math.sqrt(len(parts))).astype(np.float32)

  def encode(self, adata, modality: str, key_added: str = "X_clue") -> ad.AnnData:
    """A new AnnData (obs copied) with the ensemble's embedding of `modality`'s cells in obsm[key_added]."""
    cells = self._modality_data(adata, modality)
    out = ad.AnnData(obs=cells.obs.copy())
    out.obsm[key_added] = self._embed(cells, modality)
    return out

  def match(self, adata_a, modality_a: str, adata_b, modality_b: str, method: str = "snn", k: int = 1,
            batch_key: str | None = None, epsilon: float = 0.01, n_iter: int = 500,
            top_k: int = matching.MAX_NONZEROS_PER_ROW) -> Matching:
    """`Run.match` on the ensemble's embedding."""
    return _match_cells(self, adata_a, modality_a, adata_b, modality_b, method, k, batch_key, epsilon, n_iter, top_k)


def _match_cells(model, adata_a, modality_a: str, adata_b, modality_b: str, method: str, k: int,
                batch_key: str | None, epsilon: float, n_iter: int, top_k: int) -> Matching:
  """`Run.match` for anything with `modality_data` and `embed` (a Run or an Ensemble)."""
  if method not in ("snn", "sinkhorn"):
    raise RunError(f"method={method!r}: use 'snn' or 'sinkhorn'")
  a, b = model._modality_data(adata_a, modality_a), model._modality_data(adata_b, modality_b)
  batches = [None, None]
  if batch_key is not None:
    for i, (cells, name) in enumerate(((a, modality_a), (b, modality_b))):
      if batch_key not in cells.obs:
        raise RunError(f"the {name!r} cells have no obs column {batch_key!r} (batch_key); available: "
                       f"{list(cells.obs.columns)}")
      batches[i] = cells.obs[batch_key].to_numpy()
  x, y = model._embed(a, modality_a), model._embed(b, modality_b)
  if method == "snn":
    matrix = matching.snn_matching(x, y, k, *batches)
  else:
    matrix = matching.sinkhorn_matching(x, y, epsilon, n_iter, *batches, top_k=top_k)
  partner = pd.Series(np.asarray(b.obs_names)[matching.best_partners(matrix)], index=a.obs_names, name="partner")
  return Matching(matrix, partner)
