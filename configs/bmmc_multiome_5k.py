"""10x Multiome (RNA + ATAC) on the NeurIPS 2021 BMMC 5k subsample: 5,000 cells, 4,000 genes + 20,001 binarised peaks.

Data: the .h5mu `neurips2021_bmmc_multiome_5k/bmmc_multiome_5k.h5mu` (see its PROVENANCE.md), kept outside the
repository: its path is the config's argument, `--config=configs/bmmc_multiome_5k.py:PATH` (without it the paths are
empty and training stops naming the key to set).
The file's modality `rna` holds raw integer counts in `.X` (recovered from the shipped size-factor-scaled values), and
`atac` the peaks binarised as shipped (every non-zero is 1); no layers; every cell has both.

The competition's Multiome model and weights, taken from configs/multiome.py (docs/method.md §1.5, §2): latent 50 per
subspace, 2x512 encoders, 1x256 decoders, 1x256 discriminator conditioned on the batch, lambda KL 0.3, joint-cross 1.
RNA: NB on the counts, encoder input the competition's 100-d PCA of log1p-CP10k over all genes, decoder on all 4,000
genes. ATAC: the 0/1 peaks cannot be the counts the competition's NB modelled, so a Bernoulli likelihood; encoder input
the competition's 100-d LSI of the peaks; decoder on all 20,001 (the 30,000-top-count rule keeps them all). Both
fitted on the training cells. Batch: obs `batch`, site + donor (`s4d8`, 13 values). The 22 cell types (obs
`cell_type`) score label transfer only. Epochs: the AUTO formulas under the library's cap of 1,000 (about 1,000 epochs
on 4,500 training cells), not the starter's 200.

  python -m clue_jax.train --config=configs/bmmc_multiome_5k.py:PATH --workdir=runs/bmmc_multiome_5k
"""

import pathlib

from clue_jax import config as config_lib

MULTIOME = config_lib.load_module(pathlib.Path(__file__).resolve().parent / "multiome.py")


def get_config(path: str = ""):
  """`path`: the .h5mu file (see the module docstring)."""
  config = MULTIOME.get_config()
  config.data.modalities.rna = config_lib.modality(path, layer="X", batch_key="batch", n_features=10000,
                                                   rep_normalize="log1p_cp10k")
  config.data.modalities.atac = config_lib.modality(path, "Bernoulli", layer="X", batch_key="batch", rep="lsi",
                                                    feature_selection="total_counts", n_features=30000)
  config.train.auto_epoch_cap = config_lib.get_config().train.auto_epoch_cap
  config.evals.label_key = "cell_type"
  return config
