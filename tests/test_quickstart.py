"""docs/quickstart.ipynb runs top to bottom (on fewer cells and epochs), so the notebook in the docs never rots."""

import copy
import json
import pathlib

import matplotlib
import numpy as np

from clue_jax import config as config_lib

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "docs" / "quickstart.ipynb"


def code_cells() -> list:
  notebook = json.loads(NOTEBOOK.read_text())
  return [("".join(c["source"]), c["metadata"].get("tags", [])) for c in notebook["cells"] if c["cell_type"] == "code"]


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  matplotlib.use("Agg")
  small = config_lib.get_config()  # The notebook's defaults with smaller layers: the plumbing, in a third the time.
  small.model.update(latent_dim=10, encoder_width=64, decoder_width=64, discriminator_width=64)
  monkeypatch.setattr(config_lib, "get_config", lambda: copy.deepcopy(small))
  cells = code_cells()
  assert cells[0][1] == ["parameters"]
  namespace = {}
  exec(cells[0][0], namespace)
  assert namespace["n_cells"] is None and namespace["max_epochs"] >= 10  # The notebook itself trains on everything.
  namespace.update(n_cells=1500, max_epochs=2, workdir=str(tmp_path / "quickstart"))
  for i, (source, _) in enumerate(cells[1:], 1):
    exec(compile(source, f"{NOTEBOOK.name} code cell {i}", "exec"), namespace)
  mdata = namespace["mdata"]
  assert mdata.n_obs == 1500 and np.isfinite(mdata.obsm["X_clue"]).all()
  assert mdata.mod["adt"].obsm["X_clue"].shape[0] == mdata.mod["adt"].n_obs
  assert namespace["predicted"].shape == (1500, 14)
  assert 0 <= namespace["foscttm"] < 0.5 and namespace["top1"] > 1 / mdata.mod["adt"].n_obs
  assert len(namespace["fig"].axes) == 3
  matplotlib.pyplot.close("all")
