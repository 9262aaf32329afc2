"""The competition recipe (method.md §3.5) on the BMMC Multiome starter's task files: GEX (rna) + ATAC (atac).

Training config: configs/multiome.py (the competition's Multiome model and weights, preprocessing fitted on the
training cells); pretraining on the paired training cells with at most 200 epochs, then transductive fine-tuning on the
training and the (unpaired) test cells with the competition's settings: lr 1e-3, no burn-in, at most 50 epochs,
patience 8, ReduceLROnPlateau patience 3. Matching: SNN with k = 1 within the test batches.

  python -m clue_jax.competition --config=configs/competition/multiome.py --workdir=runs/competition_multiome
"""

import pathlib

import ml_collections

from clue_jax import competition_files, config_files

BASE = config_files.load_module(pathlib.Path(__file__).resolve().parent.parent / "multiome.py")
TECHNOLOGY = "multiome"


def get_config():
  """The training config of both stages (clue_jax.competition fills in the data paths)."""
  return BASE.get_config()


def task_prefix(task: str) -> str:
  """PREFIX of the embedded starter's task files PREFIX.<kind>.h5ad."""
  return str(competition_files.starter_file(TECHNOLOGY, task, "x")).removesuffix(".x.h5ad")


def get_competition():
  return ml_collections.ConfigDict({
      "match_modality": task_prefix("match_modality"),
      "predict_modality": task_prefix("predict_modality"),
      "joint_embedding": task_prefix("joint_embedding"),
      # Overrides of the training config for fine-tuning.
      "finetune": {"train": {"lr": 1e-3, "align_burnin": 0, "max_epochs": 50, "patience": 8,
                             "reduce_lr_patience": 3}},
      "match": {"method": "snn", "k": 1},
  })
