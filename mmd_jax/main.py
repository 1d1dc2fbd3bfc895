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

if __name__ == "__main__":
  # Faster XLA:CPU settings (mmd_jax/cpu_defaults.py). It may start the interpreter again with the
  # same arguments, so it runs before the package (and jax) is imported.
  from mmd_jax import cpu_defaults
  cpu_defaults.apply_for_command_line(sys.argv, module="mmd_jax.main")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmd_jax import compilation_cache, errors, loop  # noqa: E402
from mmd_jax.parallel import distributed  # noqa: E402

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
  cache = compilation_cache.enable()
  if cache:
    logging.info("JAX compilation cache: %s (reruns load compiled programs; set "
                 "JAX_COMPILATION_CACHE_DIR to choose another folder, or to '' for none)", cache)
  try:
    mode = FLAGS.mode or FLAGS.config.get("mode", "train")
    if mode in ("aot", "print_sharding"):
      from mmd_jax.tools import cli  # compile / describe on this machine: no multi-host
      if mode == "aot":
        cli.aot(FLAGS.config, FLAGS.workdir, topology=FLAGS.topology)
      else:
        cli.print_sharding(FLAGS.config, topology=FLAGS.topology)
      return
    distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                           num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                           timeout_s=FLAGS.distributed_timeout_s)
    out = {}
    if mode == "train":
      out = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif mode == "distill":
      out = loop.distill_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif mode == "pipeline":
      from mmd_jax import pipeline
      pipeline.run_pipeline(FLAGS.config, FLAGS.workdir)
    elif mode == "eval":
      from mmd_jax.evaluation import run as eval_run
      eval_run.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
    else:
      raise errors.ConfigError(f"Unknown mode {mode!r}; choose train, distill, pipeline or eval.")
    if out.get("preempted"):
      raise loop.PreemptedError(
          f"preempted at step {int(out['state'].step)}; the checkpoint is saved in "
          f"{FLAGS.workdir}/checkpoints. Rerun the same command to resume.")
  except loop.PreemptedError as e:
    print(f"mmd_jax: {e} (exit {errors.EXIT_PREEMPTED})", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_PREEMPTED)
  except errors.NONFINITE_ERRORS as e:  # before USER_ERRORS: NonFiniteStateError is both
    print(f"mmd_jax error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_NONFINITE)
  except errors.USER_ERRORS as e:
    print(f"mmd_jax error ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)


def _unknown_config_key(argv) -> str | None:
  """The message for the first --config.KEY override that the config file does not define."""
  from mmd_jax import config_lib
  config_arg, keys, args = None, [], list(argv[1:])
  for i, a in enumerate(args):
    if a == "--":
      break
    if a.startswith("--config="):
      config_arg = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(args):
      config_arg = args[i + 1]
    elif a.startswith("--config."):
      keys.append(a[len("--config."):].split("=", 1)[0])
  if not config_arg or not keys:
    return None
  path, _, arg = config_arg.partition(":")
  try:
    config = config_lib.load_config_file(path, arg)
  except Exception:  # noqa: BLE001 -- a broken config file keeps its own traceback
    return None
  for key in keys:
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(parts[:depth]) or "the config"
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"Unknown config key {key!r} (--config.{key}): {where} has no field {part!r}. "
                f"Fix the spelling; valid keys there: {valid}.")
      node = node[part]
  return None


def _parse_flags(argv):
  """absl flag parsing, with bad flags reported like every other user error (one line, exit 2)
  rather than as a traceback from inside ml_collections' override parsing."""
  try:
    args = FLAGS(argv)
    FLAGS.config.get("mode")  # a config file that failed to load raises only when used
    return args
  except (AttributeError, KeyError):  # ml_collections: a --config.KEY the config lacks
    message = _unknown_config_key(argv)
    if message is None:
      raise
    print(f"mmd_jax error (ConfigError): {message}", file=sys.stderr, flush=True)
    sys.exit(2)
  except flags.Error as e:
    print(f"mmd_jax error (FlagError): {str(e).rstrip('.')}. See --helpshort for the flags.",
          file=sys.stderr, flush=True)
    sys.exit(2)
  except OSError as e:  # ml_collections: the --config file cannot be loaded
    if "Failed loading config file" not in str(e):
      raise
    cause = e.__cause__ if e.__cause__ is not None else e
    reason = str(cause).strip().splitlines()[-1].strip()
    print(f"mmd_jax error (ConfigError): the --config file cannot be loaded ({reason}). Pass "
          "--config=configs/NAME.py[:ARG] with an existing file.", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
