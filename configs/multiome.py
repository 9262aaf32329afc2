"""10x Multiome (RNA + ATAC) on the embedded BMMC starter (500 cells, 600 genes + 600 peaks), competition sizes.

The competition's Multiome model (docs/method.md §1.5, §2): latent 50 per subspace, 2x512 encoders, 1x256 decoders,
1x256 discriminator, batch-conditioned discriminator, lambda KL 0.3, joint-cross 1, cosine 0.02, adversarial 0.02;
NB on raw counts for both; RNA encoder input a 100-d PCA of the normalised `.X`, ATAC a 100-d LSI of the peak
counts, both fitted on the training cells. ATAC decoder features: the 30,000 peaks with the most counts.

  python -m clue_jax.train --config=configs/multiome.py --workdir=runs/multiome \
      [--config.data.modalities.rna.path=my_rna.h5ad --config.data.modalities.atac.path=my_atac.h5ad]
"""

from clue_jax import config as config_lib


def get_config():
  config = config_lib.get_config()
  config.seed = 2
  config.model.latent_dim = 50
  config.model.encoder_width = 512
  config.model.decoder_depth = 1
  config.model.decoder_width = 256
  config.model.discriminator_depth = 1
  config.model.discriminator_width = 256
  config.model.shared_batches = True
  config.loss.lam_kl = 0.3
  config.loss.lam_joint_cross = 1.0
  data = config_lib.DATASETS / "bmmc_multiome_starter"
  config.data.modalities.rna = config_lib.modality(str(data / "rna.h5ad"), batch_key="batch", n_features=10000)
  config.data.modalities.atac = config_lib.modality(str(data / "atac.h5ad"), batch_key="batch", rep="lsi",
                                                    feature_selection="total_counts", n_features=30000)
  config.data.modality_order = "rna,atac"
  config.train.auto_epoch_cap = 200
  return config
