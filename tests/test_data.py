"""Reading AnnData / MuData, feature choice, pairing, preprocessing, and clear errors for bad input."""

import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from clue_jax import config as config_lib, data

RNG = np.random.default_rng(0)


def make_adata(n_cells=40, n_features=30, prefix="c", batches=("b1", "b2"), counts=None):
  counts = RNG.poisson(1.0, (n_cells, n_features)).astype(np.float32) if counts is None else counts
  obs = pd.DataFrame(index=[f"{prefix}{i}" for i in range(n_cells)])
  obs["batch"] = pd.Categorical([batches[i % len(batches)] for i in range(n_cells)], categories=list(batches))
  obs["cell_type"] = [["T", "B", "NK"][i % 3] for i in range(n_cells)]
  adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"f{j}" for j in range(n_features)]))
  adata.layers["counts"] = adata.X.copy()
  return adata


def two_modality_config(tmp_path, rna=None, adt=None, **rna_overrides):
  rna = make_adata() if rna is None else rna
  adt = make_adata(n_features=8) if adt is None else adt
  rna.write_h5ad(tmp_path / "rna.h5ad")
  adt.write_h5ad(tmp_path / "adt.h5ad")
  config = config_lib.get_config()
  config.data.modalities.rna = config_lib.modality(str(tmp_path / "rna.h5ad"), batch_key="batch", rep_dim=5,
                                                   n_features=20, **rna_overrides)
  config.data.modalities.adt = config_lib.modality(str(tmp_path / "adt.h5ad"), batch_key="batch", rep_dim=5,
                                                   feature_selection="all")
  config.data.modality_order = "rna,adt"
  config.train.batch_size = 8
  return config


def test_loads_pairs_and_preprocesses(tmp_path):
  adt = make_adata(n_cells=30, n_features=8)  # cells c0..c29 paired, c30..c39 RNA-only
  config = two_modality_config(tmp_path, adt=adt, label_key="cell_type")
  config.data.heldout_pairs = 0.2
  dataset = data.load_dataset(config)
  rna = dataset.modalities["rna"]
  assert rna.counts.shape == (40, 20) and sp.issparse(rna.counts) and rna.rep.shape == (40, 5)
  assert dataset.modalities["adt"].counts.shape == (30, 8)
  assert rna.batch_categories == ("b1", "b2") and set(rna.batch) == {0, 1}
  assert dataset.label_categories == ("B", "NK", "T") and (dataset.modalities["adt"].label == -1).all()
  assert len(dataset.heldout["rna"]) == 6  # 20 % of the 30 pairs
  n_ids = len(dataset.pairing.ids)
  assert n_ids == 40 + 6 and len(dataset.train_ids) + len(dataset.val_ids) == n_ids
  batch = data.minibatch(dataset, {"rna": np.array([[0, 1]]), "adt": np.array([[0, 1]])},
                         {"rna": np.ones((1, 2)), "adt": np.ones((1, 2))}, np.ones((1, 2)))
  assert batch["rna"]["counts"].shape == (1, 2, 20) and batch["rna"]["rep"].shape == (1, 2, 5)


def test_highly_variable_column_picks_decoder_features(tmp_path):
  rna = make_adata()
  rna.var["highly_variable"] = np.arange(30) % 3 == 0
  dataset = data.load_dataset(two_modality_config(tmp_path, rna=rna))
  assert list(dataset.modalities["rna"].features) == [f"f{j}" for j in range(0, 30, 3)]


def test_preprocessing_reused_from_saved_state(tmp_path):
  config = two_modality_config(tmp_path)
  first = data.load_dataset(config)
  saved = {"preprocess": {n: m.preprocess for n, m in first.modalities.items()}, "label_categories": (),
           "batch_categories": {n: m.batch_categories for n, m in first.modalities.items()}}
  again = data.load_dataset(config, saved)
  np.testing.assert_array_equal(first.modalities["rna"].rep, again.modalities["rna"].rep)


def test_reads_a_modality_from_h5mu(tmp_path):
  path = tmp_path / "multi.h5mu"
  with h5py.File(path, "w") as f:
    ad.io.write_elem(f, "mod/gex", make_adata())
    ad.io.write_elem(f, "mod/prot", make_adata(n_features=8))
  config = config_lib.get_config()
  config.data.modalities.rna = config_lib.modality(str(path), mod_key="gex", rep_dim=4, n_features=20)
  config.data.modalities.adt = config_lib.modality(str(path), mod_key="prot", rep_dim=4)
  config.train.batch_size = 8
  dataset = data.load_dataset(config)
  assert dataset.modalities["adt"].counts.shape == (40, 8)
  config.data.modalities.adt.mod_key = "atac"
  with pytest.raises(data.DataError, match=r"multi.h5mu.*no modality 'atac'.*\['gex', 'prot'\].*mod_key"):
    data.load_dataset(config)


@pytest.mark.parametrize("change, pattern", [
    (lambda c, p: setattr(c.data.modalities.rna, "path", str(p / "nope.h5ad")),
     r"nope.h5ad: no such file \(data.modalities.rna.path\)"),
    (lambda c, p: setattr(c.data.modalities.rna, "layer", "raw"),
     r"rna.h5ad: no layer 'raw' \(data.modalities.rna.layer\); available layers: \['counts'\]"),
    (lambda c, p: setattr(c.data.modalities.rna, "batch_key", "donor"),
     r"rna.h5ad: obs has no column 'donor' \(data.modalities.rna.batch_key\); available: \['batch', 'cell_type'\]"),
    (lambda c, p: setattr(c.data.modalities.adt, "label_key", "celltype"),
     r"adt.h5ad: obs has no column 'celltype' \(data.modalities.adt.label_key\)"),
    (lambda c, p: setattr(c.data.modalities.rna, "path", ""),
     r"data.modalities.rna.path is empty"),
    (lambda c, p: setattr(c.train, "batch_size", 4096),
     r"fewer than one batch \(train.batch_size=4096\)"),
], ids=["missing_file", "missing_layer", "missing_batch_column", "missing_label_column", "empty_path",
        "fewer_cells_than_a_batch"])
def test_bad_config_fields_get_clear_errors(tmp_path, change, pattern):
  config = two_modality_config(tmp_path)
  change(config, tmp_path)
  with pytest.raises(data.DataError, match=pattern):
    data.load_dataset(config)


def test_unreadable_file(tmp_path):
  config = two_modality_config(tmp_path)
  (tmp_path / "rna.h5ad").write_text("not hdf5")
  with pytest.raises(data.DataError, match=r"rna.h5ad: cannot be read as AnnData"):
    data.load_dataset(config)


@pytest.mark.parametrize("value, pattern", [(-1.0, r"1 negative values.*likelihood NB needs raw counts"),
                                            (np.nan, r"1 NaN/inf values"), (np.inf, r"1 NaN/inf values")])
def test_invalid_counts_are_errors(tmp_path, value, pattern):
  counts = RNG.poisson(1.0, (40, 30)).astype(np.float32)
  counts[3, 4] = value
  config = two_modality_config(tmp_path, rna=make_adata(counts=counts))
  with pytest.raises(data.DataError, match=r"rna.h5ad: data.modalities.rna.layer='counts' holds " + pattern):
    data.load_dataset(config)


def test_non_integer_counts_warn_with_the_fraction_and_proceed(tmp_path):
  counts = RNG.poisson(1.0, (40, 30)).astype(np.float32) + 1.0
  counts[:4, :3] += 0.5  # 12 of 1,200 entries: 1 %
  config = two_modality_config(tmp_path, rna=make_adata(counts=counts))
  with pytest.warns(UserWarning, match=r"non-integer values in 1\.0000% of entries under likelihood NB"):
    data.load_dataset(config)
  config.data.count_check = "error"
  with pytest.raises(data.DataError, match="non-integer"):
    data.load_dataset(config)


def test_duplicate_obs_names(tmp_path):
  rna = make_adata()
  rna.obs_names = ["c0"] * 2 + [f"c{i}" for i in range(2, 40)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config = two_modality_config(tmp_path, rna=rna)
  with pytest.raises(data.DataError, match=r"obs_names are not unique \(e.g. \['c0'\]\)"):
    data.load_dataset(config)


def test_shared_batches_need_identical_categories(tmp_path):
  config = two_modality_config(tmp_path, adt=make_adata(n_features=8, batches=("b1", "b3")))
  config.model.shared_batches = True
  with pytest.raises(data.DataError, match="shared_batches=True needs the same batch categories"):
    data.load_dataset(config)


def test_config_validation_names_key_and_range():
  config = config_lib.get_config()
  config.data.modalities.rna = config_lib.modality("x.h5ad")
  config.data.modalities.adt = config_lib.modality("y.h5ad")
  config.loss.lam_align = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"loss.lam_align=-1.0 is not allowed: a number >= 0"):
    config_lib.validate(config)
  config.loss.lam_align = 0.02
  config.model.latent_dim = 0
  with pytest.raises(config_lib.ConfigError, match=r"model.latent_dim=0 is not allowed: a positive integer"):
    config_lib.validate(config)
  config.model.latent_dim = 5
  config.data.modalities.rna.likelihood = "ZINB"
  with pytest.raises(config_lib.ConfigError, match=r"likelihood='ZINB' is not allowed: one of \('NB'"):
    config_lib.validate(config)
