"""CITE-seq (RNA + ADT) on the embedded BMMC starter (600 cells, 1,000 genes + 134 proteins), competition sizes.

The competition's CITE model (docs/method.md §1.5, §2): latent 20 per subspace, 2x512 encoders, 1x128 decoders,
2x128 discriminator, batch-conditioned discriminator, lambda joint-cross 2, cosine 1, adversarial 2; NB on raw
counts for both modalities; 100-d PCA encoder inputs from the normalised `.X` (log-normalised RNA, CLR ADT),
fitted on the training cells.

  python -m clue_jax.train --config=configs/cite.py --workdir=runs/cite
"""

from clue_jax import config as config_lib


def get_config():
  config = config_lib.competition_cite(config_lib.get_config())
  data = config_lib.DATASETS / "bmmc_cite_starter"
  config.data.modalities.rna = config_lib.modality(str(data / "rna.h5ad"), batch_key="batch", label_key="")
  config.data.modalities.adt = config_lib.modality(str(data / "adt.h5ad"), batch_key="batch",
                                                   feature_selection="all")
  config.data.modality_order = "rna,adt"
  # The AUTO formulas give thousands of epochs on 540 training cells; the reference run used 200 (burn-in 34).
  config.train.auto_epoch_cap = 200
  return config
