"""The model as pure math: Flax modules, likelihoods, loss terms and random draws (no files, devices or flags)."""
