"""PNG figures of a run (matplotlib's Agg canvas; pyplot's global state is never touched).

`write_plots` draws: the modality embeddings in one 2-D layout coloured by modality, by cell type and by batch; the
train and validation curve of every loss term; evaluation curves (held-out FOSCTTM, periodic `eval/*`) when logged;
and the FOSCTTM of paired cells per cell type.
"""

import pathlib

import numpy as np
import pandas as pd
from matplotlib import colormaps, ticker
from matplotlib.figure import Figure

from clue_jax.evaluate import evaluation, layout

MAX_CELLS_PER_MODALITY = 10_000  # Layout subsample (seeded).
WIDE_PALETTE = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
MISSING_COLOR = (0.75, 0.75, 0.75, 1.0)
LEGEND_ROWS = 24  # Legend entries per column.
DPI = 110


def write_plots(out_dir, embeddings: dict, obs: dict, records: list, label_key: str = "", batch_key: str = "",
                seed: int = 0) -> list:
  """Writes the figures into `out_dir` (created) and returns their paths."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []

  def save(figure: Figure, name: str):
    path = out_dir / name
    tmp = path.with_name(f"{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=DPI, bbox_inches="tight")
    tmp.replace(path)
    written.append(path)

  points = stacked_cells(embeddings, obs, seed)
  coords, method = layout.umap_2d(points["x"], seed=seed)
  save(scatter(coords, points["modality"], f"Modalities in the joint space\n{method}"), "umap_modality.png")
  for key, name in ((label_key, "umap_label.png"), (batch_key, "umap_batch.png")):
    if key:
      title = f"Joint space by {key} (each cell once per modality)\n{method}"
      save(scatter(coords, points["obs"][key].to_numpy(object), title), name)
  if any(k.startswith(("train/loss_", "val/loss_")) for r in records for k in r):
    save(loss_curves(records), "losses.png")
  if any(k.startswith("eval/") or k == "val/heldout_foscttm" for r in records for k in r):
    save(eval_curves(records), "eval_curves.png")
  scores = (evaluation.per_cell_foscttm(embeddings, obs, MAX_CELLS_PER_MODALITY, seed) if label_key
            else pd.Series(dtype=float))
  if len(scores):
    labels = evaluation.joint_obs(obs, cell_rows(obs, scores.index), scores.index.to_numpy())[label_key]
    save(score_by_group(scores.to_numpy(), labels.to_numpy(object), label_key), "foscttm_by_cell_type.png")
  return written


def cell_rows(obs: dict, names) -> dict:
  """modality -> row of each named cell in that modality's obs (-1 where absent)."""
  return {m: o.index.get_indexer(names) for m, o in obs.items()}


def stacked_cells(embeddings: dict, obs: dict, seed: int) -> dict:
  """Every modality's cells (at most MAX_CELLS_PER_MODALITY each, seeded) in one array, with modality and obs."""
  rng = np.random.default_rng(seed)
  xs, modality, frames = [], [], []
  for name, x in embeddings.items():
    rows = np.arange(len(x))
    if len(rows) > MAX_CELLS_PER_MODALITY:
      rows = np.sort(rng.choice(rows, MAX_CELLS_PER_MODALITY, replace=False))
    xs.append(x[rows])
    modality += [name] * len(rows)
    frames.append(obs[name].iloc[rows].astype(object).reset_index(drop=True))
  return {"x": np.concatenate(xs), "modality": np.array(modality, object),
          "obs": pd.concat(frames, ignore_index=True)}


def scatter(coords: np.ndarray, values: np.ndarray, title: str) -> Figure:
  """2-D points coloured by category (legend outside, missing values grey), drawn in a seeded random order."""
  known = pd.notna(values)
  categories = sorted(set(map(str, values[known])))
  codes = np.full(len(values), -1)
  codes[known] = pd.Index(categories).get_indexer(values[known].astype(str))
  palette = categorical_palette(len(categories))
  colors = np.array([palette[c] if c >= 0 else MISSING_COLOR for c in codes])
  order = np.random.default_rng(0).permutation(len(coords))
  size = float(np.clip(12_000 / len(coords), 1.0, 16.0))
  columns = max(1, int(np.ceil((len(categories) + (~known).any()) / LEGEND_ROWS)))
  figure = Figure(figsize=(7 + 2.2 * columns, 6.5))
  ax = figure.add_subplot()
  ax.scatter(coords[order, 0], coords[order, 1], c=colors[order], s=size, linewidths=0, rasterized=True)
  for i, category in enumerate(categories):
    ax.scatter([], [], color=palette[i], s=30, label=f"{category} ({int((codes == i).sum())})")
  if (~known).any():
    ax.scatter([], [], color=MISSING_COLOR, s=30, label=f"missing ({int((~known).sum())})")
  ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns, fontsize=7.5, frameon=False,
            markerscale=1.0, handletextpad=0.2, columnspacing=0.8, borderaxespad=0.0)
  ax.set_title(title, fontsize=11)
  ax.set_xlabel("UMAP 1")
  ax.set_ylabel("UMAP 2")
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_aspect("equal", adjustable="datalim")
  return figure


def categorical_palette(n: int) -> list:
  """`n` distinct colours: tab10 up to 10 categories, tab20 up to 20, then 60 colours, repeated if needed."""
  if n <= 10:
    return [colormaps["tab10"](i) for i in range(n)]
  if n <= 20:
    return [colormaps["tab20"](i) for i in range(n)]
  return [WIDE_PALETTE[i % len(WIDE_PALETTE)] for i in range(n)]


def loss_curves(records: list) -> Figure:
  """One panel per loss term: its train and validation mean per epoch."""
  terms = sorted({k.split("/loss_", 1)[1] for r in records for k in r if k.startswith(("train/loss_", "val/loss_"))})
  epochs = np.array([r["epoch"] for r in records])
  columns = min(4, len(terms))
  rows = int(np.ceil(len(terms) / columns))
  figure = Figure(figsize=(3.6 * columns, 2.7 * rows + 0.6), layout="constrained")
  for i, term in enumerate(terms):
    ax = figure.add_subplot(rows, columns, i + 1)
    positive = True
    for split, style in (("train", "-"), ("val", "--")):
      values = series(records, f"{split}/loss_{term}")
      finite = values[np.isfinite(values)]
      if len(finite):
        ax.plot(epochs, values, style, linewidth=1.2, label=split)
        positive &= bool((finite > 0).all())
    if positive:  # The first epochs are often orders of magnitude above the rest.
      ax.set_yscale("log")
      ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_title(term, fontsize=10)
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  handles, labels = figure.axes[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc="outside upper right", ncol=2, frameon=False)
  figure.suptitle("Loss terms per epoch (train: mean over the epoch's steps; val: at the epoch's end; log scale where "
                  "positive)")
  return figure


def eval_curves(records: list) -> Figure:
  """One panel per evaluation metric logged during training."""
  keys = sorted({k for r in records for k in r if k.startswith("eval/") or k == "val/heldout_foscttm"})
  epochs = np.array([r["epoch"] for r in records])
  columns = min(4, len(keys))
  rows = int(np.ceil(len(keys) / columns))
  figure = Figure(figsize=(3.6 * columns, 2.7 * rows + 0.5), layout="constrained")
  for i, key in enumerate(keys):
    ax = figure.add_subplot(rows, columns, i + 1)
    values = series(records, key)
    logged = np.isfinite(values)
    ax.plot(epochs[logged], values[logged], "o-", markersize=3, linewidth=1.2)
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  figure.suptitle("Evaluation during training (FOSCTTM: lower is better; the others: higher is better)")
  return figure


def series(records: list, key: str) -> np.ndarray:
  return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records])


def score_by_group(scores: np.ndarray, groups: np.ndarray, group_name: str) -> Figure:
  """Horizontal bars: the mean per-cell FOSCTTM of each group (cells per group in the label), best on top."""
  frame = pd.DataFrame({"score": scores, "group": np.where(pd.notna(groups), groups, "missing").astype(str)})
  stats = frame.groupby("group")["score"].agg(["mean", "count"]).sort_values("mean", ascending=False)
  figure = Figure(figsize=(7.5, max(3.0, 1.2 + 0.22 * len(stats))), layout="constrained")
  ax = figure.add_subplot()
  bars = ax.barh(np.arange(len(stats)), stats["mean"], color=colormaps["tab10"](0))
  ax.bar_label(bars, fmt="{:.2g}", fontsize=6.5, padding=2)
  ax.set_yticks(np.arange(len(stats)), [f"{g} ({n})" for g, n in zip(stats.index, stats["count"])], fontsize=7.5)
  ax.set_ylim(-0.6, len(stats) - 0.4)
  ax.axvline(float(frame["score"].mean()), color="black", linewidth=1, linestyle="--",
             label=f"all paired cells: {frame['score'].mean():.4f}")
  ax.set_xlabel("mean FOSCTTM of the cell's true partner (lower is better)")
  ax.set_ylabel(f"{group_name} (cells)")
  ax.set_title(f"Matching quality per {group_name}")
  ax.legend(loc="upper right", fontsize=8)
  ax.margins(x=0.1)
  ax.grid(axis="x", alpha=0.3)
  return figure
