"""train_and_evaluate(config, workdir): the one linear training loop of a diffusion teacher.

Phases: config checks -> data -> mesh -> model and state (born sharded, or restored) -> step
(compiled ahead of time) -> loop (log, checkpoint, evaluate, SIGTERM) -> final evaluation.
"""
from __future__ import annotations

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from mmd_jax import config_lib
from mmd_jax.data import pipeline
from mmd_jax.diffusion import conditioning
from mmd_jax.diffusion.schedules import schedule_from_config
from mmd_jax.evaluation import images as images_lib
from mmd_jax.evaluation import pixel_metrics, sampling
from mmd_jax.models import build as model_build
from mmd_jax.parallel import distributed
from mmd_jax.parallel import mesh as mesh_lib
from mmd_jax.training import checkpoint as ckpt_lib
from mmd_jax.training import logging_lib, optim, state as state_lib, steps


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient became NaN/inf; the last good checkpoint is left as it was."""


class _Preemption:
  """Turns SIGTERM into a flag that the loop polls (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook runners): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _data_key(info) -> str:
  return "image" if info["image_shape"] is not None else "x"


def build_components(config):
  """Everything derived from the config that the loop and evaluation share.

  num_classes is the model's: the data set's class count, or 0 with model.class_conditional=False
  (labels then serve only evaluation, e.g. a text-conditioned model on digits_text).
  """
  info = pipeline.dataset_info(config.data)
  data_shape = tuple(info["data_shape"])
  num_classes = int(info["num_classes"]) if config.model.get("class_conditional", True) else 0
  model = model_build.build_model(config.model, data_shape=data_shape, num_classes=num_classes)
  schedule = schedule_from_config(config.diffusion.schedule)
  return info, data_shape, num_classes, model, schedule


def text_shape_for(config, info):
  """The text input (tokens, width) shared by the model (model.text_len, model.text_dim) and the
  data set (its 'text' feature), or None; a ConfigError naming both shapes if they differ. Also
  checks config.data.image_shape (used by --mode=aot) against the data set when it is set."""
  want_image = config.data.get("image_shape") if hasattr(config.data, "get") else None
  if want_image and info["image_shape"] is not None and (
      tuple(int(s) for s in want_image) != tuple(info["image_shape"])):
    raise config_lib.ConfigError(
        f"config.data.image_shape={tuple(want_image)} but data set {config.data.name!r} has "
        f"images {tuple(info['image_shape'])}; set --config.data.image_shape to match.")
  want, have = conditioning.model_text_shape(config.model), info.get("text_shape")
  msg = conditioning.text_shape_error(
      want=want, have=have, want_what="the model (model.text_len, model.text_dim)",
      have_what=f"data set {config.data.name!r}")
  if msg:
    fix = (f"set --config.model.text_len={have[0]} --config.model.text_dim={have[1]}"
           if have else "use a data set with a 'text' feature (e.g. data.name=digits_text) or "
           "set model.text_dim=0")
    raise config_lib.ConfigError(f"{msg}; {fix}.")
  return want


def caption_fn(text, labels, num_classes: int):
  """text_fn for sampling.generate: the real captions samples are conditioned on. With classes,
  the j-th sample of class c (class_labels order) gets the j-th real caption of class c
  (cycling); without, sample p gets real caption p (cycling)."""
  text, labels = np.asarray(text), np.asarray(labels)
  if num_classes > 0:
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    missing = [c for c, idx in enumerate(by_class) if len(idx) == 0]
    if missing:
      raise ValueError(f"no evaluation caption of class(es) {missing}.")

    def fn(sample_labels, offset):
      occurrence = (offset + np.arange(len(sample_labels))) // num_classes
      return np.stack([text[by_class[c][j % len(by_class[c])]]
                       for c, j in zip(np.asarray(sample_labels), occurrence)])
  else:
    def fn(sample_labels, offset):
      return text[(offset + np.arange(len(sample_labels))) % len(text)]
  return fn


def eval_text_fn(config, *, text_shape, num_classes: int):
  """caption_fn over the data set's real captions for a text-conditioned model that is
  evaluated (eval.num_samples > 0), else None."""
  if text_shape is None or config.eval.num_samples <= 0:
    return None
  text, labels = pipeline.load_eval_text(config.data)
  return caption_fn(text, labels, num_classes)


def evaluate(*, config, workdir, params, step: int, specs, sample_fn, reference, num_classes,
             rng, tag: str, text_fn=None):
  """Samples each spec, computes the stand-in metrics, writes grids and eval_results.jsonl.
  num_classes: the classes samples are balanced over (and scored against); text_fn: the captions
  of a text-conditioned model (caption_fn)."""
  rows = []
  for spec in specs:
    t0 = time.time()
    x, labels = sampling.generate(sample_fn, params, rng=rng, num=int(config.eval.num_samples),
                                  batch_size=int(config.eval.batch_size),
                                  num_classes=num_classes, text_fn=text_fn, **spec)
    metrics = reference.evaluate(x, labels if num_classes > 0 else None) if reference else {}
    row = {"step": int(step), **spec, **metrics, "num_samples": int(len(x)),
           "metric_kind": pixel_metrics.STAND_IN_LABEL, "tag": tag,
           "sample_seconds": round(time.time() - t0, 2)}
    rows.append(row)
    logging_lib.append_jsonl(os.path.join(workdir, "eval_results.jsonl"), row)
    if x.ndim == 4 and jax.process_index() == 0:
      per = int(config.eval.grid_per_class)
      k = max(num_classes, 1)
      order = np.concatenate([np.where(labels == c)[0][:per] for c in range(k)]) if (
          num_classes > 0) else np.arange(min(len(x), per * 4))
      if len(order) == per * k or num_classes == 0:
        path = os.path.join(workdir, "samples",
                            f"{tag}_step{step}_{spec['sampler']}{spec['num_steps']}"
                            f"_g{spec['guidance']:g}.png")
        epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
        images_lib.save_png(images_lib.grid(x[order], rows=k if num_classes else 4), path,
                            scale=4 if x.shape[1] <= 16 else 1)
        # One sample per class (the grid's first column), for side-by-side comparisons.
        np.save(path[:-4] + "_row.npy", x[order[::per]] if num_classes else x[:per])
    logging.info("eval %s step %d: %s", tag, step,
                 {k: v for k, v in row.items() if k not in ("metric_kind",)})
  return rows


def _reusable_final_eval(path, *, step, specs):
  """Rows of an earlier final evaluation of the same step and samplers, else []."""
  p = epath.Path(path)
  if not p.exists():
    return []
  rows = json.loads(p.read_text())
  same = [{k: r[k] for k in ("sampler", "num_steps", "guidance")} for r in rows] == specs
  return rows if same and all(r["step"] == step for r in rows) else []


def markdown_table(rows, *, metric_names=("fd_pixels", "class_acc")) -> str:
  head = "| sampler | steps | guidance | " + " | ".join(metric_names) + " |"
  lines = [head, "|" + "---|" * (3 + len(metric_names))]
  for r in rows:
    vals = [f"{r[m]:.4f}" if m in r else "-" for m in metric_names]
    lines.append(f"| {r.get('label', r['sampler'])} | {r['num_steps']} | {r['guidance']:g} | "
                 + " | ".join(vals) + " |")
  return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the teacher in `workdir`, then runs the final evaluation.

  Returns {"state": final train state, "final_eval": list of result rows}.
  """
  # ----- multi-host start-up (a no-op on one process or when main.py already did it) -----
  distributed.initialize()
  # ----- config checks (before anything slow) -----
  config_lib.validate(config)
  config_dict = json.loads(config_lib.to_json(config))
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  info, data_shape, num_classes, model, schedule = build_components(config)
  text_shape = text_shape_for(config, info)
  eval_classes = int(info["num_classes"])  # == num_classes unless model.class_conditional=False
  data_key = _data_key(info)
  periodic_specs = config_lib.parse_sampler_specs(config.eval.periodic, key="eval.periodic")
  final_specs = config_lib.parse_sampler_specs(config.eval.final, key="eval.final")

  # ----- mesh -----
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch_divisible(batch_size=config.training.batch_size, mesh=mesh)
  mesh_lib.check_batch_divisible(batch_size=config.eval.batch_size, mesh=mesh,
                                 what="eval.batch_size")
  logging.info("process %d/%d, %d local / %d global devices, mesh %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               dict(mesh.shape))

  # ----- checkpoints: refuse an incompatible or unreadable one before compiling -----
  ckpt = ckpt_lib.Checkpointer(workdir, max_to_keep=int(config.training.max_to_keep))
  latest = ckpt.latest_step()
  if latest is not None:
    ckpt.check_compatible(latest, config_dict)

  # ----- state, born sharded -----
  num_steps = int(config.training.num_steps)
  tx = optim.make_optimizer(config.optim, total_steps=num_steps)
  abstract = state_lib.abstract_state(model, tx, data_shape=data_shape, num_classes=num_classes,
                                      text_shape=text_shape)
  rules = model_build.logical_rules(config.model, config.mesh)
  shardings = state_lib.state_shardings(abstract, mesh=mesh, rules=rules, mesh_config=config.mesh)
  iterator = pipeline.make_train_iterator(
      config.data, global_batch_size=int(config.training.batch_size), seed=int(config.seed),
      shard_index=jax.process_index(), shard_count=jax.process_count())
  if latest is not None:
    target = ckpt_lib.abstract_with_shardings(state_lib.unboxed(abstract), shardings)
    state, data_state = ckpt.restore(latest, abstract_state=target)
    iterator.set_state(data_state)
    logging.info("Resumed from %s/%d", ckpt.directory, latest)
  else:
    state = state_lib.create_train_state(model, tx, rng=jax.random.PRNGKey(config.seed),
                                         data_shape=data_shape, num_classes=num_classes,
                                         shardings=shardings, text_shape=text_shape)
  start_step = int(jax.device_get(state.step))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
  logging.info("model %s: %.2fM parameters", config.model.kind, n_params / 1e6)

  # ----- step, compiled ahead of time -----
  step_fn = steps.make_teacher_step(
      model=model, tx=tx, schedule=schedule, prediction=config.model.prediction,
      loss_weighting=config.diffusion.loss_weighting,
      sigmoid_bias=float(config.diffusion.sigmoid_bias), num_classes=num_classes,
      cond_drop_prob=float(config.diffusion.cond_drop_prob),
      ema_decay=float(config.optim.ema_decay), data_key=data_key,
      use_text=text_shape is not None)
  batch_sh = mesh_lib.batch_sharding(mesh)
  repl = mesh_lib.replicated(mesh)
  train_step = jax.jit(step_fn, in_shardings=(shardings, batch_sh, repl),
                       out_shardings=(shardings, repl), donate_argnums=(0,))
  base_rng = jax.random.PRNGKey(int(config.seed) + 1)
  writer = logging_lib.MetricWriter(workdir)
  sample_fn = sampling.make_sample_fn(model, prediction=config.model.prediction,
                                      schedule=schedule, num_classes=num_classes,
                                      data_shape=data_shape, clip=config.diffusion.get("clip_x"))
  reference = None
  if data_key == "image" and config.eval.num_samples > 0:
    real_x, real_y = pipeline.load_eval_arrays(config.data)
    reference = pixel_metrics.PixelReference(real_x, real_y, seed=int(config.seed))
    logging.info("stand-in classifier accuracy on held-out real images: %.3f",
                 reference.classifier_heldout_acc)
  text_fn = eval_text_fn(config, text_shape=text_shape, num_classes=eval_classes)
  eval_rng = jax.random.PRNGKey(int(config.seed) + 2)

  def save(step):
    if int(jax.device_get(state.nonfinite_step)) >= 0:
      raise NonFiniteLossError(
          f"Non-finite loss at step {int(jax.device_get(state.nonfinite_step))}; not saving. "
          f"The last good checkpoint ({ckpt.latest_step()}) is intact. Lower "
          "optim.learning_rate or check the data.")
    ckpt.save(step, state=state, data_state=iterator.get_state(), config_dict=config_dict)

  # ----- loop (in-flight checkpoint writes always finish, even on an error) -----
  try:
    pending = None
    if start_step < num_steps:
      first = next(iterator)
      t0 = time.time()
      compiled = train_step.lower(state, mesh_lib.global_batch(first, mesh=mesh),
                                  base_rng).compile()
      logging.info("train step compiled in %.1f s", time.time() - t0)
      pending = first
    progress = logging_lib.Progress(start_step=start_step, total_steps=num_steps)
    preempted = False
    with _Preemption() as preemption:
      for step in range(start_step, num_steps):
        batch = pending if pending is not None else next(iterator)
        pending = None
        state, metrics = compiled(state, mesh_lib.global_batch(batch, mesh=mesh), base_rng)
        done = step + 1
        if done % config.training.log_every == 0 or done == num_steps:
          bad = int(jax.device_get(state.nonfinite_step))
          if bad >= 0:
            raise NonFiniteLossError(
                f"Non-finite loss at step {bad}. The run stopped; the last good checkpoint "
                f"({ckpt.latest_step()}) is intact. Lower optim.learning_rate or check the data.")
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars.update(progress.report(done, f"loss {scalars['loss']:.4f}"))
          writer.write(done, scalars)
        if preemption.requested:
          save(done)
          ckpt.wait()
          preempted = True
          logging.warning("Preempted at step %d; checkpoint saved. Rerun to resume.", done)
          break
        if done % config.training.checkpoint_every == 0 or done == num_steps:
          save(done)
        if done % config.training.eval_every == 0 and done < num_steps and periodic_specs:
          evaluate(config=config, workdir=workdir, params=state.ema_params, step=done,
                   specs=periodic_specs, sample_fn=sample_fn, reference=reference,
                   num_classes=eval_classes, rng=eval_rng, tag="periodic", text_fn=text_fn)
  finally:
    ckpt.wait()
    writer.close()
  if preempted:
    ckpt.close()
    return {"state": state, "final_eval": [], "preempted": True}

  # ----- final evaluation -----
  final_path = os.path.join(workdir, "final_eval.json")
  final_rows = _reusable_final_eval(final_path, step=num_steps, specs=final_specs)
  if final_rows:
    logging.info("Reusing the final evaluation in %s", final_path)
    print(f"\nFinal evaluation ({pixel_metrics.STAND_IN_LABEL}), step {num_steps}:\n"
          f"{markdown_table(final_rows)}\n", flush=True)
  elif final_specs and config.eval.num_samples > 0:
    params = state.ema_params if config.eval.use_ema else state.params
    final_rows = evaluate(config=config, workdir=workdir, params=params, step=num_steps,
                          specs=final_specs, sample_fn=sample_fn, reference=reference,
                          num_classes=eval_classes, rng=eval_rng, tag="final", text_fn=text_fn)
    table = markdown_table(final_rows)
    if jax.process_index() == 0:
      with epath.Path(final_path).open("w") as f:
        json.dump(final_rows, f, indent=1)
      with epath.Path(os.path.join(workdir, "final_eval.md")).open("w") as f:
        f.write(f"Teacher at step {num_steps}, EMA={bool(config.eval.use_ema)}; "
                f"{pixel_metrics.STAND_IN_LABEL}.\n\n{table}\n")
    print(f"\nFinal evaluation ({pixel_metrics.STAND_IN_LABEL}), step {num_steps}:\n{table}\n",
          flush=True)
  ckpt.close()
  return {"state": state, "final_eval": final_rows, "preempted": False}
