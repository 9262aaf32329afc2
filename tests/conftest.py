"""Every test runs with 4 fake CPU devices (set before any JAX array exists) and a persistent compile cache."""

import os
import pathlib
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 4)
CACHE = pathlib.Path(os.environ.get("CLUE_JAX_TEST_CACHE", pathlib.Path(tempfile.gettempdir()) / "clue_jax_jit"))
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
