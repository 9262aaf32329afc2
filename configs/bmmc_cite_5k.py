"""CITE-seq (RNA + ADT) on the NeurIPS 2021 BMMC 5k subsample: 5,000 cells, 4,000 genes + 134 proteins, 12 batches.

Data: the .h5mu `neurips2021_bmmc_cite_5k/bmmc_cite_5k.h5mu` (see its PROVENANCE.md), kept outside the repository:
its path is the config's argument, `--config=configs/bmmc_cite_5k.py:PATH` (without it the paths are empty and
training stops naming the key to set). The
file's modalities `rna` and `adt` hold raw integer counts in `.X` (no layers); every cell has both.

The competition's CITE model, as configs/cite.py (`config.competition_cite`, docs/method.md §1.5, §2): latent 20 per
subspace, 2x512 encoders, 1x128 decoders, 2x128 discriminator conditioned on the batch, lambda joint-cross 2,
cosine 1, adversarial 2; NB on the raw counts of both. Encoder inputs: the competition's 100-d PCA of the normalised
data (log1p-CP10k RNA over all 4,000 genes, CLR ADT), fitted on the training cells. Decoder features: the 2,000 most
dispersed genes (as configs/cite.py) and all 134 proteins. Batch: obs `batch`, site + donor (`s4d8`). The 44 cell
types (obs `cell_type`) score label transfer only: the competition model has no supervised term. Epochs: the AUTO
formulas under the default cap of 1,000 (about 1,000 epochs on 4,500 training cells, the reference's ~36k steps).

  python -m clue_jax.train --config=configs/bmmc_cite_5k.py:PATH --workdir=runs/bmmc_cite_5k
"""

from clue_jax import config as config_lib


def get_config(path: str = ""):
  """`path`: the .h5mu file (see the module docstring)."""
  config = config_lib.competition_cite(config_lib.get_config())
  config.data.modalities.rna = config_lib.modality(path, layer="X", batch_key="batch", rep_normalize="log1p_cp10k")
  config.data.modalities.adt = config_lib.modality(path, layer="X", batch_key="batch", feature_selection="all",
                                                   rep_normalize="clr")
  config.data.modality_order = "rna,adt"
  config.evals.label_key = "cell_type"
  return config
