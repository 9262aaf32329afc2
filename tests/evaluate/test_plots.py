"""Plots from hand-built embeddings and metrics records, and the numpy UMAP layout."""

import numpy as np
import pandas as pd
import pytest
from matplotlib import image

from clue_jax.evaluate import layout, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def blobs(n_per_blob=40, dim=10, seed=0):
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=20.0, size=(3, dim))
  labels = np.repeat(np.arange(3), n_per_blob)
  return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def records(epochs=6):
  out = []
  for epoch in range(1, epochs + 1):
    record = {"epoch": epoch, "train/loss_self_rna": 10.0 / epoch, "val/loss_self_rna": 11.0 / epoch,
              "train/loss_gen": 1.0 - epoch, "val/loss_gen": 1.5 - epoch, "train/loss_dsc": 0.69}
    if epoch % 2 == 0:
      record["eval/foscttm/rna_adt"] = 0.5 / epoch
    out.append(record)
  return out


def test_write_plots_draws_every_figure_as_a_readable_png(tmp_path):
  x, labels = blobs()
  names = [f"c{i}" for i in range(len(x))]
  obs = pd.DataFrame({"cell_type": np.array(["B", "T", "NK"], object)[labels],
                      "batch": np.tile(["s1", "s2"], len(x) // 2)}, index=names)
  obs.loc["c0", "cell_type"] = None  # Drawn grey as "missing".
  embeddings = {"rna": x, "adt": x + 0.1}
  written = plots.write_plots(tmp_path / "plots", embeddings, {"rna": obs, "adt": obs[["batch"]]}, records(),
                              label_key="cell_type", batch_key="batch")
  assert sorted(p.name for p in written) == sorted(
      ["umap_modality.png", "umap_label.png", "umap_batch.png", "losses.png", "eval_curves.png",
       "foscttm_by_cell_type.png"])
  assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)  # No temp files.
  for path in written:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = image.imread(path)
    assert min(pixels.shape[:2]) >= 300, path.name
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{path.name} looks blank"


def test_loss_curves_use_a_log_scale_only_for_positive_terms():
  figure = plots.loss_curves(records())
  scales = {ax.get_title(): ax.get_yscale() for ax in figure.axes}
  assert scales == {"dsc": "log", "gen": "linear", "self_rna": "log"}


def test_numpy_umap_keeps_separate_clusters_apart_and_is_seeded():
  x, labels = blobs()
  coords = layout.numpy_umap(x, n_epochs=150, seed=3)
  assert coords.shape == (len(x), 2) and np.isfinite(coords).all()
  distances = ((coords[:, None] - coords[None]) ** 2).sum(-1)
  np.fill_diagonal(distances, np.inf)
  assert (labels[distances.argmin(1)] == labels).mean() == 1.0
  centres = np.array([coords[labels == k].mean(0) for k in range(3)])
  spread = max(np.linalg.norm(coords[labels == k] - centres[k], axis=1).mean() for k in range(3))
  gaps = [np.linalg.norm(centres[i] - centres[j]) for i in range(3) for j in range(i + 1, 3)]
  assert min(gaps) > 2 * spread
  np.testing.assert_array_equal(coords, layout.numpy_umap(x, n_epochs=150, seed=3))


def test_layout_title_names_the_method():
  x, _ = blobs(n_per_blob=10)
  _, title = layout.umap_2d(x)
  if layout.umap_learn_installed():
    assert title == "UMAP (umap-learn)"
  else:
    assert "numpy" in title and "umap-learn not installed" in title


def test_curve_parameters_fit_the_target_curve():
  a, b = layout.curve_parameters(0.5)
  d = np.array([0.0, 0.5, 1.0, 2.0])
  assert 1.0 / (1.0 + a * d[1:] ** (2 * b)) == pytest.approx(np.exp(-(d[1:] - 0.5)), abs=0.12)
