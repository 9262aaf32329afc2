"""CLUE (Cross-Linked Unified Embedding) in JAX/Flax; the package map is docs/architecture.md.

`clue_jax.fit(data, config, workdir)` trains from a notebook (`clue_jax.api.fit`); it is imported on first use, so
that `from clue_jax import config` in a config file does not load JAX.
"""


def __getattr__(name):
  if name == "fit":
    from clue_jax.api import fit
    return fit
  raise AttributeError(f"module 'clue_jax' has no attribute {name!r}")
