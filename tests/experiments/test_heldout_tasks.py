"""experiments/heldout_tasks.py: the held-out-site task files of a tiny synthetic paired MuData, read back."""

import importlib.util
import pathlib

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

from clue_jax.competition import task_data
from clue_jax.evaluate import metrics

PATH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "heldout_tasks.py"
SPEC = importlib.util.spec_from_file_location("experiments_heldout_tasks", PATH)
heldout_tasks = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(heldout_tasks)


def paired_mudata(n=40, seed=0):
  rng = np.random.default_rng(seed)
  sites = np.array([f"site{1 + i % 4}" for i in range(n)])
  obs = pd.DataFrame({"Site": sites, "batch": [f"s{s[-1]}d{1 + i % 2}" for i, s in enumerate(sites)],
                      "cell_type": rng.choice(["B", "T", "NK"], n)}, index=[f"cell{i}" for i in range(n)])
  rna = ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n, 12)).astype(np.float32) + 1), obs=obs.copy(),
                   var=pd.DataFrame({"gene_id": [f"ENSG{j}" for j in range(12)]}, index=[f"g{j}" for j in range(12)]))
  adt = ad.AnnData(X=sp.csr_matrix(rng.poisson(5.0, (n, 4)).astype(np.float32)), obs=obs.copy(),
                   var=pd.DataFrame(index=[f"p{j}" for j in range(4)]))
  return md.MuData({"rna": rna, "adt": adt})


def test_site_split_pairings_and_read_back(tmp_path):
  mdata = paired_mudata()
  prefixes = heldout_tasks.write_task_files(mdata, tmp_path, "tiny_site4")
  files = task_data.read_task(prefixes["match_modality"], task_data.KINDS + ("test_sol",))
  test_names = files["test_mod1"].obs_names
  assert set(test_names) == {f"cell{i}" for i in range(3, 40, 4)}  # site4 = every 4th cell from cell3.
  assert set(files["train_mod1"].obs_names).isdisjoint(test_names) and files["train_mod1"].n_obs == 30
  assert list(files["test_mod2"].obs_names) == [str(j) for j in range(10)]
  adt = mdata.mod["adt"]
  for split in ("train", "test"):
    mod1, mod2, sol = files[f"{split}_mod1"], files[f"{split}_mod2"], files[f"{split}_sol"]
    partner = task_data.partners(sol, split)
    # Row i of mod1 is the cell whose ADT counts sit in the shuffled mod2 row partner[i].
    np.testing.assert_array_equal(mod2.layers["counts"][partner].toarray(), adt[mod1.obs_names].X.toarray())
    np.testing.assert_array_equal(sol.uns["pairing_ix"][partner], np.arange(mod1.n_obs))
    assert (mod2.obs["batch"].to_numpy()[partner] == mod1.obs["batch"].to_numpy()).all()
    assert metrics.match_probability(sol.X, sol.X) == 1.0
  assert split == "test" and not (partner == np.arange(len(partner))).all()  # The test rows are shuffled.
  np.testing.assert_allclose(files["test_mod1"].X.toarray(), np.log1p(
      files["test_mod1"].layers["counts"].toarray() / files["test_mod1"].obs["size_factors"].to_numpy()[:, None]),
      rtol=1e-5)
  assert task_data.feature_type(files["test_mod2"], "") == "ADT"
  predict = task_data.read_task(prefixes["predict_modality"], ("test_mod1", "test_mod2"))
  assert (predict["test_mod1"].obs_names == test_names).all()
  assert (predict["test_mod2"].obs_names == test_names).all()
  solution = task_data.read_task(prefixes["joint_embedding"], ("solution",))["solution"]
  assert (solution.obs["cell_type"] == mdata.mod["rna"].obs["cell_type"]).all()
  staged = task_data.stage_files(prefixes["match_modality"], ("rna", "adt"), tmp_path / "staged")
  pretrain = {n: ad.read_h5ad(p) for n, p in staged["pretrain"].items()}
  np.testing.assert_array_equal(pretrain["adt"].layers["counts"].toarray(),
                                adt[pretrain["rna"].obs["task_obs_name"]].X.toarray())
