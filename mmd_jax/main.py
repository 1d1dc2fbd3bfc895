"""Command line: python -m mmd_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.k=v]

Modes (--mode, else the config's `mode` field, else train):
  train     trains or resumes the teacher in --workdir and evaluates it
  distill   distils config.distill.teacher into a k-step student in --workdir
  pipeline  teacher, students and a comparison table under --workdir (see mmd_jax/pipeline.py)
  eval      FID / Inception Score / precision-recall of the latest checkpoint of the teacher or
            student run in --workdir, sharded and resumable (mmd_jax/evaluation/run.py); rows
            in WORKDIR/eval_results.jsonl
  print_sharding  every parameter's sharding (path, shape, logical names, mesh spec, bytes per
            device) and the state's memory per device, for the local devices or for
            --topology=v5p:4x4x4; nothing is allocated or compiled
  aot       compiles the config's train step for --topology (e.g. v5p:4x4x4, v5e:16x16) on this
            machine (needs libtpu) and reports per-device memory, FLOPs and whether it fits;
            writes WORKDIR/aot_<topology>.json
Several hosts: jax.distributed starts automatically on TPU pods and clusters, or from
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (mmd_jax/parallel/distributed.py).
Known user errors (config, data, mesh, checkpoint) print one clear message and exit with 2.
"""
import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mmd_jax import errors
from mmd_jax.parallel import distributed
from mmd_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py[:runlocal].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory (local path or gs://...).")
flags.DEFINE_enum("mode", None, ["train", "distill", "pipeline", "eval", "aot",
                                 "print_sharding"],
                  "What to run; default: the config's `mode` field, else train.")
flags.DEFINE_string("topology", None, "TPU topology for --mode=aot/print_sharding, e.g. v5p:4x4x4.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_integer("distributed_timeout_s", 300,
                     "Multi-process: seconds to wait for all processes at start-up, then fail.")
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
    mode = FLAGS.mode or FLAGS.config.get("mode", "train")
    if mode in ("aot", "print_sharding"):
      from mmd_jax.parallel import cli  # compile / describe on this machine: no multi-host
      if mode == "aot":
        cli.aot(FLAGS.config, FLAGS.workdir, topology=FLAGS.topology)
      else:
        cli.print_sharding(FLAGS.config, topology=FLAGS.topology)
      return
    distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                           timeout_s=FLAGS.distributed_timeout_s)
    if mode == "train":
      loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif mode == "distill":
      from mmd_jax.distill import loop as distill_loop
      distill_loop.distill_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif mode == "pipeline":
      from mmd_jax import pipeline
      pipeline.run_pipeline(FLAGS.config, FLAGS.workdir)
    elif mode == "eval":
      from mmd_jax.evaluation import run as eval_run
      eval_run.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      raise errors.ConfigError(f"Unknown mode {mode!r}; choose train, distill, pipeline or eval.")
  except errors.USER_ERRORS as e:
    print(f"mmd_jax error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
