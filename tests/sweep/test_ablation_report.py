"""experiments/ablations.py: aggregation, verdicts, the report and the plot on synthetic scores (no training)."""

import importlib.util
import pathlib

import ml_collections
import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "ablations.py"
SPEC = importlib.util.spec_from_file_location("experiments_ablations", PATH)
ablations = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ablations)


def test_mean_sd_uses_ddof_1_and_skips_missing():
  assert ablations.mean_sd([1.0, 2.0, None, 3.0]) == (2.0, 1.0, 3)
  assert ablations.mean_sd([0.5]) == (0.5, None, 1)
  assert ablations.mean_sd([]) == (None, None, 0)


def test_relative_change():
  assert ablations.relative_change(0.15, 0.2) == pytest.approx(-25.0)
  assert ablations.relative_change(None, 0.2) is None
  assert ablations.relative_change(0.1, 0.0) is None


@pytest.mark.parametrize("ablated, worse_is_lower, expected", [
    ([0.20, 0.21, 0.19], True, "supported"),  # Match probability dropped by 0.1, pooled sd 0.01.
    ([0.40, 0.41, 0.39], True, "not supported"),
    ([0.30, 0.32, 0.27], True, "inconclusive (sd overlaps)"),
    ([0.40, 0.41, 0.39], False, "supported"),  # FOSCTTM rose: worse.
    ([0.20], True, "inconclusive (n < 2)"),
    ([], True, "no data"),
])
def test_verdict(ablated, worse_is_lower, expected):
  assert ablations.verdict([0.30, 0.31, 0.29], ablated, worse_is_lower) == expected


def test_setting_labels():
  assert ablations.setting_label({"seed": 1}) == "full model"
  assert ablations.setting_label({"seed": 0, "loss.lam_align": 0.0}) == "no adversarial"
  assert ablations.setting_label({"data.modalities.rna.batch_key": "", "data.modalities.adt.batch_key": "",
                                  "model.shared_batches": False}) == "no batch covariate"
  assert ablations.setting_label({"model.shared_latent": True}) == "shared latent (no modality subspaces)"


def synthetic_result(workdir: pathlib.Path, labelled: bool) -> dict:
  config = ml_collections.ConfigDict({"data": {"heldout_pairs": 0.2},
                                      "train": {"max_epochs": -1, "auto_epoch_cap": 100}})
  numbers = {"full model": (0.30, 0.08), "no adversarial": (0.15, 0.12), "no joint-cross": (0.31, 0.08)}
  rows = []
  for setting, (probability, foscttm) in numbers.items():
    for seed in range(3):
      finished = setting != "no joint-cross" or seed == 0
      scores = {"match_probability": probability + 0.01 * (seed - 1), "foscttm": foscttm + 0.001 * seed,
                "label_transfer": 0.8 if labelled else None, "chance": 1 / 60, "heldout_cells": 120, "batches": 2,
                "pair": "rna_adt", "restored_epoch": 100, "epochs_run": 100, "max_epochs": 100}
      rows.append({"name": f"{setting}-{seed}", "setting": setting, "seed": seed, "stale": False,
                   "scores": scores if finished else None})
  return {"dataset": "cite" if labelled else "pbmc", "workdir": workdir, "config": config, "rows": rows}


def test_report_and_plot(tmp_path):
  results = [synthetic_result(tmp_path, True), synthetic_result(tmp_path, False),
             {"dataset": "multiome", "workdir": tmp_path / "absent", "config": None, "rows": []}]
  text = ablations.report(results, "python experiments/ablations.py")
  assert "| full model | 3/3 | 100/100 | 0.300 ± 0.010 |  | 0.081 ± 0.001 |  | 0.800 ± 0.000 |  |" in text
  assert "| no adversarial | 3/3 | 100/100 | 0.150 ± 0.010 | -50.0 % |" in text
  assert "| adversarial loss | -47.3 % | cite | no adversarial | 3/3 | -50.0 % | supported |" in text
  assert "| cross loss | -17.6 % | pbmc | no joint-cross | 3/1 | +0.0 % | inconclusive (n < 2) |" in text
  assert "n/a" in text.split("## pbmc")[1].split("## ")[0]
  assert "Missing (not finished): no joint-cross (seed 1, 2)." in text
  assert "No grid yet" in text and "Not in this table (no finished point): multiome." in text
  ablations.write_plot(results, tmp_path / "ablations.png")
  assert (tmp_path / "ablations.png").stat().st_size > 10_000


def test_train_grid_runs_the_sweep(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(ablations.subprocess, "run",
                      lambda command, **kwargs: calls.append((command, kwargs)) or type("Done", (), {"returncode": 0}))
  assert ablations.train_grid("cite", tmp_path / "ablations_cite", 2) == 0
  (command, kwargs), = calls
  assert command[1:] == ["-m", "clue_jax.sweep", f"--config={ablations.ROOT}/configs/ablations/cite.py",
                         f"--workdir={tmp_path}/ablations_cite", "--parallel=2"]
  assert kwargs["cwd"] == ablations.ROOT
