"""`clue_jax.fit` on in-memory data: the model the files train, resuming, continuing, and other data refused."""

import anndata as ad
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import clue_jax
from clue_jax import api, config as config_lib
from clue_jax.train import trainer
from run_helpers import assert_trees_close, load_config, saved_params

EPOCHS = 2


@pytest.fixture(scope="module")
def files_run(tmp_path_factory):
  """configs/smoke.py trained from its files, as the command line does."""
  config = load_config(max_epochs=EPOCHS)
  workdir = tmp_path_factory.mktemp("files")
  trainer.train_and_evaluate(config, workdir)
  return config, workdir


def starter(config) -> dict:
  return {name: ad.read_h5ad(config.data.modalities[name].path) for name in ("rna", "adt")}


def test_fit_on_a_dict_of_anndata_trains_the_model_the_files_train(files_run, tmp_path):
  config, files = files_run
  run = clue_jax.fit(starter(config), config, tmp_path / "run")
  assert isinstance(run, api.Run) and run.epoch >= 1
  assert_trees_close(saved_params(tmp_path / "run", EPOCHS), saved_params(files, EPOCHS), atol=0)
  assert config.data.fingerprint == ""  # The caller's config is not changed.


def test_fit_on_one_anndata_with_proteins_in_obsm(files_run, tmp_path):
  """The totalVI layout in memory trains the model the same layout trains from its file."""
  config, _ = files_run
  cells = starter(config)
  rna, adt = cells["rna"], cells["adt"][cells["rna"].obs_names]
  rna.obsm["protein_expression"] = pd.DataFrame(sp.csr_matrix(adt.layers["counts"]).toarray(), index=rna.obs_names,
                                                columns=adt.var_names)
  path = tmp_path / "rna_with_proteins.h5ad"
  rna.write_h5ad(path)
  on_file = load_config(max_epochs=EPOCHS)
  on_file.data.modalities.rna.path = on_file.data.modalities.adt.path = str(path)
  on_file.data.modalities.adt.obsm_key = "protein_expression"
  trainer.train_and_evaluate(on_file, tmp_path / "file")
  in_memory = load_config(max_epochs=EPOCHS)
  host = ad.read_h5ad(path)
  run = clue_jax.fit(host, in_memory, tmp_path / "memory", adt={"obsm_key": "protein_expression"})
  assert_trees_close(saved_params(tmp_path / "memory", EPOCHS), saved_params(tmp_path / "file", EPOCHS), atol=0)
  # The API reads the same layout: the proteins' embedding from the host AnnData is the one training wrote.
  saved = ad.read_h5ad(tmp_path / "memory" / "embeddings" / "adt.h5ad")
  np.testing.assert_allclose(run.encode(host, "adt").obsm["X_clue"], saved.obsm["X_clue"], rtol=1e-5, atol=1e-5)
  with pytest.raises(api.RunError, match=r"'adt' is read from obsm\['protein_expression'\], so inplace=True"):
    run.encode(host, "adt", inplace=True)


def test_fit_on_a_mudata_resumes_continues_and_refuses_other_data(files_run, tmp_path, capsys):
  config, files = files_run
  cells = mudata.MuData(starter(config))
  workdir = tmp_path / "run"
  clue_jax.fit(cells, config, workdir)
  assert_trees_close(saved_params(workdir, EPOCHS), saved_params(files, EPOCHS), atol=0)
  capsys.readouterr()
  clue_jax.fit(cells, config, workdir)
  assert f"Resuming {workdir} from epoch {EPOCHS}." in capsys.readouterr().out
  run = clue_jax.fit(cells, config, workdir, **{"train.max_epochs": EPOCHS + 1})  # The command line's form.
  continuing = f"Continuing {workdir} from epoch {EPOCHS}, train.max_epochs {EPOCHS} -> {EPOCHS + 1}."
  assert continuing in capsys.readouterr().out
  assert run.epoch <= EPOCHS + 1
  other = {name: adata.copy() for name, adata in cells.mod.items()}
  other["adt"].X = other["adt"].X * 2
  with pytest.raises(api.RunError, match=rf"{workdir} holds a run trained on other data \(fingerprint [0-9a-f]{{16}}, "
                                         r"these inputs [0-9a-f]{16}\); use a new workdir"):
    clue_jax.fit(other, config, workdir, train={"max_epochs": EPOCHS + 1})


def test_fit_names_what_is_missing(files_run, tmp_path):
  config, _ = files_run
  cells = starter(config)
  with pytest.raises(api.RunError, match=r"the config has modalities \['adt'\] that the data lacks"):
    clue_jax.fit({"rna": cells["rna"]}, config, tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"unknown config key 'train.max_epoch': did you mean "
                                                   r"train.max_epochs"):
    clue_jax.fit(cells, config, tmp_path, **{"train.max_epoch": 5})
  with pytest.raises(config_lib.ConfigError, match=r"train.max_epochs='5' has type str; expected int"):
    clue_jax.fit(cells, config, tmp_path, train={"max_epochs": "5"})
  cells["rna"] = cells["rna"].copy()
  del cells["rna"].layers["counts"]
  with pytest.raises(clue_jax.data.dataset.DataError, match=r"the in-memory AnnData of 'rna': no layer 'counts'"):
    clue_jax.fit(cells, config, tmp_path / "run")
