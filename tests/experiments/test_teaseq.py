"""experiments/teaseq.py: the held-out split, the mosaic's training cells and the joint embedding, on a tiny MuData."""

import importlib.util
import pathlib

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd

PATH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "teaseq.py"
SPEC = importlib.util.spec_from_file_location("experiments_teaseq", PATH)
teaseq = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(teaseq)


def trimodal(n=60):
  obs = pd.DataFrame({"cell_type": np.repeat(["B", "T", "NK"], n // 3)}, index=[f"c{i}" for i in range(n)])
  return md.MuData({m: ad.AnnData(X=np.ones((n, 3), np.float32), obs=obs.copy()) for m in teaseq.NAMES})


def test_split_holds_out_a_fraction_and_drops_disjoint_thirds_of_the_training_cells():
  mdata = trimodal()
  cells = teaseq.split(mdata.obs_names, seed=1, fraction=0.2)
  assert cells == teaseq.split(mdata.obs_names, seed=1, fraction=0.2) != teaseq.split(mdata.obs_names, 2, 0.2)
  heldout, train = set(cells["heldout"]), set(cells["train"])
  assert len(heldout) == 12 and not heldout & train and heldout | train == set(mdata.obs_names)
  no_adt, no_atac = set(cells["no_adt"]), set(cells["no_atac"])
  assert len(no_adt) == len(no_atac) == 16 and not no_adt & no_atac and no_adt | no_atac <= train


def test_training_data_of_each_setting():
  mdata = trimodal()
  cells = teaseq.split(mdata.obs_names, seed=0, fraction=0.2)
  full = teaseq.training_data(mdata, cells, "trimodal")
  assert all(list(full.mod[m].obs_names) == cells["train"] for m in teaseq.NAMES)
  mosaic = teaseq.training_data(mdata, cells, "mosaic")
  assert list(mosaic.mod["rna"].obs_names) == cells["train"]
  assert set(mosaic.mod["adt"].obs_names) == set(cells["train"]) - set(cells["no_adt"])
  assert set(mosaic.mod["atac"].obs_names) == set(cells["train"]) - set(cells["no_atac"])


def test_joint_is_the_normalised_mean_over_the_modalities_a_cell_has():
  names = pd.Index(["a", "b"])
  joint = teaseq.joint({"rna": (pd.Index(["a", "b"]), np.array([[2.0, 0.0], [0.0, 3.0]])),
                        "adt": (pd.Index(["a"]), np.array([[0.0, 5.0]]))}, names)
  np.testing.assert_allclose(joint, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, 1.0]], atol=1e-12)
