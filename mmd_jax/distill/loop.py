"""distill_and_evaluate(config, workdir): moment-matching distillation of a trained teacher.

Phases: config checks -> teacher (restored, checked, fingerprinted) -> data -> mesh -> student
state (born sharded from the teacher's EMA parameters, or restored) -> step (compiled ahead of
time; teacher and preconditioner are arguments) -> loop (log, checkpoint, evaluate, SIGTERM) ->
final evaluation of the k-step student.
"""
from __future__ import annotations

import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mmd_jax import config_lib
from mmd_jax.data import pipeline
from mmd_jax.distill import moment_matching as mm
from mmd_jax.distill import preconditioners, steps as distill_steps
from mmd_jax.distill import teacher as teacher_lib
from mmd_jax.evaluation import pixel_metrics
from mmd_jax.models import build as model_build
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import logging_lib
from mmd_jax.training import state as state_lib
from mmd_jax.training import loop as train_loop


def student_spec(config) -> dict:
  d = config.distill
  return {"sampler": f"student_{d.variant}", "num_steps": int(d.num_student_steps),
          "guidance": 0.0}


def make_student_sample_fn(*, config, denoise, schedule, data_shape, clip, num_classes=None):
  """sample(params, rng, labels, text=None, *, sampler, num_steps, guidance) like
  evaluation.sampling; text (f32[B, L, D]) for a text-conditioned student. num_classes: the
  model's (labels are not given to a model without classes; None = pass them as before)."""
  def sample(params, rng, labels, text=None, *, sampler, num_steps, guidance):
    del sampler
    null_label = num_classes if num_classes else None
    fn = distill_steps.make_student_sampler(config=config.distill, denoise=denoise,
                                            schedule=schedule, num_steps=num_steps, clip=clip,
                                            guidance=guidance, null_label=null_label)
    label = None if (num_classes == 0 and text is not None) else labels
    return fn(params, rng, shape=(labels.shape[0],) + tuple(data_shape), label=label, text=text)
  return jax.jit(sample, static_argnames=("sampler", "num_steps", "guidance"))


def distill_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils config.distill.teacher into a k-step student in `workdir` and evaluates it."""
  # ----- multi-host start-up, then config checks -----
  distributed.initialize()
  config_lib.validate(config)
  dcfg = config.distill
  try:
    mm.validate_config(dcfg)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  for key in ("batch_size", "num_steps"):
    if int(dcfg[key]) < 1:
      raise config_lib.ConfigError(f"config.distill.{key} must be a positive integer, got "
                                   f"{dcfg[key]}.")
  if dcfg.variant == "parameter_space" and int(dcfg.batch_size) % 2:
    raise config_lib.ConfigError(f"config.distill.batch_size={dcfg.batch_size} must be even: the "
                                 "parameter-space variant splits it into two halves.")
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  info, data_shape, num_classes, model, schedule = train_loop.build_components(config)
  text_shape = train_loop.text_shape_for(config, info)
  eval_classes = int(info["num_classes"])  # == num_classes unless model.class_conditional=False
  data_key = train_loop._data_key(info)  # pylint: disable=protected-access

  # ----- mesh -----
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch_divisible(batch_size=int(dcfg.batch_size), mesh=mesh,
                                 what="distill.batch_size")
  rules = model_build.logical_rules(config.model, config.mesh)

  # ----- teacher (an argument of the step, never in the student's checkpoints) -----
  teacher = teacher_lib.load_teacher(dcfg.teacher, config=config, data_shape=data_shape,
                                     num_classes=num_classes, mesh=mesh, rules=rules,
                                     text_shape=text_shape)
  logging.info("teacher %s step %d fingerprint %s", teacher.path, teacher.step,
               teacher.fingerprint)
  config_dict = json.loads(config_lib.to_json(config))
  config_dict["teacher_record"] = {"path": teacher.path, "step": teacher.step,
                                   "fingerprint": teacher.fingerprint}

  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=int(config.training.max_to_keep))
  latest = ckpt.latest_step()
  if latest is not None:
    ckpt.check_compatible(latest, config_dict)
    saved = ckpt.saved_config(latest)
    saved_teacher = saved.get("teacher_record", {})
    if saved.get("init_record"):
      config_dict["init_record"] = saved["init_record"]  # kept in every later checkpoint
    if saved_teacher.get("fingerprint") != teacher.fingerprint:
      raise ckpt_lib.CheckpointError(
          f"{workdir} holds a student distilled from a different teacher (fingerprint "
          f"{saved_teacher.get('fingerprint')} at {saved_teacher.get('path')}, now "
          f"{teacher.fingerprint} at {teacher.path}). Use a new --workdir.")

  # ----- student state, born sharded from the teacher's EMA parameters -----
  student_tx, aux_tx = distill_steps.make_optimizers(dcfg)

  def init(params):
    return distill_steps.init_distill_state(config=dcfg, init_params=params,
                                            student_tx=student_tx, aux_tx=aux_tx)

  abstract = jax.eval_shape(init, teacher.abstract_params)
  shardings = state_lib.state_shardings(abstract, mesh=mesh, rules=rules,
                                        mesh_config=config.mesh)
  iterator = pipeline.make_train_iterator(
      config.data, global_batch_size=int(dcfg.batch_size), seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  if latest is not None:
    target = ckpt_lib.abstract_with_shardings(nn.unbox(abstract), shardings)
    state, data_state = ckpt.restore(latest, abstract_state=target)
    iterator.set_state(data_state)
    logging.info("Resumed the student from %s/%d", ckpt.directory, latest)
  else:
    init_params = teacher.params
    if dcfg.get("init_from"):
      init_params, record = teacher_lib.load_student_params(
          dcfg.init_from, teacher=teacher, mesh=mesh, rules=rules, mesh_config=config.mesh)
      config_dict["init_record"] = record
      logging.info("student and auxiliary start from the %s k=%d student at %s (step %d)",
                   record["variant"], record["num_student_steps"], record["path"],
                   record["step"])
    state = jax.jit(lambda p: nn.unbox(init(p)), out_shardings=shardings,
                    compiler_options=state_lib.FAST_COMPILE)(init_params)
  start_step = int(jax.device_get(state.step))

  # ----- step: teacher and preconditioner are sharded arguments -----
  denoise = distill_steps.make_x_predictor(model, config.model.prediction)
  phases = distill_steps.step_phases(dcfg)  # one program, or one per step parity
  step_fns = [distill_steps.make_distill_step(
      config=dcfg, denoise=denoise, schedule=schedule, student_tx=student_tx, aux_tx=aux_tx,
      data_key=data_key, null_label=num_classes if num_classes > 0 else None,
      use_text=text_shape is not None, phase=phase) for phase in phases]
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  teacher_sh = teacher.param_shardings
  extra_args, extra_sh = (), ()
  if dcfg.variant == "parameter_space":
    precond = _preconditioner(config=config, teacher=teacher, denoise=denoise, schedule=schedule,
                              data_key=data_key, mesh=mesh, use_text=text_shape is not None)
    if precond is not None:
      extra_args, extra_sh = (precond,), (teacher_sh,)
  train_steps = [jax.jit(fn, in_shardings=(shardings, teacher_sh, batch_sh, repl) + extra_sh,
                         out_shardings=(shardings, repl), donate_argnums=(0,))
                 for fn in step_fns]
  base_rng = jax.random.PRNGKey(int(config.seed) + 11)
  writer = logging_lib.MetricWriter(workdir)
  sample_fn = make_student_sample_fn(config=config, denoise=denoise, schedule=schedule,
                                     data_shape=data_shape,
                                     clip=config.diffusion.get("clip_x"),
                                     num_classes=num_classes if text_shape else None)
  reference = None
  if data_key == "image" and config.eval.num_samples > 0:
    real_x, real_y = pipeline.load_eval_arrays(config.data)
    reference = pixel_metrics.PixelReference(real_x, real_y, seed=int(config.seed))
  text_fn = train_loop.eval_text_fn(config, text_shape=text_shape, num_classes=eval_classes)
  eval_rng = jax.random.PRNGKey(int(config.seed) + 2)
  spec = student_spec(config)
  num_steps = int(dcfg.num_steps)

  def save(step):
    ckpt.save(step, state=state, data_state=iterator.get_state(), config_dict=config_dict)

  # ----- loop (in-flight checkpoint writes always finish, even on an error) -----
  preempted = False
  try:
    pending = None
    if start_step < num_steps:
      pending = next(iterator)
      t0 = time.time()
      compiled = [fn.lower(state, teacher.params, mesh_lib.global_batch(pending, mesh=mesh),
                           base_rng, *extra_args).compile() for fn in train_steps]
      logging.info("distillation step compiled in %.1f s (%d program(s))", time.time() - t0,
                   len(compiled))
    progress = logging_lib.Progress(start_step=start_step, total_steps=num_steps)
    with train_loop._Preemption() as preemption:  # pylint: disable=protected-access
      for step in range(start_step, num_steps):
        batch = pending if pending is not None else next(iterator)
        pending = None
        state, metrics = compiled[step % len(compiled)](
            state, teacher.params, mesh_lib.global_batch(batch, mesh=mesh), base_rng, *extra_args)
        done = step + 1
        if done % config.training.log_every == 0 or done == num_steps:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          bad = [k for k, v in scalars.items() if not np.isfinite(v)]
          if bad:
            raise train_loop.NonFiniteLossError(
                f"Non-finite {bad} by distillation step {done}. The last good checkpoint "
                f"({ckpt.latest_step()}) is intact. Lower distill.optim.learning_rate.")
          scalars.update(progress.report(done, " ".join(
              f"{k} {v:.4g}" for k, v in scalars.items() if "loss" in k)))
          writer.write(done, scalars)
        if preemption.requested:
          save(done)
          ckpt.wait()
          preempted = True
          logging.warning("Preempted at step %d; checkpoint saved. Rerun to resume.", done)
          break
        if done % config.training.checkpoint_every == 0 or done == num_steps:
          save(done)
        if done % config.training.eval_every == 0 and done < num_steps:
          train_loop.evaluate(config=config, workdir=workdir, params=state.ema_params, step=done,
                              specs=[spec], sample_fn=sample_fn, reference=reference,
                              num_classes=eval_classes, rng=eval_rng, tag="periodic",
                              text_fn=text_fn)
  finally:
    ckpt.wait()
    writer.close()
  if preempted:
    ckpt.close()
    return {"state": state, "final_eval": [], "preempted": True}

  # ----- final evaluation of the k-step student (EMA parameters) -----
  final_path = os.path.join(workdir, "final_eval.json")
  rows = train_loop._reusable_final_eval(final_path, step=num_steps, specs=[spec])  # pylint: disable=protected-access
  if not rows and config.eval.num_samples > 0:
    rows = train_loop.evaluate(config=config, workdir=workdir, params=state.ema_params,
                               step=num_steps, specs=[spec], sample_fn=sample_fn,
                               reference=reference, num_classes=eval_classes, rng=eval_rng,
                               tag="final", text_fn=text_fn)
    if jax.process_index() == 0:
      with epath.Path(final_path).open("w") as f:
        json.dump(rows, f, indent=1)
  if rows:
    print(f"\nStudent ({pixel_metrics.STAND_IN_LABEL}), step {num_steps}:\n"
          f"{train_loop.markdown_table(rows)}\n", flush=True)
  ckpt.close()
  return {"state": state, "final_eval": rows, "preempted": False, "teacher": teacher}


def _preconditioner(*, config, teacher, denoise, schedule, data_key, mesh, use_text=False):
  """Lambda for the parameter-space variant (None = identity)."""
  dcfg = config.distill
  if dcfg.preconditioner == "identity":
    return None
  if dcfg.preconditioner == "adam":
    return preconditioners.adam_preconditioner(teacher.opt_state, eps=float(dcfg.precond_eps))
  n = int(dcfg.precond_batches) * max(1, int(dcfg.batch_size) // 2)
  it = pipeline.make_train_iterator(config.data, global_batch_size=n, seed=int(config.seed) + 7,
                                    shard_index=0, shard_count=1)
  batch = {k: jnp.asarray(v) for k, v in next(it).items()}
  fn = jax.jit(lambda params, b, rng: preconditioners.squared_grad_preconditioner(
      denoise=denoise, teacher_params=params, batch=b, rng=rng, config=dcfg, schedule=schedule,
      data_key=data_key, use_text=use_text))
  t0 = time.time()
  precond = fn(teacher.params, batch, jax.random.PRNGKey(int(config.seed) + 5))
  logging.info("squared-gradient preconditioner from %d real examples in %.1f s", n,
               time.time() - t0)
  return precond
