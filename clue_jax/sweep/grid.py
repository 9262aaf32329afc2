"""Grids of config overrides for `python -m clue_jax.sweep`, and the run names derived from them.

A point is a flat dict of overrides, `{"loss.lam_align": 0.0, "seed": 1}`; an axis is a list of points.
`axis()` builds one for a single key; `product()` and `zip_axes()` combine axes. A config file's `get_sweep()`
returns the final list of points.
"""

import hashlib
import itertools
import json
import re

SEED = "seed"  # The key that aggregation averages over; it is named last in run names.
BASE = "base"  # The name of a setting that overrides nothing.
MAX_NAME = 120  # Longer names are cut and end in a hash of the point.


class GridError(ValueError):
  """A grid that cannot be built or run; the message says what to change."""


def axis(key: str, values) -> list[dict]:
  """One key taking each of `values` in turn."""
  values = list(values)
  if not values:
    raise GridError(f"axis({key!r}, ...) has no values; give at least one")
  return [{key: value} for value in values]


def product(*axes: list[dict]) -> list[dict]:
  """Every combination of one point per axis, merged (the last axis varies fastest)."""
  return [_merge(combination) for combination in itertools.product(*axes)]


def zip_axes(*axes: list[dict]) -> list[dict]:
  """The i-th points of all axes, merged; the axes must have the same length."""
  lengths = [len(a) for a in axes]
  if len(set(lengths)) > 1:
    raise GridError(f"zip_axes needs axes of one length, got lengths {lengths}")
  return [_merge(combination) for combination in zip(*axes)]


def _merge(points) -> dict:
  merged = {}
  for point in points:
    shared = sorted(merged.keys() & point.keys())
    if shared:
      raise GridError(f"{', '.join(shared)} set by more than one axis; put each key on one axis")
    merged.update(point)
  return merged


def check_points(points, source: str):
  """Rejects what `get_sweep()` must not return: no points, non-dicts, non-string keys."""
  if not isinstance(points, list) or not points:
    raise GridError(f"{source}: get_sweep() must return a non-empty list of override dicts, got {points!r}")
  for i, point in enumerate(points):
    if not isinstance(point, dict) or not all(isinstance(k, str) for k in point):
      raise GridError(f"{source}: get_sweep() point {i} is {point!r}; expected a dict like {{'loss.lam_align': 0.0}}")


def check_distinct(points: list[dict], source: str):
  """Rejects a point given twice (compare after type conversion: 0 and 0.0 are one float value)."""
  first = {}
  for i, point in enumerate(points):
    j = first.setdefault(_canonical(point), i)
    if j != i:
      raise GridError(f"{source}: get_sweep() points {j} and {i} are both {point!r}; remove the repeat")


def setting(point: dict) -> dict:
  """The point without its seed: what aggregation groups by."""
  return {k: v for k, v in point.items() if k != SEED}


def run_names(points: list[dict]) -> list[str]:
  """Readable, filesystem-safe, unique names: `lam_align-0.0--seed-1`, `base--seed-0`.

  Keys are shortened to their shortest dotted suffix that no other key of the grid shares.
  """
  short = short_keys(k for p in points for k in p)
  return _unique([_name(p, short) for p in points], points)


def setting_names(points: list[dict]) -> list[str]:
  """The name of each point's setting (its run name without the seed); equal settings share a name."""
  short = short_keys(k for p in points for k in p)
  settings = [setting(p) for p in points]
  return _unique([_name(s, short) for s in settings], settings)


def short_keys(keys) -> dict[str, str]:
  """Each key's shortest dotted suffix that no other key ends with: `data.modalities.rna.batch_key` ->
  `rna.batch_key` next to `data.modalities.adt.batch_key`, `batch_key` alone."""
  keys = list(dict.fromkeys(keys))
  short = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      if not any(other != key and other.split(".")[-n:] == parts[-n:] for other in keys):
        break
    short[key] = ".".join(parts[-n:])
  return short


def _name(point: dict, short: dict) -> str:
  parts = [f"{short[k]}-{_text(v)}" for k, v in setting(point).items()] or [BASE]
  if SEED in point:
    parts.append(f"{SEED}-{_text(point[SEED])}")
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", "--".join(parts))
  return name if len(name) <= MAX_NAME else f"{name[:MAX_NAME - 9]}-{_digest(point)}"


def _text(value) -> str:
  return "none" if value == "" else str(value)


def _unique(names: list[str], points: list[dict]) -> list[str]:
  """Appends a hash of the point to names that different points share."""
  owners = {}
  for name, point in zip(names, points):
    owners.setdefault(name, set()).add(_canonical(point))
  return [name if len(owners[name]) == 1 else f"{name}-{_digest(point)}" for name, point in zip(names, points)]


def _canonical(point: dict) -> str:
  return json.dumps(point, sort_keys=True, default=repr)


def _digest(point: dict) -> str:
  return hashlib.sha1(_canonical(point).encode()).hexdigest()[:8]
