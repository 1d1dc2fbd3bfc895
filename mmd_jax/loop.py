"""run_loop(run, workdir): the one training loop, for a teacher and for a student of any variant.

Phases, top to bottom: checkpoints (refuse an incompatible one before compiling) -> frozen inputs
(a student's teacher and preconditioner) -> state (restored, or born sharded) -> data -> step
programs (compiled ahead of time: the programs AOT reports) -> loop (log, checkpoint, evaluate,
SIGTERM) -> final evaluation.

    python -m mmd_jax.main --config=configs/digits.py --workdir=DIR            # train_and_evaluate
    python -m mmd_jax.main --config=configs/digits.py --workdir=DIR --mode=distill \\
        --config.distill.teacher=TEACHER_DIR                                    # distill_and_evaluate
"""
from __future__ import annotations

import os
import signal
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from mmd_jax import config_lib
from mmd_jax.data import pipeline
from mmd_jax.evaluation import periodic, pixel_metrics
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax import runs
from mmd_jax.runs import common
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import logging_lib, throughput


class NonFiniteLossError(FloatingPointError):
  """The loss, a gradient or the state became NaN/inf; the last good checkpoint is left as it was
  (the command line exits with errors.EXIT_NONFINITE)."""


class PreemptedError(Exception):
  """A stage of a longer job (the pipeline) was preempted: it saved a checkpoint and stopped;
  rerunning the same command continues from there (errors.EXIT_PREEMPTED)."""


class _Preemption:
  """SIGTERM -> a stop at a step that every process agrees on; all of them save that step.

  One process: a Python SIGTERM handler sets a flag, polled after every step.
  Several (jax.distributed): JAX's preemption sync manager, which jax.distributed.initialize
  starts (jax_enable_preemption_service, on by default). It catches SIGTERM in C++ on whichever
  process gets it, tells the others through the coordination service, and
  multihost_utils.reached_preemption_sync_point(step) becomes True on every process at the same
  step (one past the largest step any of them had reached). It works on CPU with the gloo
  collectives too (tests/test_multiprocess.py). No Python handler is installed then: it would
  replace JAX's. With the service switched off, the local flag is all-gathered every `interval`
  steps (the logging interval, where the loop syncs with the device anyway).
  """

  def __init__(self, *, interval: int):
    self.requested = False
    self._previous = None
    self._installed = False
    self._interval = max(1, int(interval))
    self._sync = (jax.process_count() > 1 and distributed.is_initialized()
                  and bool(jax.config.jax_enable_preemption_service))

  def __enter__(self):
    if self._sync:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
    except ValueError:  # not the main thread (e.g. some notebook runners): no handler
      pass
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def stop_at(self, step: int) -> bool:
    """True when every process is to save `step` and stop. Call after every step, on every
    process (the sync manager counts the calls)."""
    if self._sync:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    if jax.process_count() == 1:
      return self.requested
    if step % self._interval:
      return False
    flags = multihost_utils.process_allgather(np.asarray(int(self.requested), np.int32))
    return bool(np.any(np.asarray(flags)))

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)


def _last_finite_checkpoint(ckpt) -> tuple[int | None, bool]:
  """(latest step whose saved checksums count no NaN/inf value, verified). Checkpoints of older
  code have no checksums: the latest of those is returned unverified (verified=False)."""
  for step in reversed(ckpt.all_steps()):
    if not ckpt.has_checksums(step):
      return step, False
    try:
      saved = ckpt.manager.restore(step, args=ocp.args.Composite(
          checksums=ocp.args.JsonRestore()))["checksums"]
    except Exception:  # noqa: BLE001 -- an unreadable record: not verified, look further back
      continue
    if not any(int(v.get("nonfinite", 0)) for v in dict(saved).get("leaves", {}).values()):
      return step, True
  return None, False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the teacher in `workdir`, then runs the final evaluation.

  Returns {"state", "final_eval" (rows), "preempted", "program_hashes"}."""
  return run_loop(_build(config, kind="teacher"), workdir)


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils config.distill.teacher into a k-step student in `workdir` and evaluates it.

  Returns train_and_evaluate's dict plus "teacher" (runs.student.Teacher)."""
  run = _build(config, kind="student")
  out = run_loop(run, workdir)
  out["teacher"] = run.teacher
  return out


def _build(config, *, kind: str) -> runs.Run:
  distributed.initialize()  # a no-op on one process or when main.py already did it
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  run = runs.build(config, kind=kind, mesh=mesh)
  run.check_mesh()
  mesh_lib.check_batch_divisible(batch_size=config.eval.batch_size, mesh=mesh,
                                 what="eval.batch_size")
  logging.info("process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               dict(mesh.shape))
  return run


def run_loop(run: runs.Run, workdir: str) -> dict:
  """The loop of `run` in `workdir`: resumes from the latest checkpoint, trains to
  run.num_steps, evaluates. See the module docstring."""
  config = run.config
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  periodic_specs, final_specs = run.periodic_specs(), run.final_specs()

  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=int(config.training.max_to_keep))
  try:  # closed on every way out: Orbax's threads never outlive the run (or block the exit)
    return _run(run, workdir, ckpt, periodic_specs=periodic_specs, final_specs=final_specs)
  finally:
    ckpt.close()


def _run(run, workdir, ckpt, *, periodic_specs, final_specs) -> dict:
  config = run.config
  # ----- checkpoints: refuse an incompatible or unreadable one before compiling -----
  # Chosen once, by process 0: every process restores the same step (a collective).
  latest = ckpt.latest_step()
  latest = distributed.agree(-1 if latest is None else latest)
  latest = None if latest < 0 else latest
  config_dict = run.config_dict()
  if latest is not None:
    ckpt.check_compatible(latest, config_dict)
    if run.kind == "student":
      run.check_resume(ckpt.saved_config(latest))
      config_dict = run.config_dict()

  # ----- frozen inputs, state, data -----
  frozen = run.load_frozen()
  iterator = pipeline.make_train_iterator(
      config.data, global_batch_size=run.batch_size, seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  if latest is not None:
    state, data_state = run.restore(ckpt, latest)
    iterator.set_state(data_state)
    logging.info("Resumed from %s/%d (%s)", ckpt.directory, latest, run.kind)
  else:
    state = run.init_state(frozen)
    config_dict = run.config_dict()  # with the init_record of distill.init_from
  start_step = int(jax.device_get(state.step))
  logging.info(run.log_summary())

  # ----- evaluation inputs -----
  sample_fn = run.sample_fn()
  reference = None
  if run.spec.is_image and config.eval.num_samples > 0:
    real_x, real_y = pipeline.load_eval_arrays(config.data)
    reference = pixel_metrics.PixelReference(real_x, real_y, seed=int(config.seed))
    logging.info("stand-in classifier accuracy on held-out real images: %.3f",
                 reference.classifier_heldout_acc)
  text_fn = periodic.eval_text_fn(config, text_shape=run.spec.text_shape,
                                  num_classes=run.spec.eval_classes)
  eval_rng = jax.random.PRNGKey(int(config.seed) + 2)

  def evaluate(params, step, specs, tag):
    return periodic.evaluate(config=config, workdir=workdir, params=params, step=step,
                             specs=specs, sample_fn=sample_fn, reference=reference,
                             num_classes=run.spec.eval_classes, rng=eval_rng, tag=tag,
                             text_fn=text_fn)

  def nonfinite(msg):
    ckpt.wait()  # an in-flight save is part of what is on disk
    good, verified = _last_finite_checkpoint(ckpt)
    if good is None:
      kept = "no checkpoint of this run holds finite values (none was written)"
    elif verified:
      kept = (f"the last good checkpoint ({good}, verified finite) is intact and a rerun "
              f"resumes from it")
    else:
      kept = (f"the latest checkpoint ({good}) is intact (written by an older version: not "
              f"verified finite)")
    return NonFiniteLossError(f"{msg}. The run stopped; {kept}. {run.fix_hint()}")

  def stop_if_nonfinite(state, scalars, step):
    msg = run.nonfinite_message(state, scalars, step=step)
    if msg:
      raise nonfinite(msg)

  def save(step):
    stop_if_nonfinite(state, {}, step)
    try:
      ckpt.save(step, state=state, data_state=iterator.get_state(), config_dict=config_dict)
    except ckpt_lib.NonFiniteStateError as e:
      raise nonfinite(f"Non-finite state at step {step} (not saved)") from e

  # ----- step programs, compiled ahead of time (what --mode=aot compiles) -----
  num_steps = run.num_steps
  writer = logging_lib.MetricWriter(workdir)
  preempted, program_hashes = False, []
  try:
    with _Preemption(interval=int(config.training.log_every)) as preemption:
      pending, compiled = None, []
      if start_step < num_steps:
        pending = next(iterator)
        args = (state, frozen, run.global_batch(pending), run.base_rng)
        t0, flops = time.time(), []
        for program in run.programs():
          lowered = program.lower(*args)
          program_hashes.append(common.program_hash(lowered))
          flops.append(throughput.flops_of(lowered) / run.mesh.size)
          compiled.append(lowered.compile())
        logging.info("%s step compiled in %.1f s (%d program(s), hashes %s)", run.kind,
                     time.time() - t0, len(compiled), program_hashes)
        meter = throughput.Meter(batch_size=run.batch_size, flops_per_step=float(np.mean(flops)))
        logging.info("%.3g FLOPs per step per device (lowered cost analysis); MFU against %.3g "
                     "FLOP/s per device: %s", meter.flops_per_step, meter.peak, meter.peak_source)

      # ----- loop (in-flight checkpoint writes always finish, even on an error) -----
      progress = logging_lib.Progress(start_step=start_step, total_steps=num_steps)
      for step in range(start_step, num_steps):
        batch = pending if pending is not None else next(iterator)
        pending = None
        state, metrics = compiled[run.program_index(step)](
            state, frozen, run.global_batch(batch), run.base_rng)
        done = step + 1
        if done % config.training.log_every == 0 or done == num_steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          stop_if_nonfinite(state, scalars, done)
          rate = progress.rate(done)
          scalars.update(steps_per_sec=rate, **meter.scalars(steps_per_sec=rate))
          progress.log(done, rate, f"{run.progress_text(scalars)}  "
                       f"{throughput.summary(scalars)}")
          writer.write(done, scalars)
        if preemption.stop_at(done):
          save(done)
          ckpt.wait()
          preempted = True
          logging.warning("Preempted at step %d; checkpoint saved. Rerun to resume.", done)
          break
        if done % config.training.checkpoint_every == 0 or done == num_steps:
          save(done)
        if (done % config.training.eval_every == 0 and done < num_steps and periodic_specs
            and config.eval.num_samples > 0):
          evaluate(state.ema_params, done, periodic_specs, "periodic")
  finally:
    ckpt.wait()
    writer.close()
  out = {"state": state, "final_eval": [], "preempted": preempted,
         "program_hashes": program_hashes}
  if preempted:
    return out

  # ----- final evaluation, labelled with the step actually evaluated -----
  step_now = int(jax.device_get(state.step))
  if step_now != num_steps:
    logging.warning("The restored checkpoint is at step %d, beyond the configured %d steps: "
                    "evaluating (and labelling) step %d.", step_now, num_steps, step_now)
  rows = []
  if final_specs and config.eval.num_samples > 0:
    params = run.eval_params(state, final=True)
    use_ema = bool(config.eval.use_ema) or run.kind == "student"
    key = periodic.final_eval_key(config=config, step=step_now, params=params,
                                  specs=final_specs, use_ema=use_ema,
                                  sampling={"clip": run.sample_clip(), "settings": run.settings})
    rows = periodic.reusable_final_eval(workdir, key=key)
    if rows:
      logging.info("Reusing the final evaluation in %s (same step, parameters, specs and "
                   "settings)", os.path.join(workdir, "final_eval.json"))
    else:
      rows = evaluate(params, step_now, final_specs, "final")
      periodic.write_final(rows, workdir=workdir, what=run.kind, step=step_now,
                           use_ema=use_ema, key=key)
  if rows:
    print(f"\nFinal evaluation of the {run.kind} ({pixel_metrics.STAND_IN_LABEL}), step "
          f"{step_now}:\n{periodic.markdown_table(rows)}\n", flush=True)
  out["final_eval"] = rows
  return out
