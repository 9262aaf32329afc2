"""Reading AnnData / MuData, feature choice, pairing, preprocessing, and clear errors for bad input."""

import re
import warnings

import anndata as ad
import h5py
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from clue_jax import config as config_lib
from clue_jax.data import dataset as data_lib
from clue_jax.train import parallel, trainer

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
  dataset = trainer.load_data(config)
  rna = dataset.modalities["rna"]
  assert rna.counts.shape == (40, 20) and sp.issparse(rna.counts) and rna.rep.shape == (40, 5)
  assert dataset.modalities["adt"].counts.shape == (30, 8)
  assert rna.batch_categories == ("b1", "b2") and set(rna.batch) == {0, 1}
  assert dataset.label_categories == ("B", "NK", "T") and (dataset.modalities["adt"].label == -1).all()
  assert len(dataset.heldout["rna"]) == 6  # 20 % of the 30 pairs
  n_ids = len(dataset.pairing.ids)
  assert n_ids == 40 + 6 and len(dataset.train_ids) + len(dataset.val_ids) == n_ids
  batch = data_lib.minibatch(dataset, {"rna": np.array([[0, 1]]), "adt": np.array([[0, 1]])},
                         {"rna": np.ones((1, 2)), "adt": np.ones((1, 2))}, np.ones((1, 2)))
  assert batch["rna"].counts.shape == (1, 2, 20) and batch["rna"].rep.shape == (1, 2, 5)


def test_highly_variable_column_picks_decoder_features(tmp_path):
  rna = make_adata()
  rna.var["highly_variable"] = np.arange(30) % 3 == 0
  dataset = trainer.load_data(two_modality_config(tmp_path, rna=rna))
  assert list(dataset.modalities["rna"].features) == [f"f{j}" for j in range(0, 30, 3)]


def test_preprocessing_reused_from_saved_state(tmp_path):
  config = two_modality_config(tmp_path)
  first = trainer.load_data(config)
  saved = first.fitted()
  again = trainer.load_data(config, saved)
  np.testing.assert_array_equal(first.modalities["rna"].rep, again.modalities["rna"].rep)


def test_reads_a_modality_from_h5mu(tmp_path):
  path = tmp_path / "multi.h5mu"
  mudata.MuData({"gex": make_adata(), "prot": make_adata(n_features=8)}).write(path)
  config = config_lib.get_config()
  config.data.modalities.rna = config_lib.modality(str(path), mod_key="gex", rep_dim=4, n_features=20)
  config.data.modalities.adt = config_lib.modality(str(path), mod_key="prot", rep_dim=4)
  config.train.batch_size = 8
  dataset = trainer.load_data(config)
  assert dataset.modalities["adt"].counts.shape == (40, 8)
  config.data.modalities.adt.mod_key = "atac"
  with pytest.raises(data_lib.DataError, match=r"multi.h5mu.*no modality 'atac'.*\['gex', 'prot'\].*mod_key"):
    trainer.load_data(config)


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
  with pytest.raises(data_lib.DataError, match=pattern):
    trainer.load_data(config)


def write_garbage(path):
  path.write_text("not hdf5")


def write_csv(path):
  path.write_text("cell,f0,f1\nc0,1,2\n")


def write_truncated_h5ad(path):
  make_adata().write_h5ad(path)
  path.write_bytes(path.read_bytes()[:4000])


def write_plain_h5(path):
  with h5py.File(path, "w") as f:
    f["matrix/data"] = np.arange(5)


@pytest.mark.parametrize("write, pattern", [
    (write_garbage, r"rna.h5ad: not an HDF5 file, so neither AnnData \(.h5ad\) nor MuData \(.h5mu\) "
                    r"\(data.modalities.rna.path\); convert it first"),
    (write_csv, r"rna.h5ad: not an HDF5 file"),
    (write_truncated_h5ad, r"rna.h5ad: cannot be read as AnnData \(.h5ad\) or MuData \(.h5mu\) "
                           r"\(data.modalities.rna.path\), the file may be truncated or damaged: OSError"),
    (write_plain_h5, r"rna.h5ad: an HDF5 file but not AnnData: / has no obs or var \(it holds \['matrix'\]\); "
                     r"data.modalities.rna.path needs an .h5ad or .h5mu file"),
], ids=["garbage", "csv", "truncated", "hdf5_not_anndata"])
def test_unreadable_files(tmp_path, write, pattern):
  config = two_modality_config(tmp_path)
  write(tmp_path / "rna.h5ad")
  with pytest.raises(data_lib.DataError, match=pattern):
    trainer.load_data(config)


def test_starter_files_from_an_old_anndata_load():
  """The embedded starters use anndata 0.7's layout (categories under obs/__categories, CSC counts) and load."""
  path = config_lib.DATASETS / "bmmc_cite_starter" / "adt.h5ad"
  with h5py.File(path, "r") as f:
    assert "__categories" in f["obs"] and "encoding-type" not in f["obs/batch"].attrs
    assert f["layers/counts"].attrs["encoding-type"] == "csc_matrix"
  spec = config_lib.modality(str(path), feature_selection="all", batch_key="batch", rep="none")
  modality = data_lib.build_modality("adt", data_lib.read_modality("adt", spec), {}, None, ())
  assert modality.counts.shape == (600, 134) and modality.counts.nnz > 0
  assert len(modality.batch_categories) == 2 and set(modality.batch) == {0, 1}


@pytest.mark.parametrize("value, pattern", [(-1.0, r"1 negative values.*likelihood NB needs raw counts"),
                                            (np.nan, r"1 NaN/inf values"), (np.inf, r"1 NaN/inf values")])
def test_invalid_counts_are_errors(tmp_path, value, pattern):
  counts = RNG.poisson(1.0, (40, 30)).astype(np.float32)
  counts[3, 4] = value
  config = two_modality_config(tmp_path, rna=make_adata(counts=counts))
  with pytest.raises(data_lib.DataError, match=r"rna.h5ad: data.modalities.rna.layer='counts' holds " + pattern):
    trainer.load_data(config)


def test_non_integer_counts_warn_with_the_fraction_and_proceed(tmp_path):
  counts = RNG.poisson(1.0, (40, 30)).astype(np.float32) + 1.0
  counts[:4, :3] += 0.5  # 12 of 1,200 entries: 1 %
  config = two_modality_config(tmp_path, rna=make_adata(counts=counts))
  with pytest.warns(UserWarning, match=r"non-integer values in 1\.0000% of entries under likelihood NB"):
    trainer.load_data(config)
  config.data.count_check = "error"
  with pytest.raises(data_lib.DataError, match="non-integer"):
    trainer.load_data(config)


@pytest.mark.filterwarnings("ignore:(Observation|Variable) names are not unique")
@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicate_names(tmp_path, axis):
  rna = make_adata()
  prefix, n = ("c", 40) if axis == "obs" else ("f", 30)
  names = [f"{prefix}0"] * 2 + [f"{prefix}{i}" for i in range(2, n)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # anndata warns about the duplicates too.
    setattr(rna, f"{axis}_names", names)
    config = two_modality_config(tmp_path, rna=rna)
  fix = re.escape(f"(adata.{axis}_names_make_unique())")
  with pytest.raises(data_lib.DataError, match=rf"rna.h5ad: {axis}_names are not unique \(1 repeated, e.g. "
                                           rf"\['{prefix}0'\]\).*{fix}"):
    trainer.load_data(config)


def test_all_zero_cells_and_features_are_dropped_with_a_count(tmp_path):
  counts = RNG.poisson(2.0, (40, 30)).astype(np.float32) + 1.0
  counts[[3, 7], :] = 0.0
  counts[:, [5, 6, 9]] = 0.0
  config = two_modality_config(tmp_path, rna=make_adata(counts=counts), feature_selection="all")
  with pytest.warns(UserWarning) as caught:
    dataset = trainer.load_data(config)
  messages = [str(w.message) for w in caught]
  assert any(re.search(r"rna.h5ad: dropped 2 of 40 cells whose data.modalities.rna.layer='counts' is zero in every "
                       r"feature", m) for m in messages), messages
  assert any(re.search(r"rna.h5ad: 3 of 30 features are zero in every cell of data.modalities.rna.layer='counts'; "
                       r"they are not used as decoder features", m) for m in messages), messages
  rna = dataset.modalities["rna"]
  assert rna.counts.shape == (38, 27) and "c3" not in rna.obs.index and "f5" not in rna.features
  assert (np.diff(rna.counts.indptr) > 0).all()
  assert dataset.pairing.rows["rna"][list(dataset.pairing.ids).index("c3")] == -1  # c3 is ADT-only now.


def test_a_layer_with_no_data_is_an_error(tmp_path):
  config = two_modality_config(tmp_path, rna=make_adata(counts=np.zeros((40, 30), np.float32)))
  with pytest.raises(data_lib.DataError, match=r"rna.h5ad: no cell has a non-zero value in data.modalities.rna.layer="
                                           r"'counts' \(40 cells, 30 features\); point it at the layer holding"):
    trainer.load_data(config)


def test_no_shared_cell_names_is_an_error_unless_unpaired(tmp_path):
  config = two_modality_config(tmp_path, adt=make_adata(n_features=8, prefix="d"))
  with pytest.raises(data_lib.DataError, match=r"no cell is in two modalities: data.pair_by='obs_names' pairs cells by "
                                           r"name .*rna.h5ad: \['c0', 'c1'\]; .*adt.h5ad: \['d0', 'd1'\].*"
                                           r"--config.data.pair_by=none"):
    trainer.load_data(config)
  config.data.pair_by = "none"
  dataset = trainer.load_data(config)
  assert len(dataset.pairing.ids) == 80


def test_heldout_monitor_needs_pairs_to_hide(tmp_path):
  config = two_modality_config(tmp_path)
  config.data.pair_by = "none"
  config.data.heldout_pairs = 0.2
  config.train.monitor = "heldout_foscttm"
  with pytest.raises(data_lib.DataError, match=r"train.monitor='heldout_foscttm' needs held-out pairs, but "
                                           r"data.heldout_pairs=0.2 hides none of the 0 paired cells"):
    trainer.load_data(config)


def test_unseen_monitor_needs_validation_cells_in_two_modalities(tmp_path):
  config = two_modality_config(tmp_path)
  config.data.pair_by = "none"
  config.train.monitor = "unseen_foscttm"
  with pytest.raises(data_lib.DataError, match=r"train.monitor='unseen_foscttm' needs validation cells measured in "
                                           r"two modalities, but the validation split \(data.val_split=0.1\) holds 0"):
    trainer.load_data(config)
  config.data.val_split = 0.0
  with pytest.raises(config_lib.ConfigError, match=r"unseen_foscttm needs data.val_split > 0"):
    config_lib.validate(config)


@pytest.mark.parametrize("change, pattern", [
    (lambda c: c.data.modalities.rna.update(rep="obsm", rep_key="X_pca"),
     r"rna.h5ad: obsm has no key 'X_pca' \(data.modalities.rna.rep_key\); available: \['X_lsi'\]. Set "
     r"--config.data.modalities.rna.rep_key=<one of them>"),
    (lambda c: c.data.modalities.rna.update(rep="obsm", rep_key="X_lsi"),
     r"rna.h5ad: obsm\['X_lsi'\] \(data.modalities.rna.rep_key\) holds 1 NaN/inf values"),
    (lambda c: c.data.modalities.rna.update(rep_layer="normalized"),
     r"rna.h5ad: data.modalities.rna.rep_layer holds 1 NaN/inf values"),
], ids=["missing_obsm_key", "nan_in_obsm", "nan_in_rep_layer"])
def test_encoder_inputs_are_checked(tmp_path, change, pattern):
  rna = make_adata()
  rna.obsm["X_lsi"] = RNG.normal(size=(40, 4)).astype(np.float32)
  rna.obsm["X_lsi"][2, 1] = np.nan
  rna.layers["normalized"] = sp.csr_matrix(np.log1p(rna.layers["counts"].toarray()))
  rna.layers["normalized"].data[0] = np.inf
  config = two_modality_config(tmp_path, rna=rna)
  change(config)
  with pytest.raises(data_lib.DataError, match=pattern):
    trainer.load_data(config)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense"])
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.float64])
def test_any_matrix_format_and_dtype_loads_the_same_counts(tmp_path, fmt, dtype):
  counts = RNG.poisson(1.5, (40, 30)) + np.eye(40, 30, dtype=np.int64)
  rna = make_adata(counts=counts.astype(np.float32))
  matrix = counts.astype(dtype)
  rna.layers["counts"] = matrix if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(matrix)
  config = two_modality_config(tmp_path, rna=rna, feature_selection="all")
  loaded = trainer.load_data(config).modalities["rna"].counts
  assert loaded.dtype == np.float32 and sp.isspmatrix_csr(loaded)
  np.testing.assert_array_equal(loaded.toarray(), counts.astype(np.float32))


def test_align_features_reorders_by_name_and_lists_missing_ones():
  matrix = sp.coo_matrix(np.arange(12, dtype=np.int64).reshape(3, 4))
  aligned = data_lib.align_features(matrix, ["a", "b", "c", "d"], ["c", "a"], "new.h5ad", "X")
  np.testing.assert_array_equal(aligned.toarray(), [[2, 0], [6, 4], [10, 8]])
  dense = data_lib.align_features(np.ones((2, 3)), ["a", "b", "c"], ["a", "b", "c"], "new.h5ad", "X")
  assert sp.isspmatrix_csr(dense) and dense.dtype == np.float32
  wanted = [f"g{i}" for i in range(10)]
  with pytest.raises(data_lib.DataError, match=r"new.h5ad: 8 of the 10 features the model was trained on are missing "
                                           r"from layers\['counts'\] \(e.g. \['g2', 'g3', 'g4', 'g5', 'g6'\]\)"):
    data_lib.align_features(np.ones((2, 2)), ["g1", "g0"], wanted, "new.h5ad", "layers['counts']")


def test_resumed_data_is_aligned_to_the_trained_features(tmp_path):
  """A file whose features were reordered and extended gives the trained model the same inputs."""
  config = two_modality_config(tmp_path)
  first = trainer.load_data(config)
  saved = first.fitted()
  rna = ad.read_h5ad(tmp_path / "rna.h5ad")
  shuffled = rna[:, RNG.permutation(rna.n_vars)].copy()
  extra = ad.AnnData(X=sp.csr_matrix(np.ones((rna.n_obs, 1), np.float32)), obs=rna.obs,
                     var=pd.DataFrame(index=["new_gene"]))
  extra.layers["counts"] = extra.X.copy()
  ad.concat([shuffled, extra], axis=1, merge="same").write_h5ad(tmp_path / "rna.h5ad")
  again = trainer.load_data(config, saved)
  for name in ("rna", "adt"):
    np.testing.assert_array_equal(first.modalities[name].features, again.modalities[name].features)
    np.testing.assert_array_equal(first.modalities[name].counts.toarray(), again.modalities[name].counts.toarray())
    np.testing.assert_allclose(first.modalities[name].rep, again.modalities[name].rep, rtol=1e-5, atol=1e-5)
  dropped = first.modalities["rna"].features[:2].tolist()
  rna[:, [n for n in rna.var_names if n not in dropped]].copy().write_h5ad(tmp_path / "rna.h5ad")
  with pytest.raises(data_lib.DataError, match=rf"rna.h5ad: 2 of the 20 features the model was trained on are missing "
                                           rf"from data.modalities.rna.layer \(e.g. {re.escape(str(dropped))}\)"):
    trainer.load_data(config, saved)


def test_shared_batches_need_identical_categories(tmp_path):
  config = two_modality_config(tmp_path, adt=make_adata(n_features=8, batches=("b1", "b3")))
  config.model.shared_batches = True
  with pytest.raises(data_lib.DataError, match="shared_batches=True needs the same batch categories"):
    trainer.load_data(config)


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


def test_batch_size_and_device_count_are_checked_against_the_devices():
  with pytest.raises(config_lib.ConfigError, match=r"train.batch_size=6 is not allowed: it must be divisible by the 4 "
                                                   r"devices; use a multiple of 4, e.g. 4"):
    parallel.check_batch_size(6, parallel.make_mesh(4))
  with pytest.raises(config_lib.ConfigError, match=r"train.num_devices=8 is not allowed: only 4 devices are visible"):
    parallel.make_mesh(8)


# ------------------------------------------------------------------------------------- modalities inside obsm
def smoke_with_adt_in_obsm(tmp_path, layout: str):
  """configs/smoke.py, and the same data with the ADT counts moved into the RNA file's obsm (totalVI layout: a
  DataFrame in obsm["protein_expression"]; openproblems: an array in obsm["mode2"], the names in uns["mode2_var"])."""
  config = config_lib.load_module(config_lib.DATASETS.parent.parent / "configs" / "smoke.py").get_config()
  rna = ad.read_h5ad(config.data.modalities.rna.path)
  adt = ad.read_h5ad(config.data.modalities.adt.path)
  assert set(adt.obs_names) == set(rna.obs_names)
  counts = sp.csr_matrix(adt[rna.obs_names].layers["counts"])
  if layout == "totalvi":
    rna.obsm["protein_expression"] = pd.DataFrame(counts.toarray(), index=rna.obs_names, columns=adt.var_names)
    keys = {"obsm_key": "protein_expression"}
  else:
    rna.obsm["mode2"] = counts
    rna.uns["mode2_var"] = np.asarray(adt.var_names)
    keys = {"obsm_key": "mode2", "var_names_key": "mode2_var"}
  path = tmp_path / "rna_with_adt.h5ad"
  rna.write_h5ad(path)
  moved = config_lib.load_module(config_lib.DATASETS.parent.parent / "configs" / "smoke.py").get_config()
  moved.data.modalities.rna.path = moved.data.modalities.adt.path = str(path)
  moved.data.modalities.adt.update(keys)
  # The ADT PCA on the same counts: the ADT file's own X is normalised, obsm holds only the counts.
  config.data.modalities.adt.rep_layer, moved.data.modalities.adt.rep_layer = "counts", "X"
  return config, moved


@pytest.mark.parametrize("layout", ["totalvi", "openproblems"])
def test_a_modality_in_obsm_loads_as_from_its_own_file(tmp_path, layout):
  config, moved = smoke_with_adt_in_obsm(tmp_path, layout)
  expected, got = trainer.load_data(config), trainer.load_data(moved)
  np.testing.assert_array_equal(got.train_ids, expected.train_ids)
  for name in ("rna", "adt"):
    a, b = expected.modalities[name], got.modalities[name]
    assert list(a.obs.index) == list(b.obs.index)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.counts.toarray(), b.counts.toarray())
    np.testing.assert_array_equal(a.rep, b.rep)
    np.testing.assert_array_equal(a.batch, b.batch)


def test_a_modality_in_obsm_names_what_is_missing(tmp_path):
  _, moved = smoke_with_adt_in_obsm(tmp_path, "openproblems")
  moved.data.modalities.adt.obsm_key = "protein"
  with pytest.raises(data_lib.DataError, match=r"no obsm\['protein'\] \(data.modalities.adt.obsm_key\); its obsm "
                                               r"keys are \['mode2'\]"):
    trainer.load_data(moved)
  moved.data.modalities.adt.obsm_key, moved.data.modalities.adt.var_names_key = "mode2", ""
  with pytest.raises(data_lib.DataError, match=r"obsm\['mode2'\] is an array without feature names; set "
                                               r"--config.data.modalities.adt.var_names_key"):
    trainer.load_data(moved)
  moved.data.modalities.adt.var_names_key = "nothing"
  with pytest.raises(data_lib.DataError, match=r"no uns\['nothing'\] \(data.modalities.adt.var_names_key\)"):
    trainer.load_data(moved)
