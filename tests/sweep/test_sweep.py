"""Grids of overrides, their checks, the ablation configs, and `python -m clue_jax.sweep` on a tiny grid."""

import csv
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

from clue_jax import config as config_lib
from clue_jax.sweep import grid, report, runner

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.py"


def smoke_config():
  return config_lib.load_module(SMOKE).get_config()


def write_grid(tmp_path, sweep_body: str, name="grid.py") -> pathlib.Path:
  """A config file: configs/smoke.py at 2 epochs, with `get_sweep()` returning `sweep_body`."""
  path = tmp_path / name
  path.write_text(
      "from clue_jax import config as config_lib\n"
      "from clue_jax.sweep import grid\n"
      f"SMOKE = config_lib.load_module({str(SMOKE)!r})\n"
      "def get_config():\n"
      "  config = SMOKE.get_config()\n"
      "  config.train.max_epochs = 2\n"
      "  return config\n"
      "def get_sweep():\n"
      f"  return {sweep_body}\n")
  return path


# ----------------------------------------------------------------------------------------------------- grids
def test_product_merges_one_point_per_axis_with_the_last_axis_fastest():
  points = grid.product(grid.axis("seed", [0, 1]), grid.axis("loss.lam_align", [0.0, 0.02]))
  assert points == [{"seed": 0, "loss.lam_align": 0.0}, {"seed": 0, "loss.lam_align": 0.02},
                    {"seed": 1, "loss.lam_align": 0.0}, {"seed": 1, "loss.lam_align": 0.02}]


def test_zip_pairs_points_and_composes_with_product():
  zipped = grid.zip_axes(grid.axis("loss.lam_cos", [0.0, 1.0]), grid.axis("loss.lam_align", [0.0, 2.0]))
  assert zipped == [{"loss.lam_cos": 0.0, "loss.lam_align": 0.0}, {"loss.lam_cos": 1.0, "loss.lam_align": 2.0}]
  points = grid.product(zipped, grid.axis("seed", [0, 1, 2]))
  assert len(points) == 6 and points[5] == {"loss.lam_cos": 1.0, "loss.lam_align": 2.0, "seed": 2}


def test_ambiguous_grids_are_refused():
  with pytest.raises(grid.GridError, match=r"lengths \[2, 3\]"):
    grid.zip_axes(grid.axis("seed", [0, 1]), grid.axis("loss.lam_cos", [0.0, 0.5, 1.0]))
  with pytest.raises(grid.GridError, match="seed set by more than one axis"):
    grid.product(grid.axis("seed", [0]), grid.axis("seed", [1]))
  with pytest.raises(grid.GridError, match="no values"):
    grid.axis("seed", [])


def test_run_names_are_readable_filesystem_safe_and_unique():
  points = [{"seed": 0}, {"seed": 1, "loss.lam_align": 0.0},
            {"data.modalities.rna.batch_key": "", "data.modalities.adt.batch_key": "", "seed": 1},
            {"data.modalities.rna.path": "/data/a b.h5ad"}, {"data.modalities.rna.path": "/data/a_b.h5ad"},
            {"data.modalities.rna.path": "x" * 300}]
  names = grid.run_names(points)
  assert names[:3] == ["base--seed-0", "lam_align-0.0--seed-1", "rna.batch_key-none--adt.batch_key-none--seed-1"]
  # Two paths that sanitise to the same text are told apart by a hash of the point.
  assert names[3].startswith("path-_data_a_b.h5ad-") and names[4].startswith("path-_data_a_b.h5ad-")
  assert len(set(names)) == len(names)
  assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", n) and len(n) <= grid.MAX_NAME for n in names)
  assert names == grid.run_names(points), "names must not depend on anything but the points"


def test_setting_names_drop_the_seed_and_are_shared_by_equal_settings():
  points = [{"seed": 0}, {"loss.lam_align": 0.0, "seed": 0}, {"loss.lam_align": 0.0, "seed": 1}]
  assert grid.setting_names(points) == ["base", "lam_align-0.0", "lam_align-0.0"]


# ------------------------------------------------------------------------------------------------- overrides
def test_overrides_are_converted_like_the_command_line_and_leave_the_base_alone():
  base = smoke_config()
  config = config_lib.apply_overrides(base, {"loss.lam_align": 0, "train.max_epochs": 7,
                                             "model.shared_batches": False, "data.modalities.rna.batch_key": ""})
  assert type(config.loss.lam_align) is float and config.loss.lam_align == 0.0
  assert config.train.max_epochs == 7 and config.model.shared_batches is False
  assert config.data.modalities.rna.batch_key == ""
  assert base.loss.lam_align == 0.02 and base.model.shared_batches is True


@pytest.mark.parametrize("overrides, message", [
    ({"loss.lam_algn": 0.0}, "unknown config key 'loss.lam_algn': did you mean loss.lam_align"),
    ({"train.max_epoch": 3}, "did you mean train.max_epochs"),
    ({"data.modalities": ""}, "did you mean data.modalities.adt."),
    ({"train.max_epochs": 2.5}, r"train.max_epochs=2.5 has type float; expected int \(its default is 3\)"),
    ({"train.max_epochs": True}, "train.max_epochs=True has type bool; expected int"),
    ({"model.shared_batches": 1}, "model.shared_batches=1 has type int; expected bool"),
    ({"loss.lam_align": "0"}, "loss.lam_align='0' has type str; expected float"),
])
def test_bad_overrides_name_the_key_and_the_fix(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(smoke_config(), overrides)


def test_every_point_is_checked_before_any_runs(tmp_path):
  typo = write_grid(tmp_path, '[{"seed": 0}, {"seed": 1}, {"loss.lam_algn": 0.0}]')
  with pytest.raises(config_lib.ConfigError, match=r"grid.py: get_sweep\(\) point 2 \(lam_algn-0.0\): unknown "
                                                   r"config key 'loss.lam_algn': did you mean loss.lam_align"):
    runner.load_grid(str(typo))
  repeat = write_grid(tmp_path, '[{"loss.lam_align": 0}, {"loss.lam_align": 0.0}]', "repeat.py")
  with pytest.raises(grid.GridError, match="points 0 and 1 are both"):
    runner.load_grid(str(repeat))
  (tmp_path / "plain.py").write_text((ROOT / "configs" / "smoke.py").read_text())
  with pytest.raises(grid.GridError, match=r"plain.py defines no get_sweep\(\)"):
    runner.load_grid(str(tmp_path / "plain.py"))
  assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------- ablations
@pytest.mark.parametrize("spec", ["cite.py", "multiome.py", "pbmc.py", "pbmc.py:competition"])
def test_ablation_grids_cover_every_setting_with_three_seeds(spec):
  points = runner.load_grid(str(ROOT / "configs" / "ablations" / spec))
  settings = {}
  for point in points:
    settings.setdefault(point.setting, []).append(point.overrides["seed"])
    assert point.config.data.heldout_pairs > 0, "the ablations are compared on held-out FOSCTTM"
  assert len(settings) == 8 and all(sorted(seeds) == [0, 1, 2] for seeds in settings.values())
  assert len({p.name for p in points}) == len(points)
  removed = {next(iter(grid.setting(p.overrides)), "") for p in points}
  assert {"loss.lam_align", "loss.lam_cos", "loss.lam_joint_cross", "loss.lam_real_cross", "loss.lam_kl",
          "model.shared_latent"} < removed
  no_batch = [p.config for p in points if all(m.batch_key == "" for m in p.config.data.modalities.values())]
  assert len(no_batch) == 3 and not any(c.model.shared_batches for c in no_batch)


@pytest.mark.parametrize("dataset", ["cite", "multiome", "pbmc"])
def test_plus_grids_hold_faithful_plus_and_plus_without_each_part(dataset):
  """configs/plus/sweep.py:<dataset> (get_sweep takes the file's argument): the faithful config is the dataset's
  ablation config untouched, the plus point its recipe, and each ablation differs from plus in one part only (a
  one-part recipe has no ablation: without its part it is the faithful config)."""
  recipe = config_lib.load_module(ROOT / "configs" / "plus" / "recipe.py")
  points = runner.load_grid(f"{ROOT / 'configs' / 'plus' / 'sweep.py'}:{dataset}")
  parts = recipe.RECIPES[dataset]
  by_setting = {}
  for point in points:
    by_setting.setdefault(point.setting, []).append(point)
  ablations = len(parts) if len(parts) > 1 else 0
  assert len(by_setting) == 2 + ablations and all(len(p) == 3 for p in by_setting.values())
  base = config_lib.load_module(ROOT / "configs" / "precision.py").get_config(dataset)
  faithful = next(p for p in points if not grid.setting(p.overrides)).config
  assert faithful.loss.to_dict() == base.loss.to_dict() and faithful.train.monitor == "val_loss"
  plus = recipe.overrides(dataset)
  assert {k: v for p in points for k, v in grid.setting(p.overrides).items()} == plus
  for part in parts:
    without = recipe.overrides(dataset, without=part)
    assert set(plus) - set(without) == set(recipe.PARTS[part])
    assert any(grid.setting(p.overrides) == without for p in points), part


@pytest.mark.parametrize("dataset", ["cite", "multiome", "pbmc"])
def test_plus_confirmation_grids_hold_faithful_and_plus_on_seeds_3_to_5(dataset):
  recipe = config_lib.load_module(ROOT / "configs" / "plus" / "recipe.py")
  main = runner.load_grid(f"{ROOT / 'configs' / 'plus' / 'sweep.py'}:{dataset}")
  points = runner.load_grid(f"{ROOT / 'configs' / 'plus' / 'sweep.py'}:{dataset}_confirm")
  assert sorted((p.overrides[grid.SEED], json.dumps(grid.setting(p.overrides), sort_keys=True)) for p in points) == \
      sorted((seed, json.dumps(s, sort_keys=True)) for seed in (3, 4, 5) for s in ({}, recipe.overrides(dataset)))
  faithful = next(p for p in points if not grid.setting(p.overrides)).config
  assert faithful.data.to_dict() == main[0].config.data.to_dict()


# ---------------------------------------------------------------------------------------------------- report
def fake_run(run_dir: pathlib.Path, foscttm: float, val_gen: float):
  """The files a finished run leaves: summary.json and metrics.jsonl (its restored epoch 2 is not the last)."""
  run_dir.mkdir(parents=True)
  (run_dir / "summary.json").write_text(json.dumps(
      {"epochs_run": 3, "restored_epoch": 2, "early_stopped": True, "heldout_foscttm": foscttm}))
  (run_dir / "metrics.jsonl").write_text("".join(
      json.dumps({"epoch": e, "train/loss_gen": 10.0 + e, "val/loss_gen": val_gen if e == 2 else -1.0, "lr": 1e-3})
      + "\n" for e in (1, 2, 3)))


def test_report_averages_seeds_per_setting_and_lists_every_point(tmp_path):
  fake_run(tmp_path / "a--seed-0", 0.1, 5.0)
  fake_run(tmp_path / "a--seed-1", 0.3, 7.0)
  (tmp_path / "a--seed-1" / "eval.json").write_text(json.dumps({"knn": {"accuracy": 0.9}, "n": True}))
  results = [
      report.Result("a--seed-0", "a", {"seed": 0}, "done", "trained", 12.0),
      report.Result("a--seed-1", "a", {"seed": 1}, "done", "skipped"),
      report.Result("a--seed-2", "a", {"seed": 2}, "failed", "trained", 3.0, "train.lr=-1 is | not allowed"),
      report.Result("b--seed-0", "b", {"seed": 0}),
  ]
  report.write(tmp_path, "grid.py", results)
  rows = read_csv(tmp_path / "summary.csv")
  assert list(rows) == ["a--seed-0", "a--seed-1", "a--seed-2", "b--seed-0"]
  assert (rows["a--seed-0"]["val/loss_gen"], rows["a--seed-0"]["train/loss_gen"]) == ("5.0", "12.0")
  assert rows["a--seed-0"]["restored_epoch"] == "2" and "lr" not in rows["a--seed-0"]
  assert (rows["a--seed-1"]["eval/knn/accuracy"], rows["a--seed-0"]["eval/knn/accuracy"]) == ("0.9", "")
  assert "eval/n" not in rows["a--seed-1"], "booleans are not metrics"
  assert [rows[n]["status"] for n in rows] == ["done", "done", "failed", "pending"]
  markdown = (tmp_path / "summary.md").read_text()
  assert "4 points: 2 done, 1 failed, 1 pending" in markdown
  # mean ± sample sd over the finished seeds: FOSCTTM 0.2 ± 0.14, train loss 12 ± 0, validation loss 6 ± 1.4.
  assert "| a | 2/3 | 0.2 ± 0.14 | 12 ± 0 | 6 ± 1.4 | 0.9 |" in markdown
  assert "| b | 0/1 |  |  |  |  |" in markdown
  assert "| a--seed-2 | failed (trained) |  |  |  |  |  | train.lr=-1 is \\| not allowed |" in markdown
  assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_report_only_summarises_what_the_workdir_holds_and_trains_nothing(tmp_path):
  """`--report_only` (runner.write_report): finished points with their metrics, the others pending."""
  spec = write_grid(tmp_path, 'grid.axis("seed", [0, 1])')
  points = runner.load_grid(str(spec))
  workdir = tmp_path / "runs"
  fake_run(workdir / points[0].name, 0.25, 6.0)
  (workdir / points[0].name / "config.json").write_text(json.dumps(points[0].config.to_dict()))
  results = runner.write_report(str(spec), workdir)
  assert [(r.status, r.action) for r in results] == [("done", "skipped"), ("pending", "")]
  rows = read_csv(workdir / "summary.csv")
  assert rows[points[0].name]["heldout_foscttm"] == "0.25" and rows[points[1].name]["status"] == "pending"
  assert "2 points: 1 done, 0 failed, 1 pending" in (workdir / "summary.md").read_text()
  assert not (workdir / points[1].name).exists()


# ---------------------------------------------------------------------------------------------- end to end
def run_cli(spec: pathlib.Path, workdir: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu")
  for key in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs"):
    env[key.upper()] = str(getattr(jax.config, key))
  command = [sys.executable, "-m", "clue_jax.sweep", f"--config={spec}", f"--workdir={workdir}", "--parallel=2"]
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def read_csv(path: pathlib.Path) -> dict:
  with open(path) as f:
    return {row["name"]: row for row in csv.DictReader(f)}


def test_sweep_runs_reports_skips_and_resumes(tmp_path):
  # A point that passes the type checks but not the config validation (first: it fails while the others train), and
  # two seeds of one setting (a float, a bool and an empty string that must survive the command line).
  spec = write_grid(tmp_path, '[{"train.lr": -1.0}] + grid.product(grid.axis("seed", [0, 1]), [{"loss.lam_cos": 0.5, '
                    '"model.shared_batches": False, "data.modalities.adt.batch_key": ""}])')
  workdir = tmp_path / "runs"
  first = run_cli(spec, workdir)
  assert first.returncode == 1 and "1 of 3 points failed" in first.stderr, first.stderr
  setting = "lam_cos-0.5--shared_batches-False--batch_key-none"
  seed0, seed1, bad = f"{setting}--seed-0", f"{setting}--seed-1", "lr--1.0"
  rows = read_csv(workdir / "summary.csv")
  assert list(rows) == [bad, seed0, seed1]
  for name in (seed0, seed1):
    row = rows[name]
    assert (row["status"], row["action"], row["epochs_run"], row["setting"]) == ("done", "trained", "2", setting)
    assert 0 <= float(row["heldout_foscttm"]) <= 1 and float(row["val/loss_gen"]) > 0
    assert row["loss.lam_cos"] == "0.5" and row["data.modalities.adt.batch_key"] == "" and row["error"] == ""
  assert (rows[bad]["status"], rows[bad]["train.lr"]) == ("failed", "-1.0")
  assert rows[bad]["error"] == "train.lr=-1.0 is not allowed: a positive number"
  assert "Traceback" not in (workdir / bad / "stderr.log").read_text()
  markdown = (workdir / "summary.md").read_text()
  foscttm = [float(rows[n]["heldout_foscttm"]) for n in (seed0, seed1)]
  assert re.search(rf"\| {setting} \| 2/2 \| {sum(foscttm) / 2:.4g} ± [0-9.e-]+ \|", markdown), markdown
  assert "| lr--1.0 | 0/1 |" in markdown and "train.lr=-1.0 is not allowed" in markdown

  # Seed 1 interrupted after its first epoch (its last checkpoint and summary gone); seed 0 evaluated.
  shutil.rmtree(workdir / seed1 / "checkpoints" / "latest" / "2")
  (workdir / seed1 / "summary.json").unlink()
  (workdir / seed0 / "eval.json").write_text(json.dumps({"joint": {"ari": 0.5}, "note": "text is ignored"}))
  # Seed 0 as written before `model.matmul_dtype` existed: still this point's finished run.
  saved = json.loads((workdir / seed0 / "config.json").read_text())
  del saved["model"]["matmul_dtype"]
  (workdir / seed0 / "config.json").write_text(json.dumps(saved))
  seed0_log = (workdir / seed0 / "stdout.log").read_text()

  second = run_cli(spec, workdir)
  assert second.returncode == 1 and "3 points, 1 already finished; training 2" in second.stdout, second.stdout
  rows = read_csv(workdir / "summary.csv")
  assert [rows[n]["action"] for n in (seed0, seed1, bad)] == ["skipped", "resumed", "trained"]
  assert [rows[n]["status"] for n in (seed0, seed1, bad)] == ["done", "done", "failed"]
  assert (workdir / seed0 / "stdout.log").read_text() == seed0_log
  assert f"Resuming {workdir / seed1} from epoch 1" in (workdir / seed1 / "stdout.log").read_text()
  epochs = [json.loads(line)["epoch"] for line in (workdir / seed1 / "metrics.jsonl").read_text().splitlines()]
  assert epochs == [1, 2]
  assert rows[seed0]["eval/joint/ari"] == "0.5" and rows[seed1]["eval/joint/ari"] == ""
  assert "eval/joint/ari" in (workdir / "summary.md").read_text()
