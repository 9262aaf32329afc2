"""The evaluator on hand-built embeddings with known answers, and `python -m clue_jax.evaluate` on a smoke run
(trained once, with periodic evaluation and end-of-training plots on)."""

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from clue_jax import config as config_lib
from clue_jax.evaluate import evaluation, metrics, run_outputs, run_report
from clue_jax.train import trainer
from run_helpers import ROOT, load_config, tensorboard_tags

TYPES = ("B", "T", "NK")


def clustered_cells(n_per_type=20, seed=0):
  """Cells in three far-apart clusters: (embedding, obs with cell_type / batch / a pseudotime)."""
  rng = np.random.default_rng(seed)
  centres = np.array([[0.0, 0.0, 0.0], [50.0, 0.0, 0.0], [0.0, 50.0, 0.0]])
  labels = np.repeat(TYPES, n_per_type)
  x = centres[np.repeat(np.arange(3), n_per_type)] + rng.normal(size=(3 * n_per_type, 3))
  obs = pd.DataFrame({"cell_type": labels, "batch": np.tile(["b1", "b2"], 3 * n_per_type // 2)},
                     index=[f"cell{i}" for i in range(len(x))])
  return x, obs


def test_perfect_pairing_scores_zero_foscttm_and_full_label_transfer():
  x, obs = clustered_cells()
  order = np.random.default_rng(1).permutation(len(x))  # ADT rows in another order: pairing is by name.
  adt_obs = obs.iloc[order][["batch"]]  # Labels only on the RNA side: they reach ADT cells through the pairing.
  result = evaluation.evaluate({"rna": x, "adt": x[order]}, {"rna": obs, "adt": adt_obs}, label_key="cell_type",
                               batch_key="batch")
  assert result["cells"] == {"rna": 60, "adt": 60, "heldout": 0} and "heldout" in result["notes"]
  assert result["foscttm"] == {"rna_adt": 0.0}
  assert result["top1"] == {"rna_to_adt": 1.0, "adt_to_rna": 1.0}
  assert result["label_transfer"] == {"rna_to_adt": 1.0, "adt_to_rna": 1.0}
  joint = result["joint"]
  assert joint["nmi"] == 1.0 and joint["graph_conn"] == 1.0 and joint["asw_label"] > 0.9
  assert joint["cc_cons"] is None and joint["ti_cons_batch_mean"] is None
  assert "cc_cons" in result["notes"] and "ti_cons_batch_mean" in result["notes"]
  json.dumps(result, allow_nan=False)


def test_swapped_partners_and_heldout_cells_are_scored_apart():
  x, obs = clustered_cells()
  y = x.copy()
  y[[0, 1]] = y[[1, 0]]  # Cells 0 and 1 (same cluster) swap places in ADT.
  heldout = ["cell0", "cell1", "cell30"]
  result = evaluation.evaluate({"rna": x, "adt": y}, {"rna": obs, "adt": obs}, heldout_ids=heldout,
                               metric_names=("foscttm", "top1"))
  assert result["cells"]["heldout"] == 3
  expected_top1 = (len(x) - 2) / len(x)
  assert result["top1"] == {"rna_to_adt": expected_top1, "adt_to_rna": expected_top1}
  assert result["foscttm"]["rna_adt"] == pytest.approx(metrics.foscttm(x, y))
  assert result["heldout_foscttm"]["rna_adt"] == pytest.approx(metrics.foscttm(x[[0, 1, 30]], y[[0, 1, 30]]))
  assert result["heldout_top1"]["rna_to_adt"] == pytest.approx(1 / 3)
  assert "label_transfer" not in result and "joint" not in result


def test_chunked_matching_scores_equal_the_metrics_over_chunk_boundaries():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(evaluation.CHUNK + 57, 6))
  y = x + rng.normal(scale=0.8, size=x.shape)
  scores = evaluation.matching_scores(x, y)
  assert scores["foscttm"].mean() == pytest.approx(metrics.foscttm(x, y), abs=1e-12)
  assert scores["top1_ab"].mean() == pytest.approx(metrics.top1_accuracy(x, y))
  assert scores["top1_ba"].mean() == pytest.approx(metrics.top1_accuracy(y, x))


def test_missing_inputs_are_notes_and_present_ones_are_scored():
  x, obs = clustered_cells()
  obs = obs.assign(pseudotime_order_GEX=np.where(obs["cell_type"] == "NK", np.nan, np.arange(len(obs), dtype=float)),
                   S_score=np.sin(np.arange(len(obs))), G2M_score=np.cos(np.arange(len(obs))))
  genes = np.random.default_rng(3).gamma(1.0, size=(len(obs), 30))
  expression = ad.AnnData(genes, obs=pd.DataFrame(index=obs.index[::-1]))  # Aligned by name.
  result = evaluation.evaluate({"rna": x, "adt": x}, {"rna": obs, "adt": obs}, label_key="cell_type",
                               expression=expression)
  assert result["joint"]["cc_cons"] is not None and result["joint"]["ti_cons_batch_mean"] is not None
  assert result["joint"]["asw_batch"] is None and "asw_batch" in result["notes"]
  unlabelled = evaluation.evaluate({"rna": x, "adt": x}, {"rna": obs, "adt": obs})
  assert "label_transfer" not in unlabelled and "joint" not in unlabelled
  assert {"label_transfer", "joint"} <= set(unlabelled["notes"])


def test_subsample_and_argument_errors():
  x, obs = clustered_cells()
  result = evaluation.evaluate({"rna": x, "adt": x}, {"rna": obs, "adt": obs}, max_cells=25,
                               metric_names=("foscttm",))
  assert result["cells"]["rna"] == result["cells"]["adt"] == 25
  with pytest.raises(ValueError, match="no obs column 'celltype'.*cell_type"):
    evaluation.evaluate({"rna": x, "adt": x}, {"rna": obs, "adt": obs}, label_key="celltype")
  with pytest.raises(ValueError, match="foscttm,top1,label_transfer,joint"):
    evaluation.parse_metrics("foscttm,nmi")
  config = load_config()
  config.evals.metrics = "foscttm,accuracy"
  with pytest.raises(config_lib.ConfigError, match="evals.metrics"):
    config_lib.validate(config)


def test_evaluation_settings_do_not_block_a_resume():
  a, b = load_config(), load_config()
  b.evals.every_epochs, b.evals.plots = 7, True
  assert config_lib.comparable(a.to_dict()) == config_lib.comparable(b.to_dict())


# ------------------------------------------------------------------------------------------------- a real run
def test_periodic_evaluation_is_logged_when_due(smoke_run):
  workdir, _, _ = smoke_run
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {r["epoch"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in records}
  assert [e for e, values in logged.items() if values] == [2, 4]
  expected = {"eval/foscttm/rna_adt", "eval/top1/rna_to_adt", "eval/top1/adt_to_rna", "eval/heldout_foscttm/rna_adt",
              "eval/label_transfer/rna_to_adt", "eval/label_transfer/adt_to_rna"}
  assert expected <= set(logged[4])
  assert all(0 <= v <= 1 for v in logged[4].values())
  assert expected <= tensorboard_tags(workdir / "tb")


def test_training_writes_plots_at_the_end(smoke_run):
  workdir, _, summary = smoke_run
  assert set(summary["plots"]["written"]) == {f"plots/{name}.png" for name in (
      "umap_modality", "umap_label", "umap_batch", "losses", "eval_curves", "foscttm_by_cell_type")}
  for name in summary["plots"]["written"]:
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_cells_are_those_training_hid(smoke_run):
  workdir, config, _ = smoke_run
  dataset = trainer.load_data(config)
  hidden = {str(dataset.modalities["rna"].obs.index[r]) for r in dataset.heldout["rna"]}
  assert set(run_outputs.load(workdir).heldout_ids) == hidden and len(hidden) == 60


def test_cli_writes_eval_json(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  labels = ad.read_h5ad(ROOT / "clue_jax" / "datasets" / "bmmc_cite_starter" / "adt.h5ad")
  annotation = ad.AnnData(obs=pd.DataFrame({"lineage": labels.obs["cell_type"].astype(str).str.split(" ").str[0]},
                                           index=labels.obs_names))
  annotation.write_h5ad(tmp_path / "lineage.h5ad")
  result = run_report.run(workdir, [str(tmp_path / "lineage.h5ad")], label_key="lineage", max_cells=200)
  written = json.loads((workdir / "eval.json").read_text())
  assert written == result and not list(workdir.glob("eval.json.tmp"))
  assert written["label_key"] == "lineage" and written["batch_key"] == "batch"
  assert written["cells"] == {"rna": 200, "adt": 200, "heldout": written["cells"]["heldout"]}
  for key in ("foscttm", "top1", "heldout_foscttm", "heldout_top1", "label_transfer", "joint", "notes"):
    assert key in written, key
  assert set(written["joint"]) == {"asw_batch", "asw_label", "cc_cons", "graph_conn", "nmi", "ti_cons_batch_mean",
                                   "arithmetic_mean"}
  assert written["joint"]["cc_cons"] is None and "cc_cons" in written["notes"]


def test_cli_errors_name_the_problem(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  with pytest.raises(run_report.EvaluateError, match="--label_key=celltype: no such obs column.*cell_type"):
    run_report.run(workdir, label_key="celltype")
  stranger = ad.AnnData(obs=pd.DataFrame({"cell_type": ["x", "y"]}, index=["other1", "other2"]))
  stranger.write_h5ad(tmp_path / "stranger.h5ad")
  with pytest.raises(run_report.EvaluateError, match="stranger.h5ad: none of its 2 obs_names"):
    run_report.run(workdir, [str(tmp_path / "stranger.h5ad")])
  done = subprocess.run([sys.executable, "-m", "clue_jax.evaluate", f"--workdir={tmp_path}"], capture_output=True,
                        text=True, cwd=ROOT, check=False)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}: no finished run there")
