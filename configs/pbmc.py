"""Partially paired PBMC CITE-seq: 6,855 cells with RNA + 14 proteins and 3,994 cells with RNA only (2 batches).

Library-default model (latent 50, 2x256 everywhere; pass `configs/pbmc.py:competition` for the competition CITE
sizes and weights). Raw counts in `X`; RNA encoder input a 100-d PCA of log1p-CP10k of the 2,000 most dispersed
genes, ADT a 14-d PCA of the CLR counts. 10 % of the paired cells have their pairing hidden from training and
their FOSCTTM is reported every epoch (`val/heldout_foscttm` in metrics.jsonl).

  python -m clue_jax.train --config=configs/pbmc.py --workdir=runs/pbmc
"""

from clue_jax import config as config_lib


def get_config(preset: str = "defaults"):
  config = config_lib.get_config()
  if preset == "competition":
    config = config_lib.competition_cite(config)
  elif preset != "defaults":
    raise ValueError(f"configs/pbmc.py:{preset}: use 'defaults' or 'competition'")
  data = config_lib.DATASETS / "pbmc_totalvi"
  config.data.modalities.rna = config_lib.modality(
      str(data / "rna.h5ad"), layer="X", batch_key="batch", rep_features="decoder", rep_normalize="log1p_cp10k")
  config.data.modalities.adt = config_lib.modality(
      str(data / "adt.h5ad"), layer="X", batch_key="batch", feature_selection="all", rep_normalize="clr")
  config.data.modality_order = "rna,adt"
  config.data.heldout_pairs = 0.1
  config.train.max_epochs = 100
  return config
