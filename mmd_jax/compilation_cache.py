"""JAX's persistent compilation cache for the command line, so that a rerun (a resume after a
preemption, a repeated pipeline stage, an evaluation) loads its programs instead of compiling
them again (12-25 s per program on a 2-core CPU, minutes at pod scale).

The command line calls `enable()` once at start-up. It does nothing when the user has configured
the cache (JAX_COMPILATION_CACHE_DIR set, also to an empty value, which switches it off).
Otherwise the cache lives in $XDG_CACHE_HOME/mmd_jax/jax_cache/<host> (default ~/.cache): one
folder per host, because compiled CPU code is specific to the processor it was built for and a
home directory may be shared by machines of a cluster. A cached program is the same executable,
so results do not change. Importing this module changes nothing.
"""
from __future__ import annotations

import os
import platform

ENV = "JAX_COMPILATION_CACHE_DIR"


def default_dir(environ=os.environ) -> str:
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "mmd_jax", "jax_cache", platform.node() or "host")


def enable(environ=os.environ) -> str | None:
  """Points JAX's compilation cache at default_dir() unless the user chose; returns the folder
  in use (None: off, or the user's own setting)."""
  if ENV in environ:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  path = default_dir(environ)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:  # an unwritable home: run without the cache
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
