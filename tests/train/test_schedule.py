"""AUTO epoch formulas, burn-in noise, early stopping and ReduceLROnPlateau (docs/method.md §3.2)."""

import math

import pytest

from clue_jax import config as config_lib
from clue_jax.train import schedule as schedule_lib
from clue_jax.train.schedule import Plan, Schedule, auto_plan
from run_helpers import load_config


def test_auto_formulas_match_the_reference_examples():
  # docs/method.md §3.2: ~66k IDs (10 % validation) at lr 2e-3 and batch 128 give 13 / 78 / 10 / 4 epochs.
  plan = auto_plan(round(66175 * 0.9), 128, 2e-3)
  assert (plan.align_burnin, plan.max_epochs, plan.patience, plan.reduce_lr_patience) == (13, 78, 10, 4)
  # Large data: the floors 12 / 72 / 9 / 3 apply.
  assert auto_plan(10_000_000, 128, 2e-3) == Plan(72, 12, 9, 3)


def test_cap_scales_auto_values_together():
  # The CITE starter (540 training IDs) explodes to 8,534 epochs; a cap of 200 gives the reference run's burn-in 34.
  assert auto_plan(540, 128, 2e-3).max_epochs == 8534
  plan = auto_plan(540, 128, 2e-3, cap=200)
  assert plan == Plan(200, 34, 26, 9)
  # An explicit max_epochs is a budget too (PBMC: 100 epochs -> burn-in 17); explicit values are kept.
  assert auto_plan(round(10849 * 0.9), 128, 2e-3, max_epochs=100) == Plan(100, 17, 13, 5)
  assert auto_plan(540, 128, 2e-3, max_epochs=10, align_burnin=2, cap=200) == Plan(10, 2, 2, 1)


def test_lr_scaling_rules_and_their_auto_epochs():
  assert schedule_lib.scaled_lr(2e-3, 1024) == 2e-3  # "none": the reference's rate at every batch size.
  assert schedule_lib.scaled_lr(2e-3, 1024, "linear") == pytest.approx(1.6e-2)
  assert schedule_lib.scaled_lr(2e-3, 512, "sqrt") == pytest.approx(4e-3)
  assert schedule_lib.scaled_lr(2e-3, 128, "linear") == schedule_lib.scaled_lr(2e-3, 128, "sqrt") == 2e-3
  n = round(66175 * 0.9)
  # Unscaled, AUTO gives more epochs at a larger batch (fewer steps per epoch); linearly scaled, the same epochs.
  assert auto_plan(n, 1024, 2e-3).max_epochs > auto_plan(n, 128, 2e-3).max_epochs
  assert auto_plan(n, 1024, schedule_lib.scaled_lr(2e-3, 1024, "linear")) == auto_plan(n, 128, 2e-3)
  with pytest.raises(ValueError, match="'cubic'"):
    schedule_lib.scaled_lr(2e-3, 256, "cubic")
  config = load_config()
  config.train.lr_scaling = "cubic"
  with pytest.raises(config_lib.ConfigError, match=r"train.lr_scaling='cubic' is not allowed"):
    config_lib.validate(config)


def test_warmup_ramps_the_rate_linearly_then_holds_it():
  assert [schedule_lib.warmup_factor(e, 3) for e in (1, 2, 3, 4, 10)] == [0.25, 0.5, 0.75, 1.0, 1.0]
  assert [schedule_lib.warmup_factor(e, 0) for e in (1, 2)] == [1.0, 1.0]  # The reference: no warm-up.
  config = load_config()
  config.train.warmup_epochs = -1
  with pytest.raises(config_lib.ConfigError, match=r"train.warmup_epochs=-1 is not allowed"):
    config_lib.validate(config)


def test_noise_annealing():
  assert [schedule_lib.noise_scale(e, 4) for e in (1, 2, 3, 4, 5, 6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
  assert schedule_lib.noise_scale(1, 0) == 0.0


def test_early_stopping_after_burnin_only():
  s = Schedule(Plan(max_epochs=100, align_burnin=2, patience=2, reduce_lr_patience=0), lr=1.0)
  for epoch, value in enumerate([5.0, 6.0, 7.0, 1.0, 1.0, 0.5, 0.6, 0.6], start=1):
    events = s.after_epoch(epoch, value)
    assert events["early_stop"] == (epoch == 8)
  assert s.done and s.epoch == 8


def test_reduce_lr_on_plateau_torch_semantics():
  s = Schedule(Plan(max_epochs=100, align_burnin=0, patience=0, reduce_lr_patience=2), lr=1.0)
  reduced = [s.after_epoch(e, v)["lr_reduced"] for e, v in enumerate([1.0, 0.99995, 1.0, 1.0, 0.5], 1)]
  # 0.99995 is within the 1e-4 relative threshold, so it is not an improvement: 3 bad epochs > patience 2.
  assert reduced == [False, False, False, True, False]
  assert math.isclose(s.lr, 0.1) and s.lr_reductions == 1


def test_schedule_round_trips_through_json():
  s = Schedule(Plan(10, 2, 3, 1), lr=2e-3)
  s.after_epoch(1, 3.0)
  s.after_epoch(3, 2.0)
  assert Schedule.from_json(s.to_json()) == s


def test_best_checkpoints_kept_after_burnin_only():
  s = Schedule(Plan(max_epochs=100, align_burnin=1, patience=0, reduce_lr_patience=0), lr=1.0)
  kept = [s.keep_as_best(e, v, keep=2) for e, v in enumerate([0.1, 5.0, 4.0, 6.0, 3.0, float("nan")], start=1)]
  assert kept == [False, True, True, False, True, False]
  assert s.best_kept == [[3.0, 5], [4.0, 3]]


def test_a_schedule_goes_on_with_a_larger_budget_or_patience_and_keeps_its_burn_in():
  stopped = Schedule(plan=Plan(max_epochs=10, align_burnin=2, patience=2, reduce_lr_patience=5), lr=1e-3)
  for epoch, value in enumerate([5.0, 4.0, 1.0, 2.0, 3.0], start=1):
    stopped.after_epoch(epoch, value)
  assert stopped.done and stopped.bad_stop == 2  # Early-stopped at epoch 5.
  same = Schedule.from_json(stopped.to_json())
  same.go_on_with(Plan(max_epochs=20, align_burnin=4, patience=2, reduce_lr_patience=5))
  assert same.done  # Its patience is still used up.
  patient = Schedule.from_json(stopped.to_json())
  patient.go_on_with(Plan(max_epochs=20, align_burnin=4, patience=3, reduce_lr_patience=5))
  assert not patient.done and patient.plan == Plan(max_epochs=20, align_burnin=2, patience=3, reduce_lr_patience=5)
  patient.after_epoch(6, 4.0)
  assert patient.done and patient.epoch == 6
  budget = Schedule(plan=Plan(max_epochs=3, align_burnin=1, patience=0, reduce_lr_patience=0), lr=1e-3)
  for epoch in (1, 2, 3):
    budget.after_epoch(epoch, 1.0)
  budget.go_on_with(Plan(max_epochs=5, align_burnin=9, patience=0, reduce_lr_patience=0))
  assert not budget.done and budget.plan.max_epochs == 5
