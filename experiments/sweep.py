"""Runs a config file's sweep locally, one run (and one work directory) per override dict.

  python experiments/sweep.py --config=configs/digits.py[:ARG] --workdir=/tmp/sweep [--dry_run]

The config file defines `sweep() -> list[dict]` of dotted-key overrides. Each run is the normal
command line, `python -m mmd_jax.main --config=... --workdir=WORKDIR/<i>_<k=v...> --config.k=v`,
so a sweep member resumes like any run when the sweep is started again.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

from absl import app, flags

from mmd_jax import config_lib

flags.DEFINE_string("config", None, "Config file with a sweep() function, optionally :ARG.")
flags.DEFINE_string("workdir", None, "Parent work directory; one subdirectory per run.")
flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run_name(index: int, overrides: dict) -> str:
  text = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items()))
  return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.=,-]", "_", text)


def commands(config_arg: str, workdir: str) -> list[list[str]]:
  path = config_arg.split(":", 1)[0]
  module = config_lib.load_module(path)
  if not hasattr(module, "sweep"):
    raise config_lib.ConfigError(f"{path} defines no sweep() function.")
  base = config_lib.load_config_file(path, config_arg.split(":", 1)[1] if ":" in config_arg else "")
  out = []
  for i, overrides in enumerate(module.sweep()):
    config_lib.apply_overrides(base, overrides)  # unknown keys fail here, before any run starts
    cmd = [sys.executable, "-m", "mmd_jax.main", f"--config={config_arg}",
           f"--workdir={os.path.join(workdir, run_name(i, overrides))}"]
    cmd += [f"--config.{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
            for k, v in overrides.items()]
    out.append(cmd)
  return out


def main(argv):
  del argv
  cmds = commands(FLAGS.config, FLAGS.workdir)
  failed = []
  for i, cmd in enumerate(cmds):
    print(f"[{i + 1}/{len(cmds)}] {' '.join(cmd)}", flush=True)
    if not FLAGS.dry_run and subprocess.call(cmd) != 0:
      failed.append(cmd[4])
  if failed:
    sys.exit(f"{len(failed)} sweep run(s) failed: {failed}")


if __name__ == "__main__":
  app.run(main)
