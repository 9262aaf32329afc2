"""Property-based fuzzing of the input path: random small AnnData pairs through `load_dataset` and a train step.

Every drawn input either loads into a dataset that trains one step to finite losses, or is refused with a DataError
whose message is the one its fault calls for. One step function is compiled (fixed model shapes) and reused for
every dataset that builds the same model.
"""

import dataclasses
import tempfile
import warnings

import anndata as ad
import jax
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import Phase, event, given, settings, strategies as st

from clue_jax import config as config_lib
from clue_jax.data import dataset as data_lib, sampler
from clue_jax.train import parallel, run_dir, steps, trainer

N_FEATURES = {"rna": 12, "adt": 6}
BATCH_SIZE = 8
FAULTS = ("none", "nan", "negative_counts", "non_integer", "duplicate_names", "missing_modality")
# Refusals that healthy random data may legitimately get (too few cells, nothing shared, nothing in a modality).
DATA_DEPENDENT = ("fewer than one batch", "no cell is in two modalities", "no cell has a non-zero value",
                  "lands in the training split")


@st.composite
def inputs(draw):
  """A description of two random modalities (see `write_inputs`); half of them carry one fault."""
  seed = draw(st.integers(0, 2**31 - 1))
  choice = np.random.default_rng([seed, 1])  # Even odds for the fault and batch choices (hypothesis favours edges).
  return {
      "seed": seed,
      "cells": {n: draw(st.integers(6, 30)) for n in N_FEATURES},
      "shared": draw(st.integers(0, 30)),
      "mean": {n: draw(st.sampled_from([0.3, 1.0, 4.0])) for n in N_FEATURES},
      "empty_cells": {n: draw(st.integers(0, 3)) for n in N_FEATURES},
      "format": {n: draw(st.sampled_from(["csr", "csc", "dense"])) for n in N_FEATURES},
      "dtype": draw(st.sampled_from(["int32", "int64", "uint16", "float32", "float64"])),  # RNA counts.
      "batches": ("b2", "b3") if choice.random() < 0.2 else ("b1", "b2"),  # ADT's; RNA has b1, b2.
      "container": draw(st.sampled_from(["h5ad", "h5mu"])),
      "pair_by": draw(st.sampled_from(["obs_names", "none"])),
      "fault": FAULTS[0] if choice.random() < 0.5 else str(choice.choice(FAULTS[1:])),
  }


def random_adata(spec: dict, name: str, rng: np.random.Generator) -> ad.AnnData:
  n_cells, n_features = spec["cells"][name], N_FEATURES[name]
  counts = rng.poisson(spec["mean"][name], (n_cells, n_features)).astype(np.float64)
  counts[rng.choice(n_cells, min(spec["empty_cells"][name], n_cells), replace=False)] = 0.0
  if name == "adt":  # Normal likelihood: any real value.
    counts *= rng.normal(1.0, 0.5, counts.shape)
  fault = spec["fault"]
  if fault == "nan" and name == "rna":
    counts[0, 0] = np.nan
  if fault == "negative_counts" and name == "rna":
    counts[0, 0] = -2.0
  if fault == "non_integer" and name == "rna":
    counts[0, 0] += 0.5
  dtype = np.dtype(spec["dtype"] if name == "rna" and fault == "none" else "float64")
  matrix = counts.astype(dtype) if dtype.kind == "f" else np.abs(counts).astype(dtype)
  if spec["format"][name] != "dense":
    matrix = getattr(sp, f"{spec['format'][name]}_matrix")(matrix)
  offset = 0 if name == "rna" else spec["cells"]["rna"] - min(spec["shared"], spec["cells"]["rna"], n_cells)
  names = [f"cell{offset + i}" for i in range(n_cells)]
  if fault == "duplicate_names" and name == "adt":
    names[1] = names[0]
  batches = spec["batches"] if name == "adt" else ("b1", "b2")
  obs = pd.DataFrame({"batch": pd.Categorical([batches[i % 2] for i in range(n_cells)], categories=list(batches))},
                     index=names)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # anndata warns about duplicate names.
    adata = ad.AnnData(obs=obs, var=pd.DataFrame(index=[f"{name}{j}" for j in range(n_features)]))
  adata.layers["counts"] = matrix
  return adata


def write_inputs(spec: dict, directory: str):
  """Writes the modalities as two .h5ad files or one .h5mu; returns the config that reads them."""
  rng = np.random.default_rng(spec["seed"])
  adatas = {n: random_adata(spec, n, rng) for n in N_FEATURES}
  config = fuzz_config()
  config.data.pair_by = spec["pair_by"]
  if spec["container"] == "h5mu":
    path = f"{directory}/both.h5mu"
    written = {n: a for n, a in adatas.items() if not (spec["fault"] == "missing_modality" and n == "adt")}
    mudata.MuData(written).write(path)
    for name in N_FEATURES:
      config.data.modalities[name].path = path
  else:
    for name, adata in adatas.items():
      path = f"{directory}/{name}.h5ad"
      if not (spec["fault"] == "missing_modality" and name == "adt"):
        adata.write_h5ad(path)
      config.data.modalities[name].path = path
  return config


def fuzz_config():
  config = config_lib.get_config()
  config.data.modalities.rna = config_lib.modality("", batch_key="batch", feature_selection="all", rep_dim=3,
                                                   rep_layer="counts", rep_normalize="log1p_cp10k")
  config.data.modalities.adt = config_lib.modality("", likelihood="Normal", batch_key="batch",
                                                   feature_selection="all", rep="none")
  config.data.modality_order = "rna,adt"
  config.data.val_split = 0.2
  config.model.update(latent_dim=2, encoder_width=8, decoder_width=8, discriminator_width=8, shared_batches=True)
  config.train.batch_size = BATCH_SIZE
  return config


def expected_refusal(spec: dict) -> str | None:
  """The message fragment that the spec's fault must produce; None when the data has no fault."""
  if spec["fault"] == "missing_modality":
    return "the MuData file has no modality 'adt'" if spec["container"] == "h5mu" else "adt.h5ad: no such file"
  return {"nan": "holds 1 NaN/inf values", "negative_counts": "1 negative values",
          "duplicate_names": "obs_names are not unique"}.get(spec["fault"])


@dataclasses.dataclass(repr=False)
class CompiledStep:
  """The model that every fuzz dataset without dropped features builds, its initial state and jitted step."""

  model: object
  state: object
  step: object
  mesh: object


@pytest.fixture(scope="module")
def compiled_step() -> CompiledStep:
  spec = {"seed": 0, "cells": {"rna": 24, "adt": 24}, "shared": 20, "mean": {"rna": 3.0, "adt": 3.0},
          "empty_cells": {"rna": 0, "adt": 0}, "format": {"rna": "csr", "adt": "csr"},
          "dtype": "float32", "batches": ("b1", "b2"), "container": "h5ad",
          "pair_by": "obs_names", "fault": "none"}
  with tempfile.TemporaryDirectory() as directory:
    config = write_inputs(spec, directory)
    dataset = trainer.load_data(config)
  model = run_dir.model_args(config, dataset).build()
  mesh = parallel.make_mesh()
  state = steps.init_state(model, jax.random.key(0))
  step = jax.jit(steps.make_train_chunk(model, trainer.loss_weights(config, dataset.names)))
  return CompiledStep(model, parallel.put(state, parallel.replicated(mesh)), step, mesh)


def epoch_rows(dataset: data_lib.Dataset) -> sampler.EpochRows:
  return sampler.epoch_rows(dataset.pairing, dataset.train_ids, np.random.default_rng(0), BATCH_SIZE, True)


def check_dataset(dataset: data_lib.Dataset):
  """Invariants of a loaded dataset: finite float32 CSR counts with no empty cell, each cell paired once."""
  for name, m in dataset.modalities.items():
    assert sp.isspmatrix_csr(m.counts) and m.counts.dtype == np.float32 and np.isfinite(m.counts.data).all()
    assert (np.diff(m.counts.indptr) > 0).all()
    assert m.rep is None or (np.isfinite(m.rep).all() and len(m.rep) == m.counts.shape[0])
    rows = dataset.pairing.rows[name]
    assert sorted(rows[rows >= 0]) == list(range(m.counts.shape[0]))
  assert len(dataset.train_ids) >= BATCH_SIZE


# Deterministic examples; no shrinking (a failure prints its whole input spec, which reproduces it).
@settings(max_examples=40, deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate))
@given(spec=inputs())
def test_random_inputs_train_or_get_a_clear_error(compiled_step, spec):
  with tempfile.TemporaryDirectory() as directory, warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Dropped empty cells and non-integer counts warn.
    config = write_inputs(spec, directory)
    try:
      dataset = trainer.load_data(config)
    except (data_lib.DataError, config_lib.ConfigError) as e:
      event(f"refused: {spec['fault']}")
      expected = expected_refusal(spec)
      if expected is not None:
        assert expected in str(e)
      elif spec["batches"] != ("b1", "b2") and "shared_batches=True needs the same batch categories" in str(e):
        pass
      else:
        assert any(fragment in str(e) for fragment in DATA_DEPENDENT), str(e)
        if "no cell is in two modalities" in str(e):
          assert spec["pair_by"] == "obs_names"
      return
  assert expected_refusal(spec) is None, f"{spec['fault']} was not refused"
  assert spec["batches"] == ("b1", "b2"), "different batch categories were not refused"
  check_dataset(dataset)
  if run_dir.model_args(config, dataset).build() != compiled_step.model:  # All-zero features dropped: other shapes.
    event("loaded, other model shapes")
    return
  event("loaded and trained a step")
  chunk = parallel.put(data_lib.steps_chunk(dataset, epoch_rows(dataset), 0, 1, BATCH_SIZE),
                       parallel.batch_sharding(compiled_step.mesh, 1))
  _, measured = compiled_step.step(compiled_step.state, chunk, np.int32(1), jax.random.key(1), np.float32(2e-3),
                                   np.float32(1.0))
  for term, value in jax.device_get(measured).items():
    assert np.isfinite(value).all(), term
