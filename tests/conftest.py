"""Test session set-up, before jax is imported anywhere:
- 8 fake CPU devices (sharding code paths run as on a pod slice), XLA optimisation level 0;
- a persistent compilation cache shared by the tests and the CLI subprocesses they start, so the
  same tiny model is compiled once per session rather than once per run.
"""
import os
import tempfile

# Optimisation level 0 halves XLA:CPU compile times; tests time nothing, so that is free.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# CLI subprocesses keep these XLA_FLAGS, so they share the session's compilation cache (the CPU
# defaults of the command line would add a flag, change the cache key and re-exec each process);
# tests/test_cpu_defaults.py tests the defaults themselves.
os.environ.setdefault("MMD_JAX_CPU_DEFAULTS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="mmd_jax_test_compile_cache_"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The bundled digits, prepared once per session as a TFDS array_record data set."""
  from mmd_jax.data import sources
  d = tmp_path_factory.mktemp("tfds")
  sources.ensure_digits_prepared(str(d))
  return d


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
  """One tiny teacher run (6 steps, checkpoints at 3 and 6, final evaluation), shared."""
  from mmd_jax import loop
  from tests import helpers
  workdir = tmp_path_factory.mktemp("run")
  out = loop.train_and_evaluate(helpers.tiny_digits_config(data_dir), str(workdir))
  return workdir, out
