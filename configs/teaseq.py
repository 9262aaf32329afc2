"""TEA-seq PBMC, three modalities (RNA + ADT + ATAC gene activity): 6,310 cells, 9,855 genes + 46 proteins + 14,732
gene-activity features, one batch.

Data: the .h5mu `teaseq_pbmc/teaseq_pbmc.h5mu` (see its PROVENANCE.md), kept outside the repository: its path is
the config's argument, `--config=configs/teaseq.py:PATH` (without it the paths are empty and training stops naming the
key to set). The file's modalities
`rna`, `adt` and `atac` hold raw integer counts in `.X` (no layers); every cell has all three. There is no batch
column (one experiment), and `split_matilda` (the matilda package's split) is not used: the run draws its own.

Three modalities, so three subspaces and a 3x3 encoder matrix (K = 3). No competition model exists for three; two of
them are the CITE-seq pair and the third is gene-level too, so the competition's CITE sizes and weights
(`config.competition_cite`, as configs/cite.py): latent 20 per subspace (D = 60), 2x512 encoders, 1x128 decoders,
2x128 discriminator, lambda joint-cross 2, cosine 1, adversarial 2. RNA and ADT as in configs/bmmc_cite_5k.py: NB,
100-d PCA of log1p-CP10k RNA / CLR ADT (46-d: clamped to the proteins), 2,000 most dispersed genes and all proteins
decoded. ATAC is gene activity, not peaks: integer fragment counts summed over each gene (up to 122, 22 % non-zero),
so NB as for RNA, encoder input a 100-d PCA of log1p-CP10k and the 2,000 most dispersed features decoded, as genes
are. All fitted on the training cells. The 11 cell types (obs `cell_type`) score label transfer only. Epochs: the
AUTO formulas under the default cap of 1,000.

  python -m clue_jax.train --config=configs/teaseq.py:PATH --workdir=runs/teaseq
"""

from clue_jax import config as config_lib


def get_config(path: str = ""):
  """`path`: the .h5mu file (see the module docstring)."""
  config = config_lib.competition_cite(config_lib.get_config())
  config.data.modalities.rna = config_lib.modality(path, layer="X", rep_normalize="log1p_cp10k")
  config.data.modalities.adt = config_lib.modality(path, layer="X", feature_selection="all", rep_normalize="clr")
  config.data.modalities.atac = config_lib.modality(path, layer="X", rep_normalize="log1p_cp10k")
  config.data.modality_order = "rna,adt,atac"
  config.evals.label_key = "cell_type"
  return config
