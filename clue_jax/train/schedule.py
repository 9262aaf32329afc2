"""The training schedule (docs/method.md §3.2): AUTO epoch counts, burn-in noise, early stopping, ReduceLROnPlateau.

Host-side and JSON-serialisable, so that it is checkpointed with the model and a resumed run makes the same
decisions.
"""

import dataclasses
import math

from clue_jax.config import LR_SCALING

AUTO = -1
BASE_BATCH = 128  # The global batch at which train.lr is given, for train.lr_scaling.


@dataclasses.dataclass(frozen=True)
class Plan:
  max_epochs: int
  align_burnin: int
  patience: int
  reduce_lr_patience: int


def scaled_lr(lr: float, batch_size: int, rule: str = "none") -> float:
  """`lr` for a global batch of `batch_size`: as given ("none", the reference), or scaled from BASE_BATCH by the
  batch ratio ("linear") or its square root ("sqrt"). Both optimisers step with this rate."""
  if rule not in LR_SCALING:
    raise ValueError(f"lr scaling {rule!r}: use one of {LR_SCALING}")
  ratio = batch_size / BASE_BATCH
  return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
  """The fraction of the learning rate used in the 1-based epoch `epoch`: epoch / (warmup_epochs + 1) for the first
  `warmup_epochs` epochs, then 1 (0 warm-up epochs, the reference: always 1)."""
  return min(epoch / (warmup_epochs + 1), 1.0) if warmup_epochs > 0 else 1.0


def auto_plan(n_train_ids: int, batch_size: int, lr: float, max_epochs=AUTO, align_burnin=AUTO, patience=AUTO,
              reduce_lr_patience=AUTO, cap: int = 0) -> Plan:
  """The reference's AUTO formulas, max(ceil(c / (lr * batches_per_epoch)), c) for c = 72, 12, 9, 3.

  On small data they explode (thousands of epochs). When the AUTO max_epochs exceeds the epoch budget (`cap` > 0,
  or an explicit `max_epochs`), the other AUTO values are scaled down by the same factor, keeping their ratios
  (e.g. 200 epochs -> burn-in 34, as in the reference runs of benchmark.md). Explicit values are kept.
  """
  batches_per_epoch = n_train_ids / batch_size

  def formula(c):
    return max(math.ceil(c / (lr * batches_per_epoch)), c)

  budget = max_epochs if max_epochs != AUTO else cap
  scale = budget / formula(72) if budget > 0 and formula(72) > budget else 1.0

  def pick(given, c):
    return given if given != AUTO else max(math.ceil(formula(c) * scale), 1)

  return Plan(pick(max_epochs, 72), pick(align_burnin, 12), pick(patience, 9), pick(reduce_lr_patience, 3))


def noise_scale(epoch: int, align_burnin: int) -> float:
  """a(e) = max(1 - (e - 1) / E_burn, 0) for the 1-based epoch e; 0 without burn-in."""
  if align_burnin <= 0:
    return 0.0
  return max(1.0 - (epoch - 1) / align_burnin, 0.0)


@dataclasses.dataclass
class Schedule:
  """Per-epoch decisions on a monitored value (lower is better), active after burn-in."""

  plan: Plan
  lr: float
  epoch: int = 0  # Last finished epoch.
  best_stop: float = math.inf  # Early stopping (ignite: improvement means strictly better, min_delta 0).
  bad_stop: int = 0
  best_plateau: float = math.inf  # ReduceLROnPlateau (torch: relative threshold 1e-4, factor 0.1).
  bad_plateau: int = 0
  stopped: bool = False
  lr_reductions: int = 0
  best_kept: list = dataclasses.field(default_factory=list)  # [monitored, epoch] of the kept best checkpoints.

  def keep_as_best(self, epoch: int, monitored: float, keep: int) -> bool:
    """Whether epoch `epoch` enters the `keep` best (after burn-in, non-finite values never do)."""
    if epoch <= self.plan.align_burnin or not math.isfinite(monitored):
      return False
    if len(self.best_kept) >= keep and monitored >= max(v for v, _ in self.best_kept):
      return False
    self.best_kept = sorted(self.best_kept + [[monitored, epoch]])[:keep]
    return True

  def after_epoch(self, epoch: int, monitored: float) -> dict:
    """Records epoch `epoch`'s monitored value; returns what changed."""
    self.epoch = epoch
    events = {"lr_reduced": False, "early_stop": False}
    if epoch <= self.plan.align_burnin:
      return events
    if self.plan.patience > 0:
      if monitored < self.best_stop:
        self.best_stop, self.bad_stop = monitored, 0
      else:
        self.bad_stop += 1
        if self.bad_stop >= self.plan.patience:
          self.stopped = events["early_stop"] = True
    if self.plan.reduce_lr_patience > 0:
      if monitored < self.best_plateau * (1 - 1e-4):
        self.best_plateau, self.bad_plateau = monitored, 0
      else:
        self.bad_plateau += 1
        if self.bad_plateau > self.plan.reduce_lr_patience:
          self.lr *= 0.1
          self.bad_plateau = 0
          self.lr_reductions += 1
          events["lr_reduced"] = True
    if epoch >= self.plan.max_epochs:
      self.stopped = True
    return events

  def go_on_with(self, plan: Plan):
    """A new epoch budget and patiences for a run that goes on (the burn-in it trained stays); the run is stopped
    only if the new budget or patience says so."""
    self.plan = dataclasses.replace(plan, align_burnin=self.plan.align_burnin)
    self.stopped = self.epoch >= self.plan.max_epochs or 0 < self.plan.patience <= self.bad_stop

  @property
  def done(self) -> bool:
    return self.stopped or self.epoch >= self.plan.max_epochs

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}

  @classmethod
  def from_json(cls, data: dict) -> "Schedule":
    data = dict(data)
    plan = Plan(**data.pop("plan"))
    values = {k: (math.inf if v is None else v) for k, v in data.items()}
    return cls(plan=plan, **values)
