"""CLUE (Cross-Linked Unified Embedding) in JAX/Flax; the package map is docs/architecture.md.

    run = clue_jax.fit(mdata, "configs/cite.py", workdir="runs/mine")   # or clue_jax.load("runs/cite")
    run.encode(mdata)                                                    # obsm["X_clue"]

The names below are imported on first use, so that `from clue_jax import config` in a config file does not load JAX.
"""

__all__ = ["fit", "load", "Run", "Ensemble", "Matching", "RunError"]


def __getattr__(name):
  if name == "fit":
    from clue_jax.fitting import fit
    return fit
  if name in __all__:
    from clue_jax import api
    return getattr(api, name)
  raise AttributeError(f"module 'clue_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
