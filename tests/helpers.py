"""Shared helpers for the end-to-end tests: tiny configs and subprocess runs of the CLI."""
import os
import subprocess
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "configs", "digits.py")


def tiny_digits_config(data_dir, **overrides):
  from mmd_jax import config_lib
  config = config_lib.load_config_file(DIGITS, "test")
  config.data.data_dir = str(data_dir)
  return config_lib.apply_overrides(config, overrides)


def cli(workdir, data_dir, *flags, devices=2):
  """Starts `python -m mmd_jax.main` on the tiny digits config; returns the Popen.

  It inherits the session's compilation cache (tests/conftest.py), so repeated runs of the same
  config compile once.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "mmd_jax.main", f"--config={DIGITS}:test", "--mode=train",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def final_params(workdir, step):
  """The params saved at `step` in `workdir`, as a flat list of numpy arrays (no templates)."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  restored = ocp.StandardCheckpointer().restore(path)
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(restored["params"])]
