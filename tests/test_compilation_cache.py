"""The command line's persistent compilation cache (mmd_jax/compilation_cache.py)."""
import os
import platform

import jax

from mmd_jax import compilation_cache


def test_the_users_setting_wins_also_when_empty(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  for value in ("", str(tmp_path / "mine")):
    assert compilation_cache.enable({"JAX_COMPILATION_CACHE_DIR": value,
                                     "XDG_CACHE_HOME": str(tmp_path)}) is None
  assert jax.config.jax_compilation_cache_dir == before
  assert not os.path.exists(tmp_path / "mmd_jax")


def test_default_cache_is_per_host(tmp_path):
  before = jax.config.jax_compilation_cache_dir
  try:
    path = compilation_cache.enable({"XDG_CACHE_HOME": str(tmp_path)})
    assert path == str(tmp_path / "mmd_jax" / "jax_cache" / platform.node())
    assert jax.config.jax_compilation_cache_dir == path
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
