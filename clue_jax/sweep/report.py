"""A sweep's results: each point's final metrics read from its run directory, written as summary.csv and summary.md.

Per point: summary.json (epochs, restored epoch, held-out-pair and unseen-cell FOSCTTM), the train/val loss terms
of the restored epoch (the final model) from metrics.jsonl, and every number in eval.json when the run directory
has one. summary.md adds mean ± sd over seeds per setting.
"""

import csv
import dataclasses
import io
import json
import math
import pathlib
import statistics

from clue_jax import outputs

SUMMARY_KEYS = ("epochs_run", "restored_epoch", "early_stopped", "heldout_foscttm", "unseen_foscttm")
# Metrics shown in summary.md, before eval/*.
HEADLINE = ("heldout_foscttm", "unseen_foscttm", "train/loss_gen", "val/loss_gen")


@dataclasses.dataclass
class Result:
  name: str
  setting: str
  overrides: dict
  status: str = "pending"  # pending | done | failed
  action: str = ""  # trained | resumed | skipped (finished before this sweep started)
  wall_s: float | None = None
  error: str = ""


def run_metrics(run_dir: pathlib.Path) -> dict:
  """The final metrics of a finished run directory."""
  summary = json.loads((run_dir / "summary.json").read_text())
  out = {k: summary.get(k) for k in SUMMARY_KEYS}
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
  final = next((r for r in records if r["epoch"] == summary.get("restored_epoch")), records[-1] if records else {})
  out.update({k: v for k, v in sorted(final.items()) if k.startswith(("train/loss_", "val/loss_"))})
  evaluation = run_dir / "eval.json"
  if evaluation.exists():
    out.update(_numbers(json.loads(evaluation.read_text()), "eval/"))
  return out


def _numbers(tree, prefix: str) -> dict:
  """Numeric leaves of a JSON object, keyed by their slash-joined path."""
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{prefix}{key}/").items()}
  if isinstance(tree, (int, float)) and not isinstance(tree, bool):
    return {prefix.rstrip("/"): tree}
  return {}


def rows(results: list[Result], workdir: pathlib.Path) -> list[dict]:
  """One flat row per point: name, setting, overrides, status, action, wall time, metrics, error."""
  out = []
  for result in results:
    row = {"name": result.name, "setting": result.setting, **result.overrides, "status": result.status,
           "action": result.action, "wall_s": None if result.wall_s is None else round(result.wall_s, 1)}
    if result.status == "done":
      row.update(run_metrics(workdir / result.name))
    row["error"] = result.error
    out.append(row)
  return out


def write(workdir: pathlib.Path, title: str, results: list[Result]):
  """summary.csv and summary.md under `workdir`, each replaced atomically."""
  table = rows(results, workdir)
  columns = list(dict.fromkeys(k for row in table for k in row if k != "error")) + ["error"]
  buffer = io.StringIO()
  csv_writer = csv.DictWriter(buffer, columns, lineterminator="\n")
  csv_writer.writeheader()
  csv_writer.writerows({k: _csv_cell(v) for k, v in row.items()} for row in table)
  outputs.write_text_atomically(workdir / "summary.csv", buffer.getvalue())
  outputs.write_text_atomically(workdir / "summary.md", markdown(title, table))


def _csv_cell(value):
  return "" if value is None else value


def markdown(title: str, table: list[dict]) -> str:
  metrics = [k for k in HEADLINE if any(row.get(k) is not None for row in table)]
  metrics += sorted({k for row in table for k in row if k.startswith("eval/")})
  counts = {s: sum(row["status"] == s for row in table) for s in ("done", "failed", "pending")}
  lines = [f"# Sweep {title}", "", f"{len(table)} points: " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]

  lines += ["## Settings (mean ± sd over seeds, finished points only)", ""]
  settings = list(dict.fromkeys(row["setting"] for row in table))
  lines += _table(["setting", "done"] + metrics, [
      [setting, f"{sum(r['status'] == 'done' for r in group)}/{len(group)}"] + [_mean_sd(group, m) for m in metrics]
      for setting in settings for group in [[r for r in table if r["setting"] == setting]]])

  lines += ["", "## Points", ""]
  lines += _table(["run", "status", "epochs (restored/run)"] + metrics + ["error"], [
      [row["name"], row["status"] + (f" ({row['action']})" if row["action"] else ""), _epochs(row)]
      + [_number(row.get(m)) for m in metrics] + [row["error"]] for row in table])
  return "\n".join(lines) + "\n"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  return [line(header), line(["---"] * len(header))] + [line(cells) for cells in body]


def _mean_sd(group: list[dict], metric: str) -> str:
  values = [r[metric] for r in group if r["status"] == "done" and _finite(r.get(metric))]
  if not values:
    return ""
  if len(values) == 1:
    return _number(values[0])
  return f"{_number(statistics.mean(values))} ± {statistics.stdev(values):.2g}"


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _number(value) -> str:
  return f"{value:.4g}" if _finite(value) else ""


def _epochs(row: dict) -> str:
  return f"{row['restored_epoch']}/{row['epochs_run']}" if row.get("epochs_run") is not None else ""
