"""CLUE (Cross-Linked Unified Embedding) in JAX/Flax; the package map is docs/architecture.md."""
