"""Command line: python -m mmd_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.k=v]

Modes: train (default) trains or resumes the run in --workdir and evaluates it.
Known user errors (config, data, mesh, checkpoint) print one clear message and exit with 2.
"""
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmd_jax import errors
from mmd_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py[:runlocal].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (local path or gs://...).")
flags.DEFINE_enum("mode", "train", ["train"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record) -> bool:
  """Keeps warnings from Orbax and friends, drops their per-save INFO chatter."""
  noisy = ("/orbax/", "/tensorstore/", "/grain/", "/tensorflow_datasets/")
  return record.levelno >= std_logging.WARNING or not any(
      n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_libraries)
  try:
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.USER_ERRORS as e:
    print(f"mmd_jax error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
