"""The notebook API on the session's smoke run (4 fake devices), and the prediction math."""

import dataclasses
import json
import pathlib
import re
import types

import anndata as ad
import ml_collections
import mudata
import numpy as np
import pytest
from scipy import stats

import clue_jax
from clue_jax import api
from clue_jax.data import dataset as data_lib, preprocess
from clue_jax.evaluate import metrics, prediction
from clue_jax.evaluate.neighbor_graph import neighbor_graph
from clue_jax.model.network import CLUE
from clue_jax.train import trainer
from run_helpers import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
STARTER = ROOT / "clue_jax" / "datasets" / "bmmc_cite_starter"


@pytest.fixture(scope="module")
def workdir(smoke_run):
  return smoke_run[0]


@pytest.fixture(scope="module")
def run(workdir):
  return api.load(workdir)


@pytest.fixture(scope="module")
def cells():
  return {"rna": ad.read_h5ad(STARTER / "rna.h5ad"), "adt": ad.read_h5ad(STARTER / "adt.h5ad")}


def test_load_needs_a_finished_run(tmp_path):
  with pytest.raises(api.RunError, match="no finished run there"):
    api.load(tmp_path)


@pytest.mark.parametrize("modality", ["rna", "adt"])
def test_encode_reproduces_the_runs_embeddings(run, workdir, cells, modality):
  saved = ad.read_h5ad(workdir / "embeddings" / f"{modality}.h5ad")
  encoded = run.encode(cells[modality], modality)
  assert list(encoded.obs_names) == list(cells[modality].obs_names)
  np.testing.assert_allclose(encoded.obsm["X_clue"], saved[encoded.obs_names].obsm["X_clue"], atol=1e-6)
  assert "X_clue" not in cells[modality].obsm  # No in-place surprise.


def test_unseen_cells_encoded_through_the_api_score_as_the_run_reports(run, workdir, smoke_run, cells):
  """The inductive protocol: the validation cells measured in both modalities were never trained on (nor fitted
  on by the preprocessing); encoded afterwards with `encode`, their FOSCTTM is the run's `unseen_foscttm`."""
  dataset = trainer.load_data(smoke_run[1])
  rows = {m: dataset.pairing.rows[m][dataset.val_ids] for m in ("rna", "adt")}
  both = (rows["rna"] >= 0) & (rows["adt"] >= 0)
  assert both.sum() > 20
  unseen = {m: cells[m][dataset.modalities[m].obs.index[rows[m][both]]] for m in rows}
  trained = dataset.pairing.rows["rna"][dataset.train_ids]
  assert not set(unseen["rna"].obs_names) & set(dataset.modalities["rna"].obs.index[trained[trained >= 0]])
  score = metrics.foscttm(run.encode(unseen["rna"], "rna").obsm["X_clue"],
                          run.encode(unseen["adt"], "adt").obsm["X_clue"])
  summary = json.loads((workdir / "summary.json").read_text())
  assert score == pytest.approx(summary["unseen_foscttm"], abs=1e-6)


def test_encode_aligns_features_by_name_and_writes_in_place_when_asked(run, cells):
  rna = cells["rna"]
  expected = run.encode(rna, "rna").obsm["X_clue"]
  shuffled = rna[:, np.random.default_rng(0).permutation(rna.n_vars)].copy()
  assert run.encode(shuffled, "rna", key_added="emb", inplace=True) is None
  np.testing.assert_allclose(shuffled.obsm["emb"], expected, atol=1e-5)


def test_encode_takes_the_modality_out_of_a_mudata(run, cells):
  mudata = types.SimpleNamespace(mod=dict(cells))  # What the API uses of a MuData: `.mod`.
  np.testing.assert_array_equal(run.encode(mudata, "adt").obsm["X_clue"],
                                run.encode(cells["adt"], "adt").obsm["X_clue"])
  with pytest.raises(api.RunError, match=r"no modality 'rna' \(it has \['adt'\]\)"):
    run.encode(types.SimpleNamespace(mod={"adt": cells["adt"]}), "rna")


def test_encode_a_mudata_writes_every_modality_and_the_joint_embedding(run, cells):
  rna, adt = cells["rna"].copy(), cells["adt"][: cells["adt"].n_obs // 2].copy()  # Half the cells lack ADT.
  mdata = mudata.MuData({"rna": rna, "adt": adt})
  returned = run.encode(mdata)
  assert "X_clue" not in mdata.obsm and "X_clue" not in mdata.mod["rna"].obsm
  assert run.encode(mdata, inplace=True) is None
  own = {m: run.encode(cells[m], m).obsm["X_clue"] for m in ("rna", "adt")}
  np.testing.assert_array_equal(mdata.mod["rna"].obsm["X_clue"], own["rna"])
  np.testing.assert_array_equal(mdata.mod["adt"].obsm["X_clue"], own["adt"][: adt.n_obs])
  joint = mdata.obsm["X_clue"]
  rows = {m: mdata.obs_names.get_indexer(mdata.mod[m].obs_names) for m in ("rna", "adt")}
  both = np.isin(np.arange(mdata.n_obs), rows["adt"])
  np.testing.assert_allclose(joint[rows["adt"]], (own["rna"][: adt.n_obs] + own["adt"][: adt.n_obs]) / 2, atol=1e-6)
  np.testing.assert_allclose(joint[~both], own["rna"][~np.isin(rows["rna"], rows["adt"])], atol=1e-6)
  again = returned.obsm["X_clue"][returned.obs_names.get_indexer(mdata.obs_names)]
  np.testing.assert_array_equal(again, joint)
  with pytest.raises(api.RunError, match=r"encode\(\) without a modality encodes a MuData.*encode\(adata, 'rna'\)"):
    run.encode(rna)


def test_embeddings_feed_scanpy_neighbors(run, cells):
  sc = pytest.importorskip("scanpy")  # The eval extra.
  adata = run.encode(cells["rna"], "rna")
  sc.pp.neighbors(adata, use_rep="X_clue")
  ours = neighbor_graph(adata.obsm["X_clue"].astype(np.float64))
  np.testing.assert_allclose(adata.obsp["connectivities"].toarray(), ours.toarray(), atol=1e-5)


def test_missing_training_features_are_an_error_naming_them(run, cells):
  rna = cells["rna"]
  dropped = list(rna.var_names[:3])  # The PCA was fitted on all genes.
  with pytest.raises(data_lib.DataError, match=f"3 of the 1000 features.*{re.escape(dropped[0])}"):
    run.encode(rna[:, 3:].copy(), "rna")


def test_unknown_modality_is_an_error(run, cells):
  with pytest.raises(api.RunError, match=r"unknown modality 'atac'; this run has \['rna', 'adt'\]"):
    run.encode(cells["rna"], "atac")


def test_predict_nb_target_gives_nonnegative_counts_in_the_targets_features(run, cells):
  rna = cells["rna"]
  predicted = run.predict(rna, "rna", "adt")
  assert predicted.shape == (rna.n_obs, 134)
  assert list(predicted.var_names) == list(run.features("adt"))
  assert list(predicted.obs_names) == list(rna.obs_names)
  assert np.isfinite(predicted.X).all() and (predicted.X >= 0).all()
  assert predicted.uns["clue_prediction"] == {"source": "rna", "target": "adt", "scale": "counts"}


def test_predict_nb_mean_is_proportional_to_the_library_size(run, cells):
  adt = cells["adt"][:50]
  once = run.predict(adt, "adt", "rna", library_size=100.0).X
  sizes = np.linspace(50, 500, 50)
  per_cell = run.predict(adt, "adt", "rna", library_size=sizes).X
  np.testing.assert_allclose(once.sum(axis=1), 100.0, rtol=1e-4)
  np.testing.assert_allclose(per_cell, once * (sizes / 100.0)[:, None], rtol=1e-4)
  log1p = run.predict(adt, "adt", "rna", normalized=True).X
  np.testing.assert_allclose(np.expm1(log1p).sum(axis=1), run._median_library("rna"), rtol=1e-4)


def test_the_default_library_size_is_saved_with_the_run(run):
  saved = run._saved.meta.median_library
  assert set(saved) == {"rna", "adt"}  # Both smoke modalities are NB.
  config = ml_collections.ConfigDict(run.config.to_dict())
  without = dataclasses.replace(run._saved, meta=dataclasses.replace(run._saved.meta, median_library={}))
  older = api.Run(run.workdir, config, without, run.model, run.state, run._mesh)
  assert older._median_library("rna") == pytest.approx(saved["rna"])  # Runs without it read the training file.
  config.data.modalities.adt.path = "/nonexistent/adt.h5ad"
  assert run._median_library("adt") == saved["adt"]
  moved = api.Run(run.workdir, config, run._saved, run.model, run.state, run._mesh)
  assert moved._median_library("adt") == saved["adt"]  # The training file is not needed.
  with pytest.raises(api.RunError, match="training file cannot be read.*pass library_size"):
    older._median_library("adt")


def test_predict_batches(run, cells):
  rna = cells["rna"][:40]
  own = run.predict(rna, "rna", "adt").X
  by_name = {b: run.predict(rna, "rna", "adt", batch=b).X for b in run.batch_categories("adt")}
  own_batch = rna.obs["batch"].astype(str).to_numpy()
  for b, values in by_name.items():
    np.testing.assert_allclose(own[own_batch == b], values[own_batch == b], rtol=1e-5)
  with pytest.raises(api.RunError, match=r"batch='s9d9' is not a batch of 'adt'; known: \['s1d1', 's1d2'\]"):
    run.predict(rna, "rna", "adt", batch="s9d9")
  renamed = rna.copy()
  renamed.obs["batch"] = "s3d7"
  with pytest.raises(api.RunError, match=r"40 cells have a batch that 'adt' was not trained with \(\['s3d7'\]\)"):
    run.predict(renamed, "rna", "adt")


def test_predict_argument_errors(run, cells):
  rna = cells["rna"][:10]
  with pytest.raises(api.RunError, match=r"one positive number per cell \(10\); got shape \(9,\)"):
    run.predict(rna, "rna", "adt", library_size=np.ones(9))
  with pytest.raises(api.RunError, match="normalized='z'"):
    run.predict(rna, "rna", "adt", normalized="z")
  with pytest.raises(api.RunError, match="both 'rna'"):
    run.predict(rna, "rna", "rna")


# ----------------------------------------------------------------------------------- prediction from several sources
@pytest.fixture(scope="module")
def trimodal(cells, tmp_path_factory):
  """(run, MuData): configs/smoke.py for 2 epochs on three modalities, the starter's RNA split in two (genes 0-499
  `rna`, 500-999 `gex`) and its ADT."""
  rna = cells["rna"]
  mdata = mudata.MuData({"rna": rna[:, :500].copy(), "gex": rna[:, 500:].copy(), "adt": cells["adt"].copy()})
  run = clue_jax.fit(mdata, load_config(max_epochs=2), tmp_path_factory.mktemp("trimodal"),
                     gex={"batch_key": "batch", "n_features": 200, "rep_dim": 16},
                     **{"data.modality_order": "rna,adt,gex"})
  return run, mdata


def test_predict_from_a_one_source_tuple_is_the_single_source_prediction(run, cells):
  rna = cells["rna"][:100]
  single = run.predict(rna, "rna", "adt", normalized="clr")
  np.testing.assert_array_equal(run.predict(rna, ("rna",), "adt", normalized="clr").X, single.X)
  np.testing.assert_array_equal(run.predict(rna, ["rna"], "adt", library_size=50.0).X,
                                run.predict(rna, "rna", "adt", library_size=50.0).X)


def test_predict_from_two_sources_decodes_their_normalised_mean_embedding(trimodal):
  run, mdata = trimodal
  assert run.model.normalize_u
  predicted = run.predict(mdata, ("rna", "gex"), "adt", library_size=100.0)
  assert predicted.uns["clue_prediction"]["source"] == ["rna", "gex"]
  assert list(predicted.obs_names) == list(mdata.mod["rna"].obs_names)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  joint = unit((unit(run.encode(mdata, "rna").obsm["X_clue"]) + unit(run.encode(mdata, "gex").obsm["X_clue"])) / 2)
  codes = mdata.mod["rna"].obs["batch"].cat.codes.to_numpy()
  assert list(mdata.mod["rna"].obs["batch"].cat.categories) == list(run.batch_categories("adt"))
  variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
  decoded = run.model.apply(variables, "adt", run.model.subspace(joint, "adt"), codes, np.full(len(codes), 100.0),
                            False, method=CLUE.decode)["mean"]
  np.testing.assert_allclose(predicted.X, decoded, rtol=1e-4, atol=1e-5)
  for one in ("rna", "gex"):  # The joint prediction is neither source's alone.
    assert np.abs(run.predict(mdata, one, "adt", library_size=100.0).X - predicted.X).max() > 1e-3


def test_predict_from_two_sources_takes_the_library_size_of_the_first(trimodal):
  run, mdata = trimodal
  for first, second in (("rna", "gex"), ("gex", "rna")):
    joint = run.predict(mdata, (first, second), "adt").X
    np.testing.assert_allclose(joint.sum(axis=1), run.predict(mdata, first, "adt").X.sum(axis=1), rtol=1e-4)
  fixed = run.predict(mdata, ("gex", "rna"), "adt", library_size=1.0).X
  np.testing.assert_allclose(fixed, run.predict(mdata, ("rna", "gex"), "adt", library_size=1.0).X, atol=1e-6)


def test_predict_from_two_sources_matches_the_cells_by_name(trimodal):
  run, mdata = trimodal
  rna, gex = mdata.mod["rna"], mdata.mod["gex"]
  order = np.random.default_rng(0).permutation(gex.n_obs)
  shuffled = mudata.MuData({"rna": rna[:200].copy(), "gex": gex[order].copy()})
  np.testing.assert_allclose(run.predict(shuffled, ("rna", "gex"), "adt", library_size=10.0).X,
                             run.predict(mdata, ("rna", "gex"), "adt", library_size=10.0).X[:200], rtol=1e-5)


def test_predict_from_several_sources_errors(trimodal):
  run, mdata = trimodal
  with pytest.raises(api.RunError, match=r"takes a MuData holding each of them, got AnnData"):
    run.predict(mdata.mod["rna"], ("rna", "gex"), "adt")
  with pytest.raises(api.RunError, match=r"the MuData has no modality 'gex' \(it has \['rna', 'adt'\]\)"):
    run.predict(mudata.MuData({"rna": mdata.mod["rna"], "adt": mdata.mod["adt"]}), ("rna", "gex"), "adt")
  partial = mudata.MuData({"rna": mdata.mod["rna"].copy(), "gex": mdata.mod["gex"][10:].copy()})
  with pytest.raises(api.RunError, match=r"10 of the 600 cells of 'rna' are not in 'gex'.*subset the MuData"):
    run.predict(partial, ("rna", "gex"), "adt")
  with pytest.raises(api.RunError, match=r"the target 'adt' is among the sources"):
    run.predict(mdata, ("rna", "adt"), "adt")
  with pytest.raises(api.RunError, match=r"names a modality twice"):
    run.predict(mdata, ("rna", "rna"), "adt")
  with pytest.raises(api.RunError, match=r"source=\(\)"):
    run.predict(mdata, (), "adt")
  with pytest.raises(api.RunError, match=r"unknown modality 'atac'"):
    run.predict(mdata, ("rna", "atac"), "adt")


@pytest.mark.parametrize("method", ["snn", "sinkhorn"])
def test_match_returns_an_official_pairing_matrix_within_batches(run, cells, method):
  rna, adt = cells["rna"], cells["adt"]
  result = run.match(rna, "rna", adt, "adt", method=method, batch_key="batch")
  metrics.check_match_prediction(result.matrix, rna.n_obs)
  rows, cols = result.matrix.nonzero()
  assert (rna.obs["batch"].to_numpy()[rows] == adt.obs["batch"].to_numpy()[cols]).all()
  best = np.asarray(result.matrix.argmax(axis=1)).ravel()
  assert list(result.partner.index) == list(rna.obs_names)
  assert list(result.partner) == list(adt.obs_names[best])


def test_match_argument_errors(run, cells):
  with pytest.raises(api.RunError, match="method='knn'"):
    run.match(cells["rna"], "rna", cells["adt"], "adt", method="knn")
  with pytest.raises(api.RunError, match="no obs column 'donor'"):
    run.match(cells["rna"], "rna", cells["adt"], "adt", batch_key="donor")


@pytest.mark.parametrize("method", ["snn", "sinkhorn"])
def test_an_ensemble_of_one_run_matches_as_the_run(run, cells, method):
  rna, adt = cells["rna"][:300], cells["adt"][:300]
  alone = run.match(rna, "rna", adt, "adt", method=method, batch_key="batch")
  ensembled = api.Ensemble([run]).match(rna, "rna", adt, "adt", method=method, batch_key="batch")
  np.testing.assert_allclose(ensembled.matrix.toarray(), alone.matrix.toarray(), atol=1e-5)
  assert (ensembled.partner == alone.partner).all()


def test_an_ensembles_cosine_similarity_is_the_mean_of_its_members():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(3, 20, 8)), rng.normal(size=(3, 15, 8))
  members = [types.SimpleNamespace(modalities=("rna", "adt"), _modality_data=lambda a, m: a,
                                   _embed=lambda c, m, i=i: x[i] if m == "rna" else y[i]) for i in range(3)]
  ensemble = api.Ensemble(members)
  similarity = ensemble._embed(None, "rna") @ ensemble._embed(None, "adt").T
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  np.testing.assert_allclose(similarity, np.mean(unit(x) @ unit(y).transpose(0, 2, 1), axis=0), atol=1e-6)


def test_an_ensemble_needs_runs_of_the_same_modalities(run):
  with pytest.raises(api.RunError, match="at least one run"):
    api.Ensemble([])
  other = types.SimpleNamespace(modalities=("rna", "atac"))
  with pytest.raises(api.RunError, match="embed the same modalities"):
    api.Ensemble([run, other])


# ------------------------------------------------------------------------------------- prediction math, no run
def test_distribution_means_match_scipy():
  loc, scale, zi = np.array([[0.3, -1.0]]), np.array([[0.5, 2.0]]), np.array([[0.0, 1.5]])
  keep = 1 / (1 + np.exp(zi))  # Weight of the continuous part.
  zin = prediction.distribution_mean("ZIN", {"loc": loc, "scale": scale, "zi_logits": zi})
  np.testing.assert_allclose(zin, keep * loc, rtol=1e-6)
  ziln = prediction.distribution_mean("ZILN", {"loc": loc, "scale": scale, "zi_logits": zi})
  np.testing.assert_allclose(ziln, keep * stats.lognorm(s=scale, scale=np.exp(loc)).mean(), rtol=1e-5)
  bernoulli = prediction.distribution_mean("Bernoulli", {"logits": loc})
  np.testing.assert_allclose(bernoulli, stats.bernoulli(1 / (1 + np.exp(-loc))).mean(), rtol=1e-6)


def test_scales():
  counts = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(prediction.on_scale(counts, "log1p", 8.0), np.log1p([[2.0, 6.0, 0.0], [0, 0, 0]]),
                             rtol=1e-6)
  np.testing.assert_array_equal(prediction.on_scale(counts, "clr"), preprocess.clr(counts))
  assert prediction.on_scale(counts, "counts") is counts
