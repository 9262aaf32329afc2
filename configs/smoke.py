"""A seconds-long run on the embedded CITE starter with a tiny model (for tests and quick checks)."""

from clue_jax import config as config_lib


def get_config():
  config = config_lib.get_config()
  data = config_lib.DATASETS / "bmmc_cite_starter"
  config.data.modalities.rna = config_lib.modality(str(data / "rna.h5ad"), batch_key="batch", n_features=200,
                                                   rep_dim=16)
  config.data.modalities.adt = config_lib.modality(str(data / "adt.h5ad"), batch_key="batch",
                                                   feature_selection="all", rep_dim=16)
  config.data.modality_order = "rna,adt"
  config.data.heldout_pairs = 0.1
  config.model.latent_dim = 8
  config.model.encoder_width = 32
  config.model.decoder_width = 32
  config.model.discriminator_width = 32
  config.model.shared_batches = True
  config.train.batch_size = 64
  config.train.max_epochs = 3
  config.train.align_burnin = 1
  config.train.steps_per_dispatch = 4
  config.train.checkpoint_interval_s = 0.0  # Every epoch (the kill-and-resume test needs early checkpoints).
  config.evals.plots = False  # Seconds of layout per run; tests that want plots switch them on.
  return config
